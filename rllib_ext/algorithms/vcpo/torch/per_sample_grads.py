"""Exact per-trajectory score-function gradients for OPOB.

For trajectory ``i`` of a batch, ``g_i = grad_theta sum_t mask_it * logp_it`` (its score
function; ``logp [B, T]`` comes from the caller's ``forward_fn(model, batch)``). OPOB needs the
squared norms ``||g_i||^2`` before it can weight the gradient ``sum_i c_i g_i``. Two exact routes:

* the loop (reference) route, :func:`score_grad_sq_norms_loop` and :func:`loop_accumulate`: one
  forward + backward per trajectory (micro-batch of 1); ground truth, and the config-selectable
  "exact" route of the reference implementation (two accumulators per group, no second pass);
* :class:`PerSampleGradients`: one forward with hooks plus one backward pass that computes only
  input gradients; the per-trajectory parameter gradients are rebuilt from each layer's
  captured input ``a`` and output gradient ``g`` (rows of a batch do not interact, so row ``i``
  of ``g`` is trajectory ``i``'s output gradient): ``G_i = sum_t g_it a_it^T`` for a weight,
  materialised, or only its norm as a "ghost norm" ``sum_{t,s} (a_it . a_is)(g_it . g_is)``.

Which is cheaper (measured in ``bench/vcpo_per_sample_grads.py``): with short rows (``L``
tokens) relative to the layer widths, as in the CPU models of this project, the one-pass route
costs a fraction of one extra backward while the loop costs ``B`` small passes (10-40x a plain
step on CPU). With rows much longer than the widths (``L >> d_in d_out / (d_in + d_out)``) and
``B x P`` too large to keep, the one-pass route needs the weight-gradient matmul twice (once for
the norms, once for the weighted sum), about +33% FLOPs over a plain step, whereas the loop's
micro-batches of one long row are already efficient GEMMs: there the loop can be the cheaper
exact route.

Assumptions of :class:`PerSampleGradients` (checked where checkable, with a clear error):
the batch dimension is dim 0 of every hooked module's input and output; trajectories do not
interact inside the model (no batch norm, no cross-row ops); every trainable parameter belongs to
an ``nn.Linear``, an ``nn.Embedding`` or an elementwise-affine module ``y = weight * h(x) + bias``
(RMSNorm / LayerNorm style, verified numerically at construction); no hooked tensor is modified
in place after the hook saw it; no gradient checkpointing (it would re-run the hooks).
Padding needs no special care: a padded position whose output reaches no real log-prob has an
output gradient of exactly 0, so it adds nothing - as in autograd. Unlike autograd, the work
skips such rows where it can see them for free: trailing positions whose output gradient is 0
in every row leave the norm computations, and rows ``(i, t)`` with a zero output gradient (the
diagonal of the ghost route's Gram matrix) leave the weighted sum; in a causal LM that is the
last position and the right padding, ~20% of the rows of the tiny model's batches.
``nn.Embedding.padding_idx`` rows get no gradient, as in autograd.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from rllib_ext.algorithms.vcpo import losses

ForwardFn = Callable[[nn.Module, Any], torch.Tensor]

STRATEGIES = ("auto", "materialize", "chunked", "ghost")

# Elements of one [chunk, L, L] Gram block in a ghost norm (bounds its temporary memory).
_GRAM_CHUNK_ELEMENTS = 1 << 26
# Route choice: cost of moving one tensor element through memory, in floating-point operations
# (a rough CPU/GPU balance; only the order of magnitude matters for the choice).
_MEMORY_COST = 8


class UnsupportedModuleError(TypeError):
    """A module holds trainable parameters whose per-sample gradients we cannot compute exactly."""


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _score_objective(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_i sum_t mask_it * logp_it``; masked positions excluded with ``where``."""
    if logp.dim() != 2:
        raise ValueError(f"forward_fn must return logp of shape [B, T]; got {tuple(logp.shape)}")
    if mask.shape != logp.shape:
        raise ValueError(
            f"mask must have the shape of logp {tuple(logp.shape)}; got {tuple(mask.shape)}"
        )
    keep = mask != 0
    weight = mask.detach().to(logp.dtype)
    return torch.where(keep, weight * logp, torch.zeros_like(logp)).sum()


def _trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    return params


