"""Property-based tests over the YAML/CLI surface: any input is either accepted or refused with
a one-paragraph error (exit code 2) - never a traceback, never an internal error (exit 3)."""

import json
import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rllib_ext.cli.experiment import EXPERIMENT_KEYS, SEARCH_SPACE_MARKERS
from rllib_ext.cli.main import main

CONFIG_KEYS = ["lr", "gamma", "num_env_runners", "train_batch_size_per_learner",
               "minibatch_size", "num_epochs", "explore", "model_config", "env_config",
               "max_staleness", "num_generations", "temperature", "baseline", "correction",
               "llm_model", "grad_clip", "seed", "callbacks", "num_workers", "lambda"]
ALGOS = ["PPO", "VCPO", "TMFPG", "ppo", "NOPE", "", "module.path:Missing"]
ENVS = ["CartPole-v1", "MathEnv", "ResourceSelection", "Nope-v0", "envs.math.env:MathEnv",
        "x:y"]

scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**6)
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(alphabet=string.printable, max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
search_spaces = st.builds(lambda marker, arg: {marker: arg},
                          st.sampled_from(SEARCH_SPACE_MARKERS), values)
config_values = values | search_spaces
configs = st.dictionaries(st.sampled_from(CONFIG_KEYS) | st.text(max_size=8), config_values,
                          max_size=5)
experiments = st.fixed_dictionaries(
    {"run": st.sampled_from(ALGOS) | scalars},
    optional={"env": st.sampled_from(ENVS) | scalars, "config": configs | values,
              "stop": st.dictionaries(st.text(max_size=20), values, max_size=2) | values,
              "num_samples": values, "checkpoint_freq": values,
              "checkpoint_at_end": values, "bogus": values})
documents = (st.dictionaries(st.text(min_size=1, max_size=10), experiments | values,
                             min_size=1, max_size=2) | values)

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def check(code: int, err: str) -> None:
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("rllib: error: ") and err.strip().count("\n") == 0, err


def run(capsys, *argv) -> None:
    try:
        code = main(list(argv))
    except SystemExit as exit_info:  # argparse's own usage errors
        code = exit_info.code
    check(code, capsys.readouterr().err)


@FUZZ
@given(document=documents)
def test_any_yaml_document_is_accepted_or_refused_clearly(document, tmp_path_factory, capsys):
    path = tmp_path_factory.mktemp("fuzz") / "exp.yaml"
    path.write_text(yaml.safe_dump(document))
    run(capsys, "train", "file", str(path), "--dry-run")


@FUZZ
@given(text=st.text(alphabet=string.printable, max_size=80))
def test_any_yaml_text_is_accepted_or_refused_clearly(text, tmp_path_factory, capsys):
    path = tmp_path_factory.mktemp("fuzz") / "exp.yaml"
    path.write_text(text)
    run(capsys, "train", "file", str(path), "--dry-run")


@FUZZ
@given(config=st.text(max_size=30) | configs.map(json.dumps),
       stop=st.text(max_size=20) | st.dictionaries(st.text(max_size=8), values).map(json.dumps))
def test_any_command_line_override_is_accepted_or_refused_clearly(config, stop, capsys):
    run(capsys, "train", "file", "tuned_examples/ppo_cartpole.yaml", "--config", config,
        "--stop", stop, "--dry-run")


@FUZZ
@given(argv=st.lists(st.sampled_from(
    ["train", "file", "--algo", "--env", "--config", "--stop", "--num-samples",
     "--checkpoint-freq", "--restore", "--storage-path", "-5", "PPO", "CartPole-v1",
     "tuned_examples/ppo_cartpole.yaml", "{}", "list", "nope"]), max_size=7))
def test_any_argument_list_is_accepted_or_refused_clearly(argv, capsys):
    run(capsys, *argv, "--dry-run") if argv[:1] == ["train"] else None


def test_experiment_keys_are_the_documented_ones():
    assert set(EXPERIMENT_KEYS) == {"run", "algo", "env", "stop", "config", "num_samples",
                                    "checkpoint_freq", "checkpoint_at_end", "storage_path"}
