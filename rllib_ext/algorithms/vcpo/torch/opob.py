"""The exact OPOB gradient of a micro-batch of whole groups, by two routes (Ray-free).

For trajectory ``i``: ``g_i = grad_theta sum_t m_it logp_it`` (its score function; ``m`` is the
response mask times per-token weights, if the correction has them), ``w_i`` the weight the
update applies, ``R_i`` its reward. Per group ``G``:
``b*_G = sum w_i^2 ||g_i||^2 R_i / sum w_i^2 ||g_i||^2`` (:func:`losses.opob_baseline`) and the
gradient added to ``p.grad`` is ``-(1/N) sum_i (R_i - b*_G) / sigma_G * w_i g_i``
(``N`` the normaliser, the whole batch's ``B x R``; groups with ``sigma_G <= eps`` add nothing).
Everything is group-local, so micro-batches of whole groups give the one-shot gradient exactly.

* :func:`one_shot_accumulate`: one forward with activation capture and one backward for the
  whole micro-batch (:class:`~.per_sample.PerSampleGradients`); cost over a plain step: the
  per-sample norms (Gram matrices or per-sample products, planned per layer) plus the head's
  recomputation. Memory: the captured activations and output gradients of the micro-batch.
* :func:`loop_accumulate`: the reference's route, one forward + backward per trajectory; per
  group two float32 accumulators ``S_R = sum w_i R_i g_i`` and ``S_1 = sum w_i g_i``
  (``torch._foreach`` ops), folded into ``p.grad`` at the group's end as
  ``-(1/(N sigma)) (S_R - b* S_1)``. Cost over plain steps on the same one-row micro-batches:
  one norm and two scaled adds over the parameters per trajectory; memory: three
  parameter-sized float32 buffers (the row's gradient and the two accumulators) and one row's
  activations. It works with gradient checkpointing (plain autograd).

Both take ``terms(rows, logp)``: the detached per-token log-probs of some rows -> their score
mask ``m`` and applied weights ``w`` (the correction: computed from each row's own log-probs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from rllib_ext.algorithms.vcpo import losses
from rllib_ext.algorithms.vcpo.torch.per_sample import (
    PerSampleGradients,
    RowClasses,
    score_objective,
)
from rllib_ext.algorithms.vcpo.torch.per_sample.modules import trainable_named_parameters
from rllib_ext.algorithms.vcpo.torch.per_sample.params import accumulate_into_grad


@dataclasses.dataclass(frozen=True)
class RowTerms:
    """What the correction makes of some rows' log-probs."""

    score_mask: torch.Tensor  # [b, R]: response mask x per-token weights
    weights: torch.Tensor  # [b]: the weights the update applies


Terms = Callable[[torch.Tensor, torch.Tensor], RowTerms]  # (rows [b], logp [b, R]) -> terms
# (model, batch) -> logp [b, R], or (logp, entropy); ``head_observer`` keyword when capturing
ForwardFn = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class OPOBGradientResult:
    """What one OPOB gradient computation found, per trajectory (``[B]`` / ``[B, R]``)."""

    grad_sq_norms: torch.Tensor
    baselines: torch.Tensor
    advantages: torch.Tensor
    weights: torch.Tensor
    logp: torch.Tensor  # detached
    entropy: torch.Tensor | None


