"""Quiet runs: worker output goes to rllib.log in the trial directory, the console gets only
this project's warnings and the raylet's messages; vLLM's expected messages are dropped."""

import io
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from rllib_ext.cli.run_log import CONSOLE_MARK, LOG_FILE_NAME, RunLog
from rllib_ext.llm.vllm_logs import drop_expected_vllm_messages


@pytest.fixture
def run_log():
    console = io.StringIO()
    log = RunLog(verbose=0, console=console)
    yield log, console
    log.close()


def trial(tmp_path: Path, name: str):
    return SimpleNamespace(trial_id=name, path=str(tmp_path / name))


def test_worker_lines_go_to_the_trial_log_and_only_marked_ones_to_the_console(run_log, tmp_path):
    log, console = run_log
    log.start_experiment(str(tmp_path))
    log.on_worker_output({"pid": 7, "actor_name": "LLMEnvRunner", "lines": ["before start"]})
    first = trial(tmp_path, "t1")
    log.on_trial_start(0, [], first)
    log.on_worker_output({"pid": 7, "actor_name": "LLMEnvRunner",
                          "lines": ["INFO vllm chatter", CONSOLE_MARK + "WARNING envs.x: hung"]})
    log.on_worker_output({"pid": "raylet", "lines": ["worker killed: out of memory"]})
    log.on_trial_complete(0, [], first)
    text = (Path(first.path) / LOG_FILE_NAME).read_text()
    assert text.splitlines() == [
        "(LLMEnvRunner pid=7) before start", "(LLMEnvRunner pid=7) INFO vllm chatter",
        f"(LLMEnvRunner pid=7) {CONSOLE_MARK}WARNING envs.x: hung",
        "(raylet) worker killed: out of memory"]
    assert console.getvalue().splitlines() == [
        f"(LLMEnvRunner pid=7) {CONSOLE_MARK}WARNING envs.x: hung",
        "(raylet) worker killed: out of memory"]


def test_concurrent_trials_share_the_experiment_log(run_log, tmp_path):
    log, _ = run_log
    log.start_experiment(str(tmp_path))
    a, b = trial(tmp_path, "a"), trial(tmp_path, "b")
    log.on_trial_start(0, [], a)
    log.on_worker_output({"pid": 1, "lines": ["only a"]})
    log.on_trial_start(0, [], b)
    log.on_worker_output({"pid": 2, "lines": ["a and b"]})
    log.close()
    assert (Path(a.path) / LOG_FILE_NAME).read_text() == "(1) only a\n"
    assert (tmp_path / LOG_FILE_NAME).read_text() == "(2) a and b\n"


def test_driver_logging_goes_to_the_file_and_project_warnings_to_the_console(run_log, tmp_path):
    log, console = run_log
    log.start_experiment(str(tmp_path))
    log.on_trial_start(0, [], trial(tmp_path, "t"))
    logging.getLogger("ray.tune").warning("tune chatter")
    logging.getLogger("rllib_ext.cli").warning("a real warning")
    text = (tmp_path / "t" / LOG_FILE_NAME).read_text()
    assert "tune chatter" in text and "a real warning" in text
    assert "tune chatter" not in console.getvalue()
    assert re.search(r"WARNING rllib_ext.cli: a real warning", console.getvalue())


def test_expected_vllm_messages_are_dropped_and_others_kept(caplog):
    drop_expected_vllm_messages()
    layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    with caplog.at_level(logging.INFO):
        layerwise.warning("%s: Failed to load weights", "RotaryEmbedding")
        layerwise.warning("%s: Failed to load weights", "QKVParallelLinear")
        logging.getLogger("vllm.v1.core.block_pool").info("Successfully reset prefix cache")
        logging.getLogger("vllm.renderers.base").warning("Chat template warmup failed")
        logging.getLogger("vllm.model_executor.model_loader.reload.inplace").info(
            "Reloading and processing weights took %.2f seconds", 0.01)
    assert [r.getMessage() for r in caplog.records] == [
        "QKVParallelLinear: Failed to load weights"]
