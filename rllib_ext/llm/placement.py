"""GPU layouts of an LLM run: where the vLLM engines and the learner go, chosen from the GPUs
that are visible, decided before any resource is requested.

    separate  each env runner's engine on a GPU of its own, the learner on another
              (num_env_runners + 1 GPUs; tuned_examples/vcpo_math.yaml)
    shared    the engines and the learner on one GPU, with a fixed memory split: the engines
              take ``shared_gpu_engine_memory`` of it (vLLM's gpu_memory_utilization), the
              learner the rest (tuned_examples/vcpo_math_1gpu.yaml). The engine keeps its
              memory while the learner steps: VCPO generates while it trains, so releasing it
              (vLLM's sleep mode) would stop generation during every step.
    auto      separate if num_env_runners + 1 GPUs are visible, else shared on one GPU
    cpu       no GPU (the default; num_gpus_per_* stay as configured)

"Visible" is what Ray will hand out: its (logical) GPU resources once Ray runs (the same count
on the driver and inside a trial), else the CUDA devices of this process. A layout that needs
more GPUs than are visible is refused with the count and the fix, so a trial never waits for
a GPU that does not exist.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

LAYOUTS = ("cpu", "separate", "shared", "auto")
DEFAULT_SHARED_ENGINE_MEMORY = 0.4
# The learner's share of the GPU in the shared layout (Ray's bookkeeping; memory is split by
# the engines' gpu_memory_utilization).
SHARED_LEARNER_GPU = 0.5

logger = logging.getLogger(__name__)
_announced: set[str] = set()


class PlacementError(ValueError):
    """The requested layout does not fit the visible GPUs."""


@dataclass(frozen=True)
class Placement:
    layout: str  # "cpu", "separate" or "shared" (never "auto")
    gpus_per_env_runner: float
    gpus_per_learner: float
    engine_memory_fraction: float | None  # vLLM gpu_memory_utilization per engine, if set

    def total_gpus(self, num_env_runners: int) -> float:
        return self.gpus_per_env_runner * max(1, num_env_runners) + self.gpus_per_learner


def visible_gpus() -> int:
    """GPUs a run can be given: Ray's GPU resources if Ray is running, else CUDA devices."""
    import ray

    if ray.is_initialized():
        return int(ray.cluster_resources().get("GPU", 0))
    import torch

    return torch.cuda.device_count()


def plan_placement(layout: str, *, visible: int, num_env_runners: int,
                   shared_engine_memory: float = DEFAULT_SHARED_ENGINE_MEMORY) -> Placement:
    """The placement of ``layout`` on ``visible`` GPUs; raises :class:`PlacementError` naming
    what is missing and the fix."""
    engines = max(1, num_env_runners)
    if layout == "cpu":
        return Placement("cpu", 0, 0, None)
    if layout not in LAYOUTS:
        raise PlacementError(f"gpu_layout must be one of {LAYOUTS}, got {layout!r}.")
    if visible == 0:
        raise PlacementError(
            f"gpu_layout '{layout}' needs GPUs but no CUDA device is visible (and Ray has no "
            "GPU resources). Fix: run it on a GPU machine (make venv-gpu), or on CPU use "
            "tuned_examples/vcpo_math_tiny.yaml.")
    needed = engines + 1
    if layout == "auto":
        layout = "separate" if visible >= needed else "shared"
        _announce(f"gpu_layout auto: {visible} GPU(s) visible -> '{layout}' ("
                  + ("engine | learner on GPUs of their own)." if layout == "separate" else
                     f"{engines} engine(s) and the learner share one GPU, the engines holding "
                     f"{shared_engine_memory:.0%} of its memory)."))
    if layout == "separate":
        if visible < needed:
            raise PlacementError(
                f"gpu_layout 'separate' puts each of the {engines} vLLM engine(s) and the "
                f"learner on a GPU of its own: {needed} GPUs, but {visible} visible. Fix: on "
                "one GPU use tuned_examples/vcpo_math_1gpu.yaml (gpu_layout: shared), or set "
                "gpu_layout: auto.")
        return Placement("separate", 1, 1, None)
    if not 0 < shared_engine_memory < 1:
        raise PlacementError(f"shared_gpu_engine_memory must be in (0, 1) (the engines' share "
                             f"of the GPU's memory), got {shared_engine_memory!r}.")
    return Placement("shared", (1 - SHARED_LEARNER_GPU) / engines, SHARED_LEARNER_GPU,
                     shared_engine_memory / engines)


def _announce(message: str) -> None:
    """Log a layout decision once per process (configs are validated several times)."""
    if message not in _announced:
        _announced.add(message)
        logger.warning(message)