def split_output(out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    return out if isinstance(out, tuple) else (out, None)


def batch_rows(batch: Any, rows: list[int], size: int, path: str = "batch") -> Any:
    """Rows ``rows`` (kept as a batch) of every tensor in a (nested) dict/list/tuple batch."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0 or batch.shape[0] != size:
            raise ValueError(
                f"{path} has shape {tuple(batch.shape)}; every tensor of the batch must have "
                f"the batch size B={size} as dim 0"
            )
        if len(rows) == 1:
            return batch[rows[0] : rows[0] + 1]
        return batch[torch.tensor(rows, device=batch.device)]
    if isinstance(batch, Mapping):
        return {k: batch_rows(v, rows, size, f"{path}[{k!r}]") for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(batch_rows(v, rows, size, f"{path}[{j}]") for j, v in enumerate(batch))
    return batch


def _opob_result(norms, rewards, weights, group_ids, logp, entropy, eps, baseline_eps):
    norms_r = norms.to(rewards.dtype)
    return OPOBGradientResult(
        grad_sq_norms=norms,
        baselines=losses.opob_baseline(rewards, weights, norms_r, group_ids, eps=baseline_eps),
        advantages=losses.opob_advantages(rewards, weights, norms_r, group_ids, eps=eps,
                                          baseline_eps=baseline_eps),
        weights=weights, logp=logp, entropy=entropy)


def one_shot_accumulate(psg: PerSampleGradients, forward_fn: ForwardFn, batch: Any,
                        rewards: torch.Tensor, group_ids: torch.Tensor, terms: Terms,
                        normalizer: float, eps: float = 1e-6, baseline_eps: float = 1e-20
                        ) -> OPOBGradientResult:
    """Adds the micro-batch's OPOB gradient (whole groups) into ``p.grad``, by one forward and
    one backward with per-sample gradients (see the module docstring)."""
    with psg.capture():
        logp, entropy = split_output(forward_fn(psg.model, batch, head_observer=psg))
    rows = torch.arange(logp.shape[0], device=logp.device)
    try:
        row_terms = terms(rows, logp.detach())
        classes = opob_classes(rewards, group_ids, row_terms.weights, eps)
        norms = psg.backward(logp, row_terms.score_mask, classes)
    except BaseException:
        psg.release()
        raise
    result = _opob_result(norms, rewards, row_terms.weights, group_ids, logp.detach(),
                          entropy, eps, baseline_eps)
    values = torch.zeros(classes.count, dtype=result.advantages.dtype,
                         device=result.advantages.device)
    member = classes.index >= 0
    values[classes.index[member]] = -result.advantages[member] / normalizer
    psg.accumulate_grads(class_values=values)
    return result


def opob_classes(rewards: torch.Tensor, group_ids: torch.Tensor, weights: torch.Tensor,
                 eps: float) -> RowClasses:
    """OPOB's coefficients ``c_i = w_i (R_i - b*_G) / (-N sigma_G)`` as ``w_i`` times a value
    per (group, reward) class, known before the norms (groups with ``sigma_G <= eps`` add
    nothing: class -1)."""
    sigma = losses.group_reward_std(rewards, group_ids)
    keys: dict[tuple[int, float], int] = {}
    index = [keys.setdefault((g, r), len(keys)) if s > eps else -1 for g, r, s in
             zip(group_ids.tolist(), rewards.tolist(), sigma.tolist(), strict=True)]
    return RowClasses.of(weights, index)


def loop_accumulate(model: nn.Module, forward_fn: ForwardFn, batch: Any, rewards: torch.Tensor,
                    group_ids: torch.Tensor, terms: Terms, normalizer: float,
                    eps: float = 1e-6, baseline_eps: float = 1e-20) -> OPOBGradientResult:
    """Adds the OPOB gradient of the batch (whole groups) into ``p.grad``, one trajectory at a
    time with two float32 accumulators per group (see the module docstring)."""
    size = rewards.shape[0]
    params = [p for _, p in trainable_named_parameters(model)]
    norms = torch.zeros(size, dtype=torch.float64, device=rewards.device)
    weights = torch.zeros(size, dtype=rewards.dtype, device=rewards.device)
    logps, entropies = [None] * size, [None] * size
    sum_rg = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    sum_g = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for gid in torch.unique(group_ids).tolist():
        rows = (group_ids == gid).nonzero().flatten().tolist()
        torch._foreach_zero_(sum_rg)
        torch._foreach_zero_(sum_g)
        for i in rows:
            logp, entropy = split_output(forward_fn(model, batch_rows(batch, [i], size)))
            row_terms = terms(torch.tensor([i], device=logp.device), logp.detach())
            grads = torch.autograd.grad(score_objective(logp, row_terms.score_mask), params,
                                        allow_unused=True, materialize_grads=True)
            norms[i] = torch.stack(torch._foreach_norm(grads)).double().square().sum()
            weights[i] = row_terms.weights[0]
            logps[i], entropies[i] = logp.detach(), entropy
            w = float(row_terms.weights[0])
            grads = [g.float() for g in grads]
            torch._foreach_add_(sum_rg, grads, alpha=w * float(rewards[i]))
            torch._foreach_add_(sum_g, grads, alpha=w)
            del grads
        local = torch.zeros(len(rows), dtype=torch.long, device=rewards.device)
        baseline = float(losses.opob_baseline(rewards[rows], weights[rows],
                                              norms[rows].to(rewards.dtype), local,
                                              eps=baseline_eps)[0])
        sigma = float(losses.group_reward_std(rewards[rows], local)[0])
        if sigma <= eps:
            continue
        torch._foreach_add_(sum_rg, sum_g, alpha=-baseline)
        torch._foreach_mul_(sum_rg, -1.0 / (float(normalizer) * sigma))
        for p, grad in zip(params, sum_rg, strict=True):  # (the accumulators are reused)
            accumulate_into_grad(p, grad.to(p.dtype, copy=True) if p.grad is None else grad)
    logp = torch.cat(logps)
    entropy = None if entropies[0] is None else torch.cat(entropies)
    return _opob_result(norms, rewards, weights, group_ids, logp, entropy, eps, baseline_eps)


def fixed_terms(mask: torch.Tensor, weights: torch.Tensor) -> Terms:
    """``terms`` for a given score mask ``[B, R]`` and weights ``[B]`` (tests, benchmarks)."""
    return lambda rows, logp: RowTerms(mask[rows], weights[rows])


def score_grad_sq_norms_loop(model: nn.Module, forward_fn: ForwardFn, batch: Any,
                             mask: torch.Tensor) -> torch.Tensor:
    """``||g_i||^2`` for each trajectory by one forward + backward per trajectory, ``[B]`` float64
    (ground truth): ``g_i = grad_theta sum_t mask_it * logp_it`` over all trainable parameters;
    ``forward_fn(model, rows)`` is called on row ``i`` of every tensor in ``batch`` (dim 0 =
    batch). Leaves ``.grad`` untouched."""
    params = [p for _, p in trainable_named_parameters(model)]
    size = mask.shape[0]
    out = torch.zeros(size, dtype=torch.float64)
    for i in range(size):
        logp, _ = split_output(forward_fn(model, batch_rows(batch, [i], size)))
        grads = torch.autograd.grad(score_objective(logp, mask[i : i + 1]), params,
                                    allow_unused=True, materialize_grads=True)
        out[i] = sum(g.double().pow(2).sum() for g in grads)
    return out
