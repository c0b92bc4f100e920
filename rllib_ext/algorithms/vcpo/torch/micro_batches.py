"""Micro-batches inside one optimiser step, and the route each takes (Ray-free).

Every correction and both baselines are group-local, and only the ESS learning-rate scale needs
the whole batch (it is applied at the step), so micro-batching is exact:

* ``plain`` (GRPO baseline: every coefficient is known after the row's own forward): any
  consecutive rows, up to the token budget; one forward + ``loss.backward()`` each;
* ``one_shot`` (OPOB, ``opob.one_shot_accumulate``): whole groups, as many as fit the budget;
* ``loop`` (OPOB, ``opob.loop_accumulate``): one group, its rows one at a time; taken by a group
  that does not fit the budget alone, by every group with ``opob_grad_norms="loop"``, and with
  gradient checkpointing (the one-shot route's hooks cannot run under it).

The budget counts padded tokens: rows x the longest row of the micro-batch (each micro-batch is
trimmed to its own longest row).
"""

from __future__ import annotations

import dataclasses
import math

import torch

ROUTES = ("plain", "one_shot", "loop")
# A CPU learner's default budget: the tiny recipe's batch (128 rows of ~20 tokens) is one
# micro-batch, a 30M-parameter model's 64 x 512-token batch is two.
CPU_MICRO_BATCH_TOKENS = 16384
# Share of the free GPU memory the activations of one micro-batch may take.
GPU_MEMORY_SHARE = 0.5


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    rows: tuple[int, ...]
    route: str
    tokens: int  # padded: rows x longest


def plan_micro_batches(lengths: list[int], group_ids: list[int], budget_tokens: int | None,
                       opob_route: str | None) -> list[MicroBatch]:
    """Split rows (``lengths[i]`` tokens each) into micro-batches of at most ``budget_tokens``
    padded tokens (None: no limit). ``opob_route``: None for the plain route (GRPO baseline),
    else ``"one_shot"`` or ``"loop"`` (see the module docstring)."""
    budget = math.inf if budget_tokens is None else budget_tokens
    if opob_route is None:
        return _pack([(i,) for i in range(len(lengths))], lengths, budget, "plain")
    groups: dict[int, list[int]] = {}
    for row, group in enumerate(group_ids):
        groups.setdefault(group, []).append(row)
    if opob_route == "loop":
        return [MicroBatch(tuple(rows), "loop", _tokens(rows, lengths)) for rows in groups.values()]
    if opob_route != "one_shot":
        raise ValueError(f"opob_route must be None, 'one_shot' or 'loop'; got {opob_route!r}")
    fitting = [tuple(rows) for rows in groups.values() if _tokens(rows, lengths) <= budget]
    too_big = [MicroBatch(tuple(rows), "loop", _tokens(rows, lengths))
               for rows in groups.values() if _tokens(rows, lengths) > budget]
    return _pack(fitting, lengths, budget, "one_shot") + too_big


def _tokens(rows, lengths) -> int:
    return len(rows) * max((lengths[i] for i in rows), default=0)


def _pack(units: list[tuple[int, ...]], lengths: list[int], budget: float, route: str
          ) -> list[MicroBatch]:
    """Consecutive units (rows or groups) into micro-batches within the budget (at least one
    unit each)."""
    out, current, longest = [], [], 0
    for unit in units:
        unit_longest = max(lengths[i] for i in unit)
        if current and (len(current) + len(unit)) * max(longest, unit_longest) > budget:
            out.append(MicroBatch(tuple(current), route, len(current) * longest))
            current, longest = [], 0
        current.extend(unit)
        longest = max(longest, unit_longest)
    if current:
        out.append(MicroBatch(tuple(current), route, len(current) * longest))
    return out


def default_micro_batch_tokens(model, device: torch.device, dtype: torch.dtype) -> int:
    """The device's default token budget: 16384 on a CPU; on a GPU, half of the memory left
    once the float32 gradients and AdamW's two states exist (three times the parameters'
    bytes, taken off the free memory now), over an estimate of the activation bytes per token
    (twice a Llama-style layer's saved activations, ``(16 hidden + 6 intermediate)`` elements
    per layer, for the one-shot route's kept output gradients). An estimate: set
    ``learner_micro_batch_tokens`` to override."""
    if device.type != "cuda":
        return CPU_MICRO_BATCH_TOKENS
    free, _ = torch.cuda.mem_get_info(device)
    free -= 3 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    config = model.config
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    per_token = (2 * config.num_hidden_layers * (16 * hidden + 6 * intermediate)
                 * torch.finfo(dtype).bits // 8)
    return max(1, int(max(free, 0) * GPU_MEMORY_SHARE) // per_token)
