"""End to end with the real vLLM engine: a quiet console, a JSONL dataset with two reward
functions, export of the trained model to a Hugging Face folder, evaluation of a checkpoint."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"^\[\S+\] iter \d+ \|")


def trial_dir(storage: Path, experiment: str) -> Path:
    [trial] = [p for p in (storage / experiment).iterdir() if p.is_dir()]
    return trial


def test_a_tiny_run_prints_progress_and_little_else(cli, tmp_path):
    done = cli("train", "file", "tuned_examples/vcpo_math_tiny.yaml", "--stop",
               '{"training_iteration": 3}', "--storage-path", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = (done.stdout + done.stderr).splitlines()
    progress = [line for line in lines if PROGRESS.match(line)]
    others = [line for line in lines if not PROGRESS.match(line)]
    assert len(progress) == 3
    assert len(others) <= 10, "\n".join(others)
    log = trial_dir(tmp_path, "vcpo-math-tiny") / "rllib.log"
    text = log.read_text()
    assert "(LLMEnvRunner pid=" in text and "Initializing a V1 LLM engine" in text
    # vLLM's per-sync messages and the no-tokenizer warm-up are dropped, even from the file
    assert "RotaryEmbedding: Failed to load weights" not in text
    assert "Chat template warmup failed" not in text
    assert f"full log (vLLM, Ray workers; -v shows it here): {log}" in done.stdout


def test_jsonl_with_two_rewards_trains_logs_both_and_exports(cli, tmp_path, tiny_model_path):
    done = cli("train", "file", "tuned_examples/vcpo_custom_reward.yaml", "--stop",
               '{"training_iteration": 3}', "--config", '{"completions_table_interval": 1}',
               "--storage-path", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trial = trial_dir(tmp_path, "vcpo-custom-reward")
    results = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
    last = results[-1]
    assert last["vcpo"]["policy_version"] == 30  # it trained: 3 iterations x 10 updates
    for group in (last["vcpo"]["rewards"], {
            k.split("/", 1)[1]: v for k, v in last["evaluation"].items()
            if k.startswith("rewards/")}):
        assert set(group) == {"math_answer", "no_extra_characters"}
        assert all(0.0 <= value <= 1.0 for value in group.values())
    rollouts = last["vcpo"]  # what a user reads of the rollouts (RLlib's return: env_runners/)
    assert np.isclose(last["env_runners"]["episode_return_mean"],
                      rollouts["rewards"]["math_answer"]
                      + 0.2 * rollouts["rewards"]["no_extra_characters"], atol=0.05)
    assert "reward_std" not in last["env_runners"] and 0 <= rollouts["reward_std"] <= 1
    tables = rollouts["completions"]
    assert tables and "| math_answer | no_extra_characters |" in tables[-1]

    # export -> transformers: the same log-probs as the checkpoint's RLModule
    from ray.rllib.core.rl_module.rl_module import RLModule
    from transformers import AutoModelForCausalLM

    from rllib_ext.llm.causal_lm_module import (
        RESPONSE_LOGP,
        pack_prompt_response,
        response_log_probs,
    )

    exported = tmp_path / "exported"
    done = cli("export", str(trial), "--to", str(exported))
    assert done.returncode == 0, done.stderr
    [checkpoint] = sorted(trial.glob("checkpoint_*"))
    module = RLModule.from_checkpoint(
        str(checkpoint / "learner_group" / "learner" / "rl_module" / "default_policy"))
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    batch = pack_prompt_response([[1, 6, 11, 7, 13], [1, 9, 11, 6, 6, 13]], [[7, 2], [8, 9, 2]],
                                 0, response_width=6)
    with torch.no_grad():
        expected = module.forward_train(batch)[RESPONSE_LOGP]
        assert torch.equal(response_log_probs(model, batch, 1.0), expected)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
        assert not torch.equal(response_log_probs(base, batch, 1.0), expected)  # it learned

    # The evaluation command takes the checkpoint (exported to a folder that vLLM loads) and
    # agrees with transformers on the exported folder (greedy decoding).
    from envs.math.env import MathEnv
    from rllib_ext.llm.evaluation import evaluate_task
    from rllib_ext.llm.generation import TransformersBackend

    env_config = {"dataset": {"path": "examples/data/sums.jsonl", "test_fraction": 0.2},
                  "answer_style": "plain"}
    evaluated = subprocess.run(
        [sys.executable, "-m", "rllib_ext.llm.evaluation", "--model", str(checkpoint),
         "--env-config", json.dumps(env_config), "--max-prompt-tokens", "16",
         "--max-response-tokens", "6"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout)
    task = MathEnv({**env_config, "tokenizer": str(exported), "split": "test",
                    "shuffle": False, "max_prompt_tokens": 16})
    reference = evaluate_task(TransformersBackend(str(exported)), task, max_tokens=6)
    assert result["num_problems"] == reference["num_problems"] > 0
    assert result["accuracy"] == reference["accuracy"]
