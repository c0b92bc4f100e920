"""Where a run's metrics go: TensorBoard files (always), Weights & Biases or MLflow (on request,
through Ray Tune's own integrations).

TensorBoard groups tags by their first path part. Tune writes every metric as
``ray/tune/<path>``, one group, where RLlib's bookkeeping (timers, step counters, connector
timings, throughput, duplicates of other metrics) sits among what a user reads. Here the tag
is the metric's path in ``result.json`` (``env_runners/accuracy``,
``learners/default_policy/ess_ratio``, ``evaluation/accuracy``, ``vcpo/samples_per_s``), and
the bookkeeping goes under ``plumbing/``. Text results (an LLM run's table of sampled
completions, ``vcpo/completions``) are written as TensorBoard text every
``completions_table_interval`` iterations.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
from ray.tune.logger import TBXLoggerCallback
from ray.tune.result import TRAINING_ITERATION
from ray.tune.utils import flatten_dict

from rllib_ext.cli.errors import CLIError

PLUMBING = "plumbing/"
# Whole groups of RLlib's bookkeeping.
PLUMBING_GROUPS = ("timers/", "perf/", "fault_tolerance/", "env_runner_group/",
                   "learners/__all_modules__/learner_connector")
# Step counters, sizes and duplicates (the optimizer's learning rate and gradient norm repeat
# the algorithm's own), wherever they appear.
PLUMBING_NAMES = (
    "num_env_steps_sampled", "num_env_steps_sampled_lifetime", "num_episodes",
    "num_episodes_lifetime", "num_agent_steps_sampled", "num_agent_steps_sampled_lifetime",
    "num_module_steps_sampled", "num_module_steps_sampled_lifetime", "num_env_steps_trained",
    "num_env_steps_trained_lifetime", "num_module_steps_trained",
    "num_module_steps_trained_lifetime", "num_trainable_parameters",
    "num_non_trainable_parameters", "module_train_batch_size_mean",
    "diff_num_grad_updates_vs_sampler_policy", "weights_seq_no",
    "learner_connector_sum_episodes_length_in", "learner_connector_sum_episodes_length_out",
    "env_to_module_sum_episodes_length_in", "env_to_module_sum_episodes_length_out",
    "gradients_default_optimizer_global_norm", "default_optimizer_learning_rate",
    "num_training_step_calls_per_iteration", "num_generated_tokens_lifetime",
    "iterations_since_restore", "time_since_restore", "timesteps_since_restore", "done",
)
# Not metrics (Tune writes them into every result).
NOT_LOGGED = ("config", "pid", "hostname", "node_ip", "date", "trial_id", "timestamp",
              TRAINING_ITERATION, "time_total_s")
TEXT_RESULTS = ("vcpo/completions",)
DEFAULT_COMPLETIONS_TABLE_INTERVAL = 10
LOGGERS = ("wandb", "mlflow")


def tensorboard_tag(path: str) -> str:
    """The TensorBoard tag of a flattened result path (see the module docstring)."""
    if path.startswith(PLUMBING_GROUPS) or "_throughput" in path \
            or path.rsplit("/", 1)[-1] in PLUMBING_NAMES:
        return PLUMBING + path
    return path


class TensorBoardLogger(TBXLoggerCallback):
    """Tune's TensorBoard writer with the tags of :func:`tensorboard_tag` and text results."""

    def log_trial_result(self, iteration: int, trial, result: dict):
        if trial not in self._trial_writer:
            self.log_trial_start(trial)
        writer = self._trial_writer[trial]
        step = result[TRAINING_ITERATION]
        interval = (trial.config or {}).get("completions_table_interval",
                                            DEFAULT_COMPLETIONS_TABLE_INTERVAL)
        scalars = {}
        flat = flatten_dict({k: v for k, v in result.items() if k not in NOT_LOGGED},
                            delimiter="/")
        for path, value in flat.items():
            tag = tensorboard_tag(path)
            if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                if math.isfinite(value):
                    scalars[tag] = value
                    writer.add_scalar(tag, value, global_step=step)
            elif path in TEXT_RESULTS:  # the latest of the runners' texts
                texts = [value] if isinstance(value, str) else list(value or [])
                if texts and isinstance(texts[-1], str) and interval and step % interval == 0:
                    writer.add_text(tag, texts[-1], global_step=step)
            elif isinstance(value, (list, np.ndarray)) and len(value) and np.isfinite(
                    np.asarray(value, dtype=float)).all():
                writer.add_histogram(tag, np.asarray(value, dtype=float), global_step=step)
        self._trial_result[trial] = scalars
        writer.flush()


def check_loggers(names: list[str]) -> None:
    """Refuse a --logger whose package is not installed (before anything starts)."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise CLIError(f"--logger {name}: the '{name}' package is not installed.",
                           source="command line", key="--logger",
                           fix=f"pip install 'rllib-ext[{name}]' (or pip install {name}), or "
                               "leave --logger out (TensorBoard files are always written).")


def logger_callbacks(names: list[str], experiment_name: str, storage_path: str) -> list:
    """Tune's integrations for ``--logger``: W&B (project = the experiment; entity, mode and
    key from the usual WANDB_* environment variables) and MLflow (experiment = the
    experiment; tracking URI from MLFLOW_TRACKING_URI, else ``mlruns`` in the storage path)."""
    import os

    callbacks = []
    if "wandb" in names:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=experiment_name))
    if "mlflow" in names:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(
            tracking_uri=os.environ.get("MLFLOW_TRACKING_URI")
            or "file://" + os.path.join(storage_path, "mlruns"),
            experiment_name=experiment_name))
    return callbacks
