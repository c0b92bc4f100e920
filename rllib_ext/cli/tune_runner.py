"""Run validated experiments as Ray Tune trials (result dirs, TensorBoard, checkpoints).

Trials run through ``tune.run``, the engine under ``tune.Tuner``: it is the Tune entry point
that can seed a *new* trial from an existing checkpoint (``restore=``), which `--restore`
needs; Tune then restores the Algorithm, whose state carries the iteration counter, so a
resumed run continues at the next iteration. Tune's default logger callbacks write
``progress.csv``, ``result.json`` and tfevents files into every trial directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rllib_ext import registry
from rllib_ext.cli.errors import CLIError
from rllib_ext.cli.experiment import Experiment
from rllib_ext.cli.run_log import RunLog

DEFAULT_STORAGE_PATH = os.path.expanduser("~/ray_results")

# Markers of an RLlib (new API stack) checkpoint directory.
_CHECKPOINT_MARKERS = ("rllib_checkpoint.json", "algorithm_state.pkl", "class_and_ctor_args.pkl")


@dataclass
class TrialOutcome:
    name: str
    status: str
    iterations: int
    trial_dir: str
    checkpoint: str | None
    error_file: str | None


def find_checkpoint(path: str, flag: str = "--restore") -> str:
    """Return the checkpoint directory named by ``path`` (given as ``flag``).

    ``path`` may be a checkpoint directory itself, or a trial/experiment directory, in which case
    the newest ``checkpoint_*`` directory below it is used.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise CLIError("checkpoint path not found.", source=str(path), key=flag,
                       fix="pass a checkpoint directory (printed at the end of a run) or the "
                           "trial directory that holds checkpoint_* folders.")
    if any((root / marker).exists() for marker in _CHECKPOINT_MARKERS):
        return str(root.resolve())
    candidates = [p for p in root.rglob("checkpoint_*")
                  if p.is_dir() and any((p / m).exists() for m in _CHECKPOINT_MARKERS)]
    if not candidates:
        raise CLIError("no RLlib checkpoint found at or below this path.", source=str(path),
                       key=flag,
                       fix="run with --checkpoint-freq N (checkpoints are also written at the "
                           "end of every run) and pass one of the checkpoint_* directories.")
    return str(max(candidates, key=lambda p: p.stat().st_mtime).resolve())


def init_ray(run_log: RunLog, num_cpus: int | None = None) -> None:
    """Start the local Ray instance with the run's output going through ``run_log``."""
    import ray

    # Relative paths in configs (datasets, model dirs) must keep meaning the user's directory.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    if run_log.verbose == 0:
        # Tune's newer console output ignores verbose=0; our ProgressPrinter replaces it.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 logging_level="WARNING",
                 runtime_env={"worker_process_setup_hook":
                              "rllib_ext.cli.run_log.setup_worker_logging"})
    run_log.attach()


def run_experiment(experiment: Experiment, run_log: RunLog, *, storage_path: str | None = None,
                   checkpoint_freq: int | None = None, restore: str | None = None,
                   num_samples: int | None = None, loggers: tuple[str, ...] = ()
                   ) -> list[TrialOutcome]:
    from ray import tune

    from rllib_ext.cli.loggers import TensorBoardLogger, logger_callbacks
    from rllib_ext.cli.progress import ProgressPrinter

    registry.register_project_envs()
    storage = os.path.abspath(os.path.expanduser(
        storage_path or experiment.storage_path or DEFAULT_STORAGE_PATH))
    run_log.start_experiment(os.path.join(storage, experiment.name))
    frequency = experiment.checkpoint_freq if checkpoint_freq is None else checkpoint_freq
    analysis = tune.run(
        experiment.algo_class,
        name=experiment.name,
        config=experiment.param_space,
        stop=experiment.stop or None,
        num_samples=experiment.num_samples if num_samples is None else num_samples,
        storage_path=storage,
        checkpoint_config=tune.CheckpointConfig(
            checkpoint_frequency=frequency, checkpoint_at_end=experiment.checkpoint_at_end),
        restore=restore,
        callbacks=[ProgressPrinter(getattr(experiment.algo_class, "progress_metrics", ())),
                   run_log, TensorBoardLogger(),
                   *logger_callbacks(list(loggers), experiment.name, storage)],
        verbose=min(run_log.verbose, 3),
        raise_on_failed_trial=False,
    )
    outcomes = []
    for trial in analysis.trials:
        checkpoint = trial.checkpoint.path if trial.checkpoint else None
        trial_dir = trial.path or ""
        error_file = os.path.join(trial_dir, "error.txt") if trial.status == "ERROR" else None
        outcomes.append(TrialOutcome(
            name=str(trial), status=trial.status,
            iterations=int(trial.last_result.get("training_iteration", 0) or 0),
            trial_dir=trial_dir, checkpoint=checkpoint, error_file=error_file))
    return outcomes
