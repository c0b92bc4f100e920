"""End-to-end: the `rllib` program trains through Tune, writes TensorBoard files and
checkpoints, resumes, and sweeps."""

import re
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# Smaller batches than the tuned example: these tests check plumbing, not learning.
FAST = '{"train_batch_size_per_learner": 500, "minibatch_size": 250, "num_epochs": 1}'


def trial_dirs(storage: Path, experiment: str) -> list[Path]:
    return sorted(p for p in (storage / experiment).iterdir() if p.is_dir())


def test_train_file_progress_tensorboard_checkpoint_and_restore(cli, tmp_path):
    storage = tmp_path / "results"
    first = cli("train", "file", "tuned_examples/ppo_cartpole.yaml", "--stop",
                '{"training_iteration": 2}', "--config", FAST, "--storage-path", str(storage))
    assert first.returncode == 0, first.stdout + first.stderr
    assert re.search(r"iter 1 \| return [\d.]+ .*env-steps/s", first.stdout)
    assert "iter 2 |" in first.stdout and "iter 3 |" not in first.stdout
    [trial] = trial_dirs(storage, "cartpole-ppo")
    assert list(trial.glob("events.out.tfevents.*")), "no TensorBoard files"
    checkpoints = list(trial.glob("checkpoint_*"))
    assert checkpoints and (checkpoints[0] / "rllib_checkpoint.json").exists()
    assert f"checkpoint: {checkpoints[0]}" in first.stdout

    resumed = cli("train", "file", "tuned_examples/ppo_cartpole.yaml", "--stop",
                  '{"training_iteration": 3}', "--config", FAST, "--storage-path", str(storage),
                  "--restore", str(checkpoints[0]))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "iter 3 |" in resumed.stdout
    assert "iter 1 |" not in resumed.stdout and "iter 2 |" not in resumed.stdout
    assert "TERMINATED after 3 iterations" in resumed.stdout


def test_grid_search_makes_two_trials(cli, tmp_path):
    experiment = tmp_path / "sweep.yaml"
    experiment.write_text(textwrap.dedent("""
        sweep:
          run: PPO
          env: CartPole-v1
          stop: {training_iteration: 1}
          config:
            num_env_runners: 0
            train_batch_size_per_learner: 200
            minibatch_size: 100
            num_epochs: 1
            lr: {grid_search: [1e-3, 1e-4]}
    """))
    storage = tmp_path / "results"
    done = cli("train", "file", str(experiment), "--storage-path", str(storage))
    assert done.returncode == 0, done.stdout + done.stderr
    trials = trial_dirs(storage, "sweep")
    assert len(trials) == 2
    assert {p.name.split("lr=")[1][:6] for p in trials} == {"0.0010", "0.0001"}
    assert done.stdout.count("TERMINATED after 1 iterations") == 2


def test_quick_run_from_flags(cli, tmp_path):
    done = cli("train", "--algo", "PPO", "--env", "CartPole-v1", "--stop",
               '{"training_iteration": 1}', "--config",
               '{"num_env_runners": 0, "train_batch_size_per_learner": 200, '
               '"minibatch_size": 100}', "--storage-path", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "iter 1 |" in done.stdout
    assert len(trial_dirs(tmp_path, "PPO-CartPole-v1")) == 1


def test_cli_error_is_one_paragraph_and_nonzero(cli, tmp_path):
    done = cli("train", "file", str(tmp_path / "missing.yaml"))
    assert done.returncode == 2
    assert done.stderr.strip().startswith("rllib: error:") and "Traceback" not in done.stderr
