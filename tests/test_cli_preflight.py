"""Errors before anything starts: every silent-wrong or late-failing input of an LLM run is
refused by `--dry-run` (and so by the start of `rllib train`) in one paragraph with exit 2."""

import json
import textwrap

import pytest

from rllib_ext.cli.main import main

TINY_RUN = textwrap.dedent("""
    exp:
      run: VCPO
      env: MathEnv
      stop: {training_iteration: 2}
      config:
        llm_model: tiny
        max_prompt_tokens: 16
        max_response_tokens: 6
        prompts_per_sample: 4
        num_generations: 4
        train_batch_size_per_learner: 16
        accuracy_eval_interval: 1
        env_config: {}
""")


def write(tmp_path, env_config=None, text=TINY_RUN, **config):
    spec = next(iter(__import__("yaml").safe_load(text).values()))
    if env_config is not None:
        spec["config"]["env_config"] = env_config
    spec["config"].update(config)
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps({"exp": spec}))
    return str(path)


def dry_run(capsys, *argv):
    code = main(["train", "file", *argv, "--dry-run"])
    out = capsys.readouterr()
    return code, out.out, out.err


def refused(capsys, *argv) -> str:
    code, _, err = dry_run(capsys, *argv)
    assert code == 2, err
    assert err.startswith("rllib: error: ") and err.strip().count("\n") == 0, err
    assert "Fix:" in err and "Traceback" not in err
    return err


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_the_tiny_run_is_valid(tmp_path, capsys):
    code, out, err = dry_run(capsys, write(tmp_path))
    assert code == 0, err
    assert "exp: VCPO on MathEnv" in out and "valid" in out


@pytest.mark.parametrize("env_config, message", [
    ({"datset": {"name": "gsm8k"}}, r"'datset' \(did you mean 'dataset'\?\)"),
    ({"max_prompt_token": 32}, r"'max_prompt_token' \(did you mean 'max_prompt_tokens'\?\)"),
    ({"dataset": {"name": "arithmetic", "max_opernd": 9}},
     r"'dataset.max_opernd' \(did you mean 'dataset.max_operand'\?\)"),
    ({"reward_func": ["envs.math.rewards:math_answer"]}, r"did you mean 'reward_funcs'"),
])
def test_a_misspelled_env_config_key_is_refused_with_the_nearest(tmp_path, capsys, env_config,
                                                                 message):
    import re

    err = refused(capsys, write(tmp_path, env_config))
    assert "key 'exp.config.env_config" in err and re.search(message, err), err


def test_keys_the_runner_sets_are_refused_in_env_config(tmp_path, capsys):
    err = refused(capsys, write(tmp_path, {"max_prompt_tokens": 32}))
    assert "env_config.max_prompt_tokens is set by the env runner" in err
    assert "set max_prompt_tokens in config" in err


def test_a_single_file_as_the_evaluation_split_is_refused_unless_rows_are_held_out(tmp_path,
                                                                                  capsys):
    data = write_jsonl(tmp_path / "sums.jsonl",
                       [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(50)])
    err = refused(capsys, write(tmp_path, {"dataset": {"path": data}}))
    assert "is a single file: it is the 'train' split" in err and "test_fraction" in err
    code, out, err = dry_run(capsys, write(tmp_path, {"dataset": {"path": data,
                                                                  "test_fraction": 0.2}}))
    assert code == 0, err
    assert "note: " in out and "held out as 'test'" in out
    # without evaluation the file is only the training split
    code, _, err = dry_run(capsys, write(tmp_path, {"dataset": {"path": data}},
                                         accuracy_eval_interval=0))
    assert code == 0, err


def test_missing_and_unparsable_dataset_files_are_refused(tmp_path, capsys):
    err = refused(capsys, write(tmp_path, {"dataset": {"path": "data/missing.jsonl"}}))
    assert "'data/missing.jsonl' does not exist" in err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", answer: 4}\n')
    err = refused(capsys, write(tmp_path, {"dataset": {"path": str(broken),
                                                       "test_fraction": 0.5}}))
    assert "could not read" in err and "JSON parse error" in err


def test_rows_without_answers_need_a_reward_that_does_not_read_them(tmp_path, capsys):
    data = write_jsonl(tmp_path / "open.jsonl", [{"prompt": f"say {i}"} for i in range(20)])
    err = refused(capsys, write(tmp_path, {"dataset": {"path": data, "test_fraction": 0.2}}))
    assert "envs.math.rewards:math_answer needs the column(s) ['answer']" in err
    assert "set dataset.answer_field" in err
    err = refused(capsys, write(tmp_path, {  # this one reads the answer column too
        "dataset": {"path": data, "test_fraction": 0.2},
        "reward_funcs": ["examples.rewards:no_extra_characters"]}))
    assert "examples.rewards:no_extra_characters needs the column(s) ['answer']" in err
    err = refused(capsys, write(tmp_path, {"reward_funcs": ["no_such_module:reward"]}))
    assert "cannot import module 'no_such_module'" in err