def _batch_row(batch: Any, i: int, size: int, path: str = "batch") -> Any:
    """Row ``i`` (kept as a batch of 1) of every tensor in a (nested) dict/list/tuple batch."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0 or batch.shape[0] != size:
            raise ValueError(
                f"{path} has shape {tuple(batch.shape)}; every tensor of the batch must have "
                f"the batch size B={size} as dim 0 for the per-trajectory loop"
            )
        return batch[i : i + 1]
    if isinstance(batch, Mapping):
        return {k: _batch_row(v, i, size, f"{path}[{k!r}]") for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_batch_row(v, i, size, f"{path}[{j}]") for j, v in enumerate(batch))
    return batch


def _accumulate_into_grad(param: nn.Parameter, grad: torch.Tensor) -> None:
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------------------------
# Route A: one forward + backward per trajectory (reference / ground truth)
# --------------------------------------------------------------------------------------------


def _per_trajectory_score_grads(
    model: nn.Module, forward_fn: ForwardFn, batch: Any, mask: torch.Tensor, rows: list[int]
) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """Yield ``(i, g_i)`` for ``i`` in ``rows``; ``g_i`` lists one tensor per trainable param."""
    params = [p for _, p in _trainable_named_parameters(model)]
    size = mask.shape[0]
    for i in rows:
        logp = forward_fn(model, _batch_row(batch, i, size))
        objective = _score_objective(logp, mask[i : i + 1])
        grads = torch.autograd.grad(objective, params, allow_unused=True, materialize_grads=True)
        yield i, list(grads)


def _sq_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    return sum(g.double().pow(2).sum() for g in grads)


def score_grad_sq_norms_loop(
    model: nn.Module, forward_fn: ForwardFn, batch: Any, mask: torch.Tensor
) -> torch.Tensor:
    """``||g_i||^2`` for each trajectory by one forward + backward per trajectory, ``[B]`` float64.

    ``g_i = grad_theta sum_t mask_it * logp_it`` over all trainable parameters; ``forward_fn`` is
    called on row ``i`` of every tensor in ``batch`` (dim 0 = batch). Leaves ``.grad`` untouched.
    """
    out = torch.zeros(mask.shape[0], dtype=torch.float64)
    for i, grads in _per_trajectory_score_grads(model, forward_fn, batch, mask, list(range(mask.shape[0]))):
        out[i] = _sq_norm(grads)
    return out


@dataclasses.dataclass(frozen=True)
class OPOBGradientResult:
    """What one OPOB gradient computation found, per trajectory (``[B]`` each)."""

    grad_sq_norms: torch.Tensor
    baselines: torch.Tensor
    advantages: torch.Tensor


def loop_accumulate(
    model: nn.Module,
    forward_fn: ForwardFn,
    batch: Any,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    weights: torch.Tensor,
    group_ids: torch.Tensor,
    normalizer: float,
    eps: float = 1e-6,
    baseline_eps: float = 1e-20,
) -> OPOBGradientResult:
    """The reference's exact OPOB route: adds the OPOB policy gradient into ``p.grad``.

    One forward + backward per trajectory; per group ``g`` two accumulators
    ``S_R = sum_{i in g} R_i w_i g_i`` and ``S_1 = sum_{i in g} w_i g_i`` plus the norms
    ``||g_i||^2``; at the group's end ``b*_g`` (:func:`losses.opob_baseline`) and the group std
    ``sigma_g`` are known and ``p.grad += -(1/normalizer) (1/sigma_g) (S_R - b*_g S_1)`` (groups
    with ``sigma_g <= eps`` add nothing). That is the gradient of
    ``losses.policy_gradient_loss(logp, mask, A * w, normalizer)`` with
    ``A = losses.opob_advantages(rewards, w, norms, group_ids, eps)``; ``weights`` are the
    truncated IS weights ``w``. Memory: two parameter-sized accumulators.
    """
    size = mask.shape[0]
    params = [p for _, p in _trainable_named_parameters(model)]
    norms = torch.zeros(size, dtype=torch.float64)
    for gid in torch.unique(group_ids).tolist():
        rows = (group_ids == gid).nonzero().flatten().tolist()
        sum_rg = [torch.zeros_like(p, dtype=_accumulation_dtype(p.dtype)) for p in params]
        sum_g = [torch.zeros_like(p, dtype=_accumulation_dtype(p.dtype)) for p in params]
        for i, grads in _per_trajectory_score_grads(model, forward_fn, batch, mask, rows):
            norms[i] = _sq_norm(grads)
            w, rw = float(weights[i]), float(weights[i]) * float(rewards[i])
            for acc_rg, acc_g, g in zip(sum_rg, sum_g, grads, strict=True):
                acc_rg.add_(g, alpha=rw)
                acc_g.add_(g, alpha=w)
        local = torch.zeros(len(rows), dtype=torch.long)
        baseline = float(losses.opob_baseline(
            rewards[rows], weights[rows], norms[rows].to(rewards.dtype), local, eps=baseline_eps
        )[0])
        sigma = float(losses.group_reward_std(rewards[rows], local)[0])
        if sigma <= eps:
            continue
        scale = -1.0 / (float(normalizer) * sigma)
        for p, acc_rg, acc_g in zip(params, sum_rg, sum_g, strict=True):
            _accumulate_into_grad(p, acc_rg.sub_(acc_g, alpha=baseline).mul_(scale))
    norms_r = norms.to(rewards.dtype)
    return OPOBGradientResult(
        grad_sq_norms=norms,
        baselines=losses.opob_baseline(rewards, weights, norms_r, group_ids, eps=baseline_eps),
        advantages=losses.opob_advantages(
            rewards, weights, norms_r, group_ids, eps=eps, baseline_eps=baseline_eps
        ),
    )


# --------------------------------------------------------------------------------------------
# Route B: per-sample gradients from captured activations and output gradients
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Factored:
    """Per-sample gradient ``G_b = sum_t left_bt right_bt^T`` of a ``[rows, cols]`` parameter.

    ``left`` is ``[B, L, rows]``, or ``[B, L]`` int64 row indices (``left_bt = onehot``, the
    embedding case); ``right`` is ``[B, L, cols]``. The output-gradient factor (``left`` of a
    linear layer, ``right`` of an embedding) is zero in every row at positions ``>= active``
    (see :func:`_active_length`), so those add nothing to ``G_b``. ``live``, once a ghost norm
    has seen the output gradient's Gram diagonal, marks the rows ``(b, t < active)`` whose
    output gradient is nonzero; :meth:`compact` then keeps only those rows: ``left`` and
    ``right`` become ``[K, ...]`` (reused buffers) and ``sample[k]`` is row k's trajectory.
    """

    left: torch.Tensor
    right: torch.Tensor
    rows: int
    active: int
    live: torch.Tensor | None = None
    sample: torch.Tensor | None = None

    @property
    def indexed(self) -> bool:
        return not self.left.dtype.is_floating_point

    @property
    def row_count(self) -> int:
        """Rows ``(b, t)`` the weighted sum multiplies."""
        return self.sample.numel() if self.sample is not None else self.right.shape[0] * \
            self.right.shape[1]

    def trimmed(self) -> _Factored:
        """The same ``G_b`` from the first ``active`` positions only (views, no copies): the
        per-sample norm work scales with ``L^2`` (ghost) or ``L`` (materialize, chunked)."""
        if self.active == self.right.shape[1]:
            return self
        return _Factored(self.left[:, : self.active], self.right[:, : self.active], self.rows,
                         self.active)

    def add_into(self, out: torch.Tensor, lo: int, hi: int, first: bool) -> None:
        """``out = G[lo:hi]`` (``first``) or ``out += G[lo:hi]``; ``out`` is ``[hi-lo, rows, cols]``."""
        if not self.indexed:
            left = self.left[lo:hi].transpose(1, 2)
            if first:
                torch.bmm(left, self.right[lo:hi], out=out)
            else:
                out.baddbmm_(left, self.right[lo:hi])
            return
        if first:
            out.zero_()
        count, cols = hi - lo, out.shape[-1]
        offsets = self.rows * torch.arange(count, device=self.left.device)[:, None]
        out.view(count * self.rows, cols).index_add_(
            0, (self.left[lo:hi] + offsets).flatten(), self.right[lo:hi].reshape(-1, cols)
        )

    def compact(self, name: str, workspace: _Workspace) -> None:
        """Keep the live rows of both factors only, copied into reused buffers while the
        output gradient is still in cache: the weighted sum then skips the zero rows (the
        last position and padding, ~20% of the tiny model's rows). A layer input read by
        several layers is gathered once for all of them."""
        rows = workspace.live_rows(self.live, self.right.shape[1])
        grad, data = (self.right, self.left) if self.indexed else (self.left, self.right)
        grad = workspace.gather(f"grad:{name}", grad, rows)
        data = workspace.gather_input(f"input:{name}", data, rows)
        self.left, self.right = (data, grad) if self.indexed else (grad, data)
        self.sample = rows.sample

    def flat(self, cache: _WeightedSumCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(left, right, sample)`` over rows: ``[K, ...]`` each, ``sample[k]`` = trajectory."""
        if self.sample is not None:
            return self.left, self.right, self.sample
        batch, length = self.right.shape[:2]
        left = self.left.reshape(batch * length) if self.indexed else self.left.reshape(
            batch * length, -1)
        return left, self.right.reshape(batch * length, -1), cache.all_rows(batch, length)

    def weighted_sum(self, coefficients: torch.Tensor, cache: _WeightedSumCache
                     ) -> torch.Tensor:
        """``sum_b c_b G_b`` as one matmul over the rows ``(b, t)`` of both factors (one
        index_add for embeddings)."""
        left, right, sample = self.flat(cache)
        per_row = cache.row_coefficients(sample, coefficients)
        owned = self.sample is not None  # compacted rows live in our buffers: scale in place
        if self.indexed:
            scaled = _scaled(right, per_row, owned)
            out = torch.zeros(self.rows, scaled.shape[1], dtype=scaled.dtype,
                              device=scaled.device)
            return out.index_add_(0, left, scaled)
        if cache.scales_input(right):
            right = cache.scaled_input(right, per_row, owned)
        else:
            left = _scaled(left, per_row, owned)
        dtype = coefficients.dtype
        return left.mT.to(dtype) @ right.to(dtype)


def _scaled(x: torch.Tensor, per_row: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``c_k x_k`` in at least the coefficients' dtype; in place when allowed and lossless."""
    if in_place and x.dtype == per_row.dtype:
        return x.mul_(per_row)
    return x * per_row


def _tensor_key(x: torch.Tensor) -> tuple:
    """Identifies a tensor view (same memory, shape and strides) while it is alive."""
    return x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype


@dataclasses.dataclass(frozen=True)
class _LiveRows:
    """Rows ``(b, t)`` of ``[B, L, ...]`` factors: flat ``index = b * L + t`` and ``sample = b``."""

    index: torch.Tensor
    sample: torch.Tensor


class _WeightedSumCache:
    """What the weighted sums of one ``accumulate_grads`` share: per-row coefficients, and
    for each layer input the choice to scale it (once, for every layer reading it: q/k/v,
    gate/up) or to scale each reader's output gradient instead, whichever moves fewer
    elements."""

    def __init__(self, pieces: list[_Factored]) -> None:
        self._all_rows: dict[tuple, torch.Tensor] = {}
        self._coefficients: dict[tuple, torch.Tensor] = {}
        self._scaled_inputs: dict[tuple, torch.Tensor] = {}
        self._reader_rows: dict[tuple, int] = collections.Counter()
        for piece in pieces:
            if not piece.indexed:
                self._reader_rows[_tensor_key(piece.flat(self)[1])] += piece.rows

    def all_rows(self, batch: int, length: int) -> torch.Tensor:
        if (batch, length) not in self._all_rows:
            self._all_rows[batch, length] = torch.arange(batch).repeat_interleave(length)
        return self._all_rows[batch, length]

    def row_coefficients(self, sample: torch.Tensor, coefficients: torch.Tensor
                         ) -> torch.Tensor:
        key = (id(sample), coefficients.dtype)
        if key not in self._coefficients:
            self._coefficients[key] = coefficients[sample.to(coefficients.device)][:, None]
        return self._coefficients[key]

    def scales_input(self, x: torch.Tensor) -> bool:
        return x.shape[-1] < self._reader_rows[_tensor_key(x)]

    def scaled_input(self, x: torch.Tensor, per_row: torch.Tensor, owned: bool) -> torch.Tensor:
        key = _tensor_key(x)
        if key not in self._scaled_inputs:
            self._scaled_inputs[key] = _scaled(x, per_row, owned)
        return self._scaled_inputs[key]


def _all_zero(x: torch.Tensor) -> bool:
    return float(x.abs().amax()) == 0.0  # NaN compares unequal: counts as nonzero


def _active_length(grad: torch.Tensor, hints: dict[int, int]) -> int:
    """Leading positions of ``grad [B, L, d]`` outside which it is exactly 0 in every row.

    In a causal LM the last position and right padding reach no log-prob, so their output
    gradients are 0 in every layer. ``hints`` maps ``L`` to what an earlier layer of the same
    backward found: positions from there on are checked by one reduction, those before it are
    not searched (at worst a zero position is kept: more work, never a wrong norm).
    """
    length = grad.shape[1]
    hint = hints.get(length)
    if hint is not None and (hint == length or _all_zero(grad[:, hint:])):
        return hint
    while length > 0 and _all_zero(grad[:, length - 1]):
        length -= 1
    hints.setdefault(grad.shape[1], length)
    return length


@dataclasses.dataclass(frozen=True)
class _PieceShape:
    """What the planner knows of a factored piece before its gradient exists."""

    indexed: bool  # one-hot left factor (embedding lookup)
    length: int  # positions per sample (L)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    # Gram matrices sum L x d products: half precision would lose the norm's digits.
    return x.float() if x.element_size() < 4 else x


def _left_gram(a: _Factored, b: _Factored) -> torch.Tensor:
    """``[B, La, Lb]`` inner products of the left factors (one-hot rows are gathered)."""
    if a.indexed and b.indexed:
        return (a.left[:, :, None] == b.left[:, None, :]).to(torch.float32)
    if a.indexed:  # onehot(x_t) . left_s = left_s[x_t]
        index = a.left[:, None, :].expand(-1, b.left.shape[1], -1)
        return _at_least_float32(torch.gather(b.left, 2, index).transpose(1, 2))
    if b.indexed:
        return _left_gram(b, a).transpose(1, 2)
    return torch.bmm(_at_least_float32(a.left), _at_least_float32(b.left).transpose(1, 2))


def _ghost_sq_norms(piece: _Factored, workspace: _Workspace) -> torch.Tensor:
    """``||G_b||^2 = sum_{t,s} (left_t . left_s)(right_t . right_s)``, ``[B]``; sets
    ``piece.live`` from the output gradient's Gram diagonal ``||g_bt||^2`` (0 only for a zero
    row, barring float32 underflow of ``|g| < 1e-22``) when the batch fits one Gram block."""
    trimmed = piece.trimmed()
    batch, length = trimmed.right.shape[:2]
    if batch * length * length > _GRAM_CHUNK_ELEMENTS:
        return _ghost_inner(trimmed, trimmed)
    left = _left_gram(trimmed, trimmed)
    right = workspace.gram(trimmed.right)  # layers reading the same input share it
    grad_gram = right if trimmed.indexed else left
    piece.live = torch.diagonal(grad_gram, dim1=1, dim2=2) != 0
    return (left * right).sum(dim=(1, 2), dtype=torch.float32)


def _ghost_inner(a: _Factored, b: _Factored) -> torch.Tensor:
    """``<G^a_i, G^b_i>_F = sum_{t,s} (left^a_t . left^b_s)(right^a_t . right^b_s)``, ``[B]``,
    in batch chunks that bound the ``[chunk, La, Lb]`` temporaries."""
    batch, la, lb = a.right.shape[0], a.right.shape[1], b.right.shape[1]
    chunk = max(1, _GRAM_CHUNK_ELEMENTS // max(1, la * lb))
    out = []
    for lo in range(0, batch, chunk):
        hi = lo + chunk
        part_a = _Factored(a.left[lo:hi], a.right[lo:hi], a.rows, a.active)
        part_b = _Factored(b.left[lo:hi], b.right[lo:hi], b.rows, b.active)
        right = torch.bmm(_at_least_float32(part_a.right),
                          _at_least_float32(part_b.right).transpose(1, 2))
        out.append((_left_gram(part_a, part_b) * right).sum(dim=(1, 2), dtype=torch.float32))
    return torch.cat(out)


class _Workspace:
    """Buffers kept across steps (so a step does not pay for fresh memory) and, within one
    backward pass, what several layers share: Gram matrices and live rows of a layer input
    (q/k/v and gate/up read the same input)."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self._buffers: dict[str, torch.Tensor] = {}
        self._grams: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._live_rows: list[tuple[torch.Tensor, int, _LiveRows]] = []
        self._inputs: dict[tuple, torch.Tensor] = {}

    def buffer(self, key: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A flat buffer of at least ``numel`` elements (at least ``chunk_bytes`` for the
        chunk scratch ``key="chunk"``); one that grows gets 25% headroom, as sizes that
        depend on the data (live rows) vary from step to step."""
        if key == "chunk":
            numel = max(numel, self.chunk_bytes // like.element_size())
        buf = self._buffers.get(key)
        if buf is not None and (buf.dtype != like.dtype or buf.device != like.device):
            buf = None
        if buf is None or buf.numel() < numel:
            if buf is not None:
                numel += numel // 4
            buf = self._buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf

    def gram(self, x: torch.Tensor) -> torch.Tensor:
        """``x x^T`` per sample, ``[B, L, L]``, computed once per distinct tensor."""
        key = _tensor_key(x)
        if key not in self._grams:  # x is kept too, so its memory cannot be reused meanwhile
            wide = _at_least_float32(x)
            self._grams[key] = (x, torch.bmm(wide, wide.transpose(1, 2)))
        return self._grams[key][1]

    def live_rows(self, live: torch.Tensor, length: int) -> _LiveRows:
        """The rows a ``[B, active]`` live mask keeps of ``[B, length, ...]`` factors (layers
        whose masks are equal share one object, so their inputs are gathered once)."""
        for mask, mask_length, rows in self._live_rows:
            if mask_length == length and mask.shape == live.shape and torch.equal(mask, live):
                return rows
        sample, position = live.nonzero(as_tuple=True)
        rows = _LiveRows(sample * length + position, sample)
        self._live_rows.append((live, length, rows))
        return rows

    def gather(self, key: str, x: torch.Tensor, rows: _LiveRows) -> torch.Tensor:
        """``x``'s rows ``rows.index`` of its ``[B * L, ...]`` flattening, in buffer ``key``."""
        flat = x.reshape(x.shape[0] * x.shape[1], -1) if x.dim() > 2 else x.reshape(-1)
        shape = (rows.index.numel(), *flat.shape[1:])
        out = self.buffer(key, math.prod(shape), flat)[: math.prod(shape)].view(shape)
        return torch.index_select(flat, 0, rows.index, out=out)

    def gather_input(self, key: str, x: torch.Tensor, rows: _LiveRows) -> torch.Tensor:
        """:meth:`gather` once per (input, rows) in a backward pass (``key`` names the buffer
        of the first layer asking)."""
        cache_key = (_tensor_key(x), id(rows))
        if cache_key not in self._inputs:
            self._inputs[cache_key] = self.gather(key, x, rows)
        return self._inputs[cache_key]

    def end_backward(self) -> None:
        self._grams.clear()
        self._live_rows.clear()
        self._inputs.clear()

    def clear(self) -> None:
        self._buffers.clear()
        self.end_backward()


def _sq_norms_of(per_sample: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(per_sample.flatten(1), dim=1, dtype=torch.float32).square()


class _ParamGrads:
    """The per-sample gradient of one parameter, built from the pieces its module calls give.

    A parameter used by several calls (tied embeddings, a reused module) gets one piece per
    call; the pieces are summed per sample BEFORE the norm is taken. Pieces arrive during the
    backward pass (from tensor hooks, while the output gradient is still in cache); the norm is
    taken as soon as the last expected piece is in.
    """

    def __init__(self, name: str, param: nn.Parameter, batch: int) -> None:
        self.name, self.param, self.batch = name, param, batch
        self.shapes: list[_PieceShape] = []  # of the factored pieces to come
        self.expected = 0  # pieces to come, factored and dense
        self.route = "materialize"
        self.factored: list[_Factored] = []
        self.dense: list[torch.Tensor] = []  # [B, *shape] each
        self.stored: torch.Tensor | None = None  # [B, *shape] (materialize)
        self.received = 0
        self.norms: torch.Tensor | None = None

    # -- planning ------------------------------------------------------------------------------

    def route_costs(self) -> dict[str, float]:
        """Rough cost (FLOPs, memory traffic weighted by ``_MEMORY_COST``) of each route:
        building/normalising the per-sample gradients plus the later weighted sum."""
        rows, cols = self.param.shape[0], self.param.numel() // self.param.shape[0]
        batch = self.batch
        build = reread = ghost = 0
        for j, a in enumerate(self.shapes):
            left = 0 if a.indexed else rows
            build += batch * a.length * cols * (1 if a.indexed else 2 * rows)
            reread += _MEMORY_COST * batch * a.length * (cols + left)
            for b in self.shapes[j:]:
                both = 0 if a.indexed or b.indexed else rows
                ghost += 2 * batch * a.length * b.length * (cols + both)
        return {
            # bmm into storage; the stored gradients are written, normed and summed: 3 passes
            "materialize": build + _MEMORY_COST * 3 * batch * rows * cols,
            # built in cache-sized chunks (written, then read for the norm), rebuilt summed by
            # one matmul later
            "chunked": 2 * build + reread + _MEMORY_COST * 2 * batch * rows * cols,
            # Gram matrices for the norm, one matmul later
            "ghost": ghost + build + reread,
        }

    def choose_route(self, strategy: str, budget_bytes: int, chunk_bytes: int) -> int:
        """Pick the route; returns the bytes of per-sample storage it keeps."""
        sample_bytes = self.param.numel() * self.param.element_size()
        stored_bytes = self.batch * sample_bytes
        has_dense = self.expected > len(self.shapes)
        if not self.shapes:  # biases and norm weights: [B, d], always stored
            self.route = "materialize"
        elif strategy == "auto":
            costs = self.route_costs()
            if stored_bytes > budget_bytes:
                del costs["materialize"]
            if sample_bytes > chunk_bytes and len(costs) > 1:
                del costs["chunked"]
            if has_dense:
                del costs["ghost"]
            self.route = min(costs, key=costs.get)
        elif strategy == "ghost" and has_dense:
            self.route = "chunked"
        else:
            self.route = strategy
        return stored_bytes if self.route == "materialize" and self.shapes else 0

    # -- pieces --------------------------------------------------------------------------------

    def add(self, piece: _Factored | torch.Tensor, workspace: _Workspace) -> None:
        if self.route == "materialize":
            self._store(piece, workspace)
        elif isinstance(piece, _Factored):
            self.factored.append(piece)
        else:
            self.dense.append(piece)
        self.received += 1
        if self.received == self.expected:
            self.norms = self._sq_norms(workspace)
            for j, piece in enumerate(self.factored):
                if piece.live is not None:
                    piece.compact(f"{self.name}#{j}", workspace)

    def _store(self, piece: _Factored | torch.Tensor, workspace: _Workspace) -> None:
        first = self.stored is None
        if first and self.expected == 1 and not isinstance(piece, _Factored):
            self.stored = piece  # a lone dense piece is already the per-sample gradient
            return
        if first:
            flat = workspace.buffer(f"store:{self.name}", self.batch * self.param.numel(),
                                    _like(piece))
            self.stored = flat[: self.batch * self.param.numel()].view(self.batch, *self.param.shape)
        if isinstance(piece, _Factored):
            piece.trimmed().add_into(self.stored.view(self.batch, piece.rows, -1), 0, self.batch,
                                     first)
        elif first:
            self.stored.copy_(piece)
        else:
            self.stored.add_(piece)

    def _fill(self, flat: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Write ``G[lo:hi]`` (all pieces summed) into the flat scratch tensor ``flat``."""
        shaped = flat[: (hi - lo) * self.param.numel()].view(hi - lo, *self.param.shape)
        first = True
        for f in self.factored:
            f.trimmed().add_into(shaped.view(hi - lo, f.rows, -1), lo, hi, first)
            first = False
        for d in self.dense:
            shaped.copy_(d[lo:hi]) if first else shaped.add_(d[lo:hi])
            first = False
        return shaped

    def _sq_norms(self, workspace: _Workspace) -> torch.Tensor:
        if self.route == "materialize":
            return _sq_norms_of(self.stored)
        if self.route == "chunked":
            numel = self.param.numel()
            flat = workspace.buffer("chunk", numel, _like((self.factored or self.dense)[0]))
            chunk = max(1, flat.numel() // numel)
            return torch.cat([_sq_norms_of(self._fill(flat, lo, min(self.batch, lo + chunk)))
                              for lo in range(0, self.batch, chunk)])
        total = 0  # ghost
        for j, a in enumerate(self.factored):
            total = total + _ghost_sq_norms(a, workspace)
            for b in self.factored[j + 1 :]:
                total = total + 2 * _ghost_inner(a.trimmed(), b.trimmed())
        return total

    def finish(self, workspace: _Workspace) -> torch.Tensor | None:
        """``||G_b||^2`` ``[B]`` once the backward is over (``None``: the parameter was unused)."""
        if self.norms is None and self.received:  # a call's output never reached logp
            self.norms = self._sq_norms(workspace)
        return self.norms

    def weighted_sum(self, coefficients: torch.Tensor, cache: _WeightedSumCache
                     ) -> torch.Tensor | None:
        """``sum_b c_b G_b``: one ``[B] x [B, P]`` product when stored, else one matmul a piece."""
        if not self.received:
            return None
        acc = _accumulation_dtype(self.param.dtype)
        c = coefficients.to(acc)
        parts = [f.weighted_sum(c, cache).view(self.param.shape) for f in self.factored]
        parts += [torch.tensordot(c, d.to(acc), dims=1) for d in self.dense]
        if self.stored is not None:
            parts.append(torch.tensordot(c, self.stored.to(acc), dims=1))
        return functools.reduce(torch.add, parts)


def _like(piece: _Factored | torch.Tensor) -> torch.Tensor:
    return piece.right if isinstance(piece, _Factored) else piece


@dataclasses.dataclass
class _Hooked:
    name: str
    module: nn.Module
    kind: str  # "linear" | "embedding" | "scale"
    weight: nn.Parameter | None  # None when frozen
    bias: nn.Parameter | None


@dataclasses.dataclass
class _Call:
    hooked: _Hooked
    input: torch.Tensor
    output: torch.Tensor
    input_version: int
    output_version: int


def _trainable(module: nn.Module, name: str) -> nn.Parameter | None:
    p = module._parameters.get(name)
    return p if p is not None and p.requires_grad else None


def _is_elementwise_affine(module: nn.Module) -> bool:
    """Whether ``module(x) == weight * module_{weight=1, bias=0}(x) + bias`` (numerical probe)."""
    weight = module._parameters.get("weight")
    bias = module._parameters.get("bias")
    names = {n for n, p in module._parameters.items() if p is not None}
    if weight is None or weight.dim() != 1 or not names <= {"weight", "bias"}:
        return False
    if bias is not None and bias.shape != weight.shape:
        return False
    g = torch.Generator(device="cpu").manual_seed(0)
    kw = {"dtype": weight.dtype}
    x = torch.randn(2, 3, weight.shape[0], generator=g, **kw).to(weight.device)
    w = (torch.rand(weight.shape, generator=g, **kw) + 0.5).to(weight.device)
    b = torch.randn(weight.shape, generator=g, **kw).to(weight.device) if bias is not None else None
    with torch.no_grad():
        try:
            y = torch.func.functional_call(module, _affine_params(w, b), (x,))
            h = _unit_affine_output(module, x)
        except Exception:  # noqa: BLE001 - any failure means "not this kind of module"
            return False
    want = w * h + (b if b is not None else 0)
    tol = 1e-2 if weight.element_size() < 4 else 1e-5
    return y.shape == x.shape and torch.allclose(y, want, rtol=tol, atol=tol)


def _affine_params(weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {"weight": weight} if bias is None else {"weight": weight, "bias": bias}


def _unit_affine_output(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``h(x)`` of ``y = weight * h(x) + bias``: the module run with weight 1 and bias 0."""
    weight, bias = module._parameters["weight"], module._parameters.get("bias")
    ones = torch.ones_like(weight)
    zeros = torch.zeros_like(bias) if bias is not None else None
    return torch.func.functional_call(module, _affine_params(ones, zeros), (x,))


def _classify(name: str, module: nn.Module) -> str:
    kind = type(module).__name__
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "linear"
    if isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward:
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            raise UnsupportedModuleError(
                f"module {name!r} ({kind}) uses max_norm / scale_grad_by_freq / sparse, which "
                "per-sample gradients do not support; use the loop route instead"
            )
        return "embedding"
    if _is_elementwise_affine(module):
        return "scale"
    trainable = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    raise UnsupportedModuleError(
        f"module {name!r} of type {kind} holds trainable parameters {trainable} whose "
        "per-sample gradients PerSampleGradients cannot compute exactly (supported: "
        "nn.Linear, nn.Embedding, elementwise-affine norms y = weight * h(x) + bias); freeze "
        "them (requires_grad=False) or use score_grad_sq_norms_loop / loop_accumulate"
    )


class PerSampleGradients:
    """Exact per-trajectory score-function gradients from one forward and one backward pass.

    Usage (one optimiser step)::

        psg = PerSampleGradients(model)
        with psg.capture():
            logp = forward_fn(model, batch)               # [B, T], hooks record activations
        sq_norms = psg.backward(logp, mask)               # ||g_i||^2, [B] float64
        coefficients = ...                                # e.g. -A_i * w_i / normalizer
        psg.accumulate_grads(coefficients)                # p.grad += sum_i c_i g_i

    ``g_i = grad_theta sum_t mask_it logp_it``; ``mask`` may be float (per-token weights known
    after the forward, e.g. token TIS, then enter ``g_i``). ``accumulate_grads`` *adds* to
    ``p.grad`` like ``loss.backward()`` does. To get the gradient of
    ``losses.policy_gradient_loss(logp, mask, c, N)`` pass ``coefficients = -c / N``.

    Cost: the forward, and a backward in which autograd computes only input gradients (it is
    asked for the gradients of the hooked layer outputs, not of the weights). Tensor hooks on
    those outputs receive each output gradient as soon as it exists and build the per-sample
    weight gradients right there, while it is in cache, by one of three exact routes per
    parameter (``strategy`` forces one; ``"auto"`` picks the cheapest by a FLOP + memory-traffic
    estimate, see ``_ParamGrads.route_costs``):

    * ``"materialize"``: ``G_i`` for all ``i`` by one batched matmul (the FLOPs of the skipped
      weight gradient), kept until ``accumulate_grads``, which is then a cheap ``[B] x [B, P]``
      product. Memory ``B x P`` per parameter (a buffer reused across steps); ``"auto"`` uses it
      only while the total fits ``materialize_budget_bytes``.
    * ``"chunked"``: ``G_i`` built a few samples at a time in a reused scratch buffer of
      ``chunk_bytes``, only to take norms; ``accumulate_grads`` then does the normal
      weight-gradient matmul with ``c``-scaled output gradients. No ``B x P`` memory.
    * ``"ghost"``: ``||G_i||^2 = sum_{t,s} (a_it . a_is)(g_it . g_is)`` from ``L x L`` Gram
      matrices (shared by layers that read the same input, e.g. q/k/v), ``O(B L^2 (d_in +
      d_out))``: cheaper than building ``G_i`` when ``L < d_in d_out / (d_in + d_out)``, and
      needs no ``d_in x d_out`` scratch (large vocab heads); the gradient as in ``"chunked"``.
      The Gram diagonal shows which rows ``(i, t)`` have a nonzero output gradient: the hook
      copies just those rows of ``g`` and ``a`` into reused buffers (an input read by several
      layers once), and the weighted sum multiplies only them.

    Biases and norm weights (``[B, d]`` per-sample gradients) are always materialised. The
    chunked and ghost routes keep their layers' activations and output gradients (the ghost
    route: their live rows) until ``accumulate_grads``; autograd returns every hooked output
    gradient at the end of the backward, so the peak memory holds all of them at once (about
    the size of the forward's saved activations). ``accumulate_grads`` frees the step's state;
    ``release`` also frees the reused buffers.
    """

    def __init__(
        self,
        model: nn.Module,
        strategy: str = "auto",
        materialize_budget_bytes: int = 1 << 30,
        chunk_bytes: int = 1 << 22,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
        if materialize_budget_bytes < 0:
            raise ValueError(
                f"materialize_budget_bytes must be >= 0; got {materialize_budget_bytes}"
            )
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be > 0; got {chunk_bytes}")
        if getattr(model, "is_gradient_checkpointing", False):
            raise ValueError(
                "model has gradient checkpointing enabled; it re-runs forward hooks in the "
                "backward pass - disable it (model.gradient_checkpointing_disable())"
            )
        self.model = model
        self.strategy = strategy
        self.materialize_budget_bytes = materialize_budget_bytes
        self.chunk_bytes = chunk_bytes
        self._param_names = {id(p): n for n, p in _trainable_named_parameters(model)}
        self._hooked: list[_Hooked] = []
        covered: set[int] = set()
        for name, module in model.named_modules():
            if not any(p.requires_grad for p in module.parameters(recurse=False)):
                continue
            kind = _classify(name, module)
            hooked = _Hooked(
                name, module, kind, _trainable(module, "weight"), _trainable(module, "bias")
            )
            self._hooked.append(hooked)
            covered.update(id(p) for p in (hooked.weight, hooked.bias) if p is not None)
        missing = [n for i, n in self._param_names.items() if i not in covered]
        if missing:  # e.g. a trainable parameter registered under another name than weight/bias
            raise UnsupportedModuleError(
                f"trainable parameters {missing} are not covered by a supported module's "
                "weight or bias"
            )
        self._calls: list[_Call] | None = None
        self._capturing = False
        self._pending: list[_ParamGrads] | None = None
        self._batch_size = 0
        self._workspace = _Workspace(chunk_bytes)
        self._active_hints: dict[int, int] = {}  # see _active_length; per backward
        #: per parameter name, the route the last ``backward`` took
        self.last_plan: dict[str, str] = {}
        #: per weight, the rows (trajectory, position) its weighted sum multiplies after the
        #: last ``backward`` (rows with a zero output gradient are left out where known)
        self.last_weighted_rows: dict[str, int] = {}

    # -- phase 1: forward ---------------------------------------------------------------------

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Record the hooked modules' inputs and outputs during the forward inside the block."""
        if self._pending is not None or self._calls:
            raise RuntimeError(
                "the previous capture was not consumed: call accumulate_grads() or release() first"
            )
        handles = [
            h.module.register_forward_hook(functools.partial(self._record, h), with_kwargs=True)
            for h in self._hooked
        ]
        self._calls, self._capturing = [], True
        try:
            with torch.enable_grad():
                yield
        finally:
            self._capturing = False
            for handle in handles:
                handle.remove()

    def _record(
        self, hooked: _Hooked, module: nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> None:
        if not self._capturing:
            return
        x = args[0] if args else next(iter(kwargs.values()))
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            raise RuntimeError(
                f"module {hooked.name!r} produced an output without grad_fn; run the forward "
                "with gradients enabled and trainable parameters"
            )
        self._calls.append(_Call(hooked, x.detach(), output, x._version, output._version))

    # -- phase 2: backward --------------------------------------------------------------------

    def backward(self, logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-trajectory ``||g_i||^2`` (``[B]``, float64) for the captured forward.

        Runs the backward pass (input gradients only), building the per-sample weight gradients
        on the way, and keeps what ``accumulate_grads`` needs.
        """
        if not self._calls:
            raise RuntimeError("nothing captured: run forward_fn inside `with psg.capture():`")
        calls, self._calls = self._calls, None
        objective = _score_objective(logp, mask)
        batch = logp.shape[0]
        self._check_calls(calls, batch)
        records = self._plan(calls, batch)
        self._active_hints.clear()
        handles = [
            call.output.register_hook(functools.partial(self._on_output_grad, call, records))
            for call in calls
        ]
        try:
            # The gradients come back through the hooks; the returned tuple is not needed.
            torch.autograd.grad(objective, [c.output for c in calls], allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        del calls
        self._batch_size = batch
        self._pending = list(records.values())
        norms = [n for rec in self._pending if (n := rec.finish(self._workspace)) is not None]
        total = torch.stack(norms).sum(0, dtype=torch.float64) if norms else \
            torch.zeros(batch, dtype=torch.float64, device=logp.device)
        self._workspace.end_backward()
        self.last_weighted_rows = {rec.name: sum(f.row_count for f in rec.factored)
                                   for rec in self._pending if rec.factored}
        return total

    @staticmethod
    def _check_calls(calls: list[_Call], batch: int) -> None:
        for call in calls:
            name = call.hooked.name
            if (call.output._version != call.output_version
                    or call.input._version != call.input_version):
                raise RuntimeError(
                    f"the input or output of module {name!r} was modified in place after the "
                    "module ran; per-sample gradients would be wrong"
                )
            for what, t in (("input", call.input), ("output", call.output)):
                if t.dim() == 0 or t.shape[0] != batch:
                    raise ValueError(
                        f"module {name!r}: {what} has shape {tuple(t.shape)} but logp has batch "
                        f"size {batch}; every hooked activation must have the batch as dim 0 "
                        "(a model that flattens batch and time is unsupported)"
                    )

    def _plan(self, calls: list[_Call], batch: int) -> dict[int, _ParamGrads]:
        """One record per trainable parameter the calls touch, with its route."""
        records: dict[int, _ParamGrads] = {}

        def expect(param: nn.Parameter | None, shape: _PieceShape | None) -> None:
            if param is None:
                return
            if id(param) not in records:
                records[id(param)] = _ParamGrads(self._param_names[id(param)], param, batch)
            records[id(param)].expected += 1
            if shape is not None:
                records[id(param)].shapes.append(shape)

        for call in calls:
            hooked = call.hooked
            if hooked.kind == "linear":
                length = call.output.numel() // (batch * call.output.shape[-1])
                expect(hooked.weight, _PieceShape(indexed=False, length=length))
            elif hooked.kind == "embedding":
                expect(hooked.weight, _PieceShape(indexed=True, length=call.input.numel() // batch))
            else:
                expect(hooked.weight, None)
            expect(hooked.bias, None)
        budget = self.materialize_budget_bytes
        for rec in records.values():
            budget -= rec.choose_route(self.strategy, budget, self.chunk_bytes)
        self.last_plan = {rec.name: rec.route for rec in records.values()}
        return records

    def _on_output_grad(
        self, call: _Call, records: dict[int, _ParamGrads], grad: torch.Tensor
    ) -> None:
        """Tensor hook: turn one output gradient into per-sample weight-gradient pieces."""
        hooked, batch = call.hooked, grad.shape[0]
        g = grad.reshape(batch, -1, grad.shape[-1])
        pieces: list[tuple[nn.Parameter, _Factored | torch.Tensor]] = []
        if hooked.kind == "linear":
            if hooked.weight is not None:
                a = call.input.reshape(batch, -1, call.input.shape[-1])
                pieces.append((hooked.weight, _Factored(g, a, g.shape[-1],
                                                        _active_length(g, self._active_hints))))
        elif hooked.kind == "embedding":
            index = call.input.reshape(batch, -1)
            padding_idx = hooked.module.padding_idx
            if padding_idx is not None:  # autograd gives the padding row no gradient
                g = g.masked_fill((index == padding_idx)[..., None], 0)
            pieces.append((hooked.weight, _Factored(index, g, hooked.module.num_embeddings,
                                                    _active_length(g, self._active_hints))))
        elif hooked.weight is not None:  # "scale": y = weight * h(x) + bias
            pieces.append((hooked.weight, self._scale_weight_piece(call, g)))
        if hooked.bias is not None:
            pieces.append((hooked.bias, g.sum(dim=1)))
        for param, piece in pieces:
            records[id(param)].add(piece, self._workspace)

    @staticmethod
    def _scale_weight_piece(call: _Call, g: torch.Tensor) -> torch.Tensor:
        """``sum_t g_bt * h_bt`` for ``y = weight * h(x) (+ bias)``, ``[B, d]``.

        Without a bias and with no zero weight, ``h = y / weight`` and the division can move
        out of the sum: ``(sum_t g_bt * y_bt) / weight`` (exact up to float32 rounding; this
        saves re-running the norm). Otherwise ``h`` is recomputed from the input.
        """
        module = call.hooked.module
        weight = module._parameters["weight"]
        exact_division = (
            module._parameters.get("bias") is None
            and weight.dtype in (torch.float32, torch.float64)
            and not bool((weight == 0).any())
        )
        if exact_division:
            y = call.output.detach().reshape(g.shape)
            return (g * y).sum(dim=1) / weight.detach()
        with torch.no_grad():
            h = _unit_affine_output(module, call.input)
        return (g * h.reshape(g.shape)).sum(dim=1)

    # -- phase 3: the weighted gradient -------------------------------------------------------

    def accumulate_grads(self, coefficients: torch.Tensor) -> None:
        """``p.grad += sum_i c_i g_i`` for every trainable parameter; frees the step's state."""
        if self._pending is None:
            raise RuntimeError("call backward(logp, mask) before accumulate_grads(coefficients)")
        if coefficients.shape != (self._batch_size,):
            raise ValueError(
                f"coefficients must have shape [B]=({self._batch_size},); got "
                f"{tuple(coefficients.shape)}"
            )
        if not bool(torch.isfinite(coefficients).all()):
            raise ValueError("coefficients must be finite")
        pending, self._pending = self._pending, None
        c = coefficients.detach()
        cache = _WeightedSumCache([f for rec in pending for f in rec.factored])
        while pending:
            rec = pending.pop()
            grad = rec.weighted_sum(c.to(rec.param.device), cache)
            if grad is not None:
                _accumulate_into_grad(rec.param, grad)

    def release(self) -> None:
        """Drop the step's captured state and the reused buffers, without touching ``.grad``."""
        self._calls, self._pending = None, None
        self._workspace.clear()

    def forward_backward(
        self, forward_fn: ForwardFn, batch: Any, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``capture`` + ``forward_fn`` + ``backward``; returns (detached logp, ``||g_i||^2``)."""
        with self.capture():
            logp = forward_fn(self.model, batch)
        return logp.detach(), self.backward(logp, mask)
