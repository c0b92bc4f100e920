"""One line of progress per training iteration, printed by the driver as Tune reports results."""

from __future__ import annotations

import math
import sys
from typing import Any

from ray.tune import Callback

# (label, result path, format). An Algorithm class may add its own through a class attribute
# `progress_metrics` with the same shape, e.g. VCPO's accuracy or TMF-PG's exploitability.
DEFAULT_PROGRESS_METRICS: tuple[tuple[str, str, str], ...] = (
    ("return", "env_runners/episode_return_mean", "{:.3g}"),
)


def lookup(result: dict, path: str) -> Any:
    """``lookup(r, "a/b/c")`` is ``r["a"]["b"]["c"]`` or None when any part is missing."""
    value: Any = result
    for part in path.split("/"):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def first_module_loss(result: dict) -> float | None:
    """The total loss of the first RLModule in ``result["learners"]`` (if any)."""
    learners = result.get("learners") or {}
    for module_id, stats in learners.items():
        if not module_id.startswith("__") and isinstance(stats, dict) and "total_loss" in stats:
            return stats["total_loss"]
    return None


def format_progress_line(trial_name: str, result: dict,
                         metrics: tuple[tuple[str, str, str], ...]) -> str:
    parts = [f"[{trial_name}] iter {result.get('training_iteration', '?')}"]
    for label, path, fmt in metrics:
        value = lookup(result, path)
        if isinstance(value, (int, float)) and math.isfinite(value):
            parts.append(f"{label} {fmt.format(value)}")
    loss = first_module_loss(result)
    if isinstance(loss, (int, float)):
        parts.append(f"loss {loss:.4g}")
    seconds = result.get("time_this_iter_s")
    steps = lookup(result, "env_runners/num_env_steps_sampled")
    if isinstance(steps, (int, float)) and seconds:
        parts.append(f"{steps / seconds:,.0f} env-steps/s")
    if seconds is not None:
        parts.append(f"{seconds:.1f}s/iter")
    return " | ".join(parts)


class ProgressPrinter(Callback):
    """Tune callback: prints `format_progress_line` for every reported result."""

    def __init__(self, extra_metrics: tuple[tuple[str, str, str], ...] = (), stream=None):
        self.metrics = DEFAULT_PROGRESS_METRICS + tuple(extra_metrics)
        self.stream = stream

    def on_trial_result(self, iteration, trials, trial, result, **info):
        stream = self.stream or sys.stdout
        print(format_progress_line(str(trial), result, self.metrics), file=stream, flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        stream = self.stream or sys.stdout
        print(f"[{trial}] FAILED; see {trial.path}/error.txt", file=stream, flush=True)