def test_a_prompt_template_with_an_unknown_column_is_refused(tmp_path, capsys):
    err = refused(capsys, write(tmp_path, {"prompt_template": "{question}\nAnswer:"}))
    assert "prompt_template" in err and "does not format with the rows' columns" in err


def test_model_paths_must_hold_a_model_and_hub_ids_must_exist(tmp_path, capsys, monkeypatch):
    err = refused(capsys, write(tmp_path, llm_model="./models/missing"))
    assert "model directory './models/missing' does not exist" in err
    (tmp_path / "empty").mkdir()
    err = refused(capsys, write(tmp_path, llm_model=str(tmp_path / "empty")))
    assert "is not a Hugging Face model directory" in err
    err = refused(capsys, write(tmp_path, llm_model="not a hub id"))
    assert "neither a local directory nor a valid Hugging Face hub id" in err

    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(name, timeout=None):
        raise RepositoryNotFoundError.__new__(RepositoryNotFoundError)

    monkeypatch.setattr(huggingface_hub, "model_info", not_found)
    err = refused(capsys, write(tmp_path, llm_model="nobody-xyz/no-such-model"))
    assert "hub model 'nobody-xyz/no-such-model' does not exist" in err

    monkeypatch.setattr(huggingface_hub, "model_info", lambda name, timeout=None: object())
    code, out, err = dry_run(capsys, write(tmp_path, llm_model="some-org/some-model",
                                           accuracy_eval_interval=0))
    assert code == 0, err
    assert "will be downloaded from the Hugging Face hub" in out


@pytest.mark.parametrize("stop, message", [
    ({"training_iteraton": 3}, "Did you mean 'training_iteration'"),
    ({"evaluation/acuracy": 0.5}, "Did you mean 'evaluation/accuracy'"),
    ({"env_runners/episode_return_mena": 1}, "Did you mean 'env_runners/episode_return_mean'"),
])
def test_a_stop_metric_the_algorithm_never_reports_is_refused(tmp_path, capsys, stop, message):
    err = refused(capsys, write(tmp_path), "--stop", json.dumps(stop))
    assert "is not reported by VCPO" in err and message in err


def test_stop_metrics_the_algorithm_reports_are_accepted(tmp_path, capsys):
    stop = {"evaluation/accuracy": 0.9, "vcpo/reward_std": 0.1, "vcpo/policy_version": 9,
            "learners/default_policy/ess_ratio": 0.5, "time_total_s": 60}
    code, _, err = dry_run(capsys, write(tmp_path), "--stop", json.dumps(stop))
    assert code == 0, err


def test_an_env_of_the_wrong_kind_is_refused(tmp_path, capsys):
    err = refused(capsys, write(tmp_path, text=TINY_RUN.replace("env: MathEnv",
                                                                "env: CartPole-v1")))
    assert "VCPO cannot train on 'CartPole-v1'" in err and "LLM tasks" in err
    ppo = textwrap.dedent("""
        exp:
          run: PPO
          env: MathEnv
    """)
    path = tmp_path / "ppo.yaml"
    path.write_text(ppo)
    err = refused(capsys, str(path))
    assert "PPO cannot train on 'MathEnv'" in err and "gymnasium" in err


def test_a_logger_that_is_not_installed_is_refused(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    err = refused(capsys, write(tmp_path), "--logger", "wandb")
    assert "--logger wandb: the 'wandb' package is not installed" in err
    assert "pip install 'rllib-ext[wandb]'" in err


def test_rllib_list_says_which_envs_each_algorithm_takes(capsys):
    import os

    assert main(["list"]) == 0
    # modules of the working directory (reward functions) import in Ray workers too
    assert os.getcwd() in os.environ["PYTHONPATH"].split(os.pathsep)
    out = capsys.readouterr().out
    blocks = dict(zip(out.splitlines()[::2], out.splitlines()[1::2], strict=True))
    assert "LLM tasks" in blocks["VCPO"] and "MathEnv" in blocks["VCPO"]
    assert "CartPole" not in blocks["VCPO"] and "ResourceSelection" not in blocks["VCPO"]
    assert "ResourceSelection" in blocks["TMFPG"] and "MathEnv" not in blocks["TMFPG"]
    [rllib] = [v for k, v in blocks.items() if k.endswith("(RLlib)")]
    assert "gymnasium" in rllib and "MathEnv" not in rllib


def test_rllib_train_refuses_before_ray_starts(tmp_path, capsys):
    import ray

    code = main(["train", "file", write(tmp_path, {"datset": {}})])
    assert code == 2 and "did you mean 'dataset'" in capsys.readouterr().err
    assert not ray.is_initialized()
