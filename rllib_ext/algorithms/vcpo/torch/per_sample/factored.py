"""Per-sample gradients of weight matrices in factored form, and their norms.

A linear layer's (or an embedding's) per-sample weight gradient is ``G_b = sum_t g_bt a_bt^T``
(output gradient ``g``, input ``a``; for an embedding the input is a one-hot row). Its squared
norm is either taken from ``G_b`` built explicitly, or as a "ghost norm" from ``L x L`` Gram
matrices: ``||G_b||^2 = sum_{t,s} (a_bt . a_bs)(g_bt . g_bs)``. Half-precision factors stay in
their dtype; Gram matrices and norms are accumulated in float32 (``precision.bmm_f32``).
"""

from __future__ import annotations

import collections
import dataclasses

import torch

from rllib_ext.algorithms.vcpo.torch.per_sample.buffers import Workspace, scaled, tensor_key
from rllib_ext.algorithms.vcpo.torch.per_sample.precision import bmm_f32

# Elements of one [chunk, L, L] Gram block in a ghost norm (bounds its temporary memory).
GRAM_CHUNK_ELEMENTS = 1 << 26


@dataclasses.dataclass
class Factored:
    """Per-sample gradient ``G_b = sum_t left_bt right_bt^T`` of a ``[rows, cols]`` parameter.

    ``left`` is ``[B, L, rows]``, or ``[B, L]`` int64 row indices (``left_bt = onehot``, the
    embedding case); ``right`` is ``[B, L, cols]``. The output-gradient factor (``left`` of a
    linear layer, ``right`` of an embedding) is zero in every row at positions ``>= active``
    (see :func:`active_length`), so those add nothing to ``G_b``. ``live``, once a ghost norm
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

    def trimmed(self) -> Factored:
        """The same ``G_b`` from the first ``active`` positions only (views, no copies): the
        per-sample norm work scales with ``L^2`` (ghost) or ``L`` (materialize, chunked)."""
        if self.active == self.right.shape[1]:
            return self
        return Factored(self.left[:, : self.active], self.right[:, : self.active], self.rows,
                        self.active)

    def add_into(self, out: torch.Tensor, lo: int, hi: int, first: bool) -> None:
        """``out = G[lo:hi]`` (``first``) or ``out += G[lo:hi]``; ``out`` is ``[hi-lo, rows, cols]``."""
        if not self.indexed:
            left = self.left[lo:hi].transpose(1, 2).to(out.dtype)
            right = self.right[lo:hi].to(out.dtype)
            if first:
                torch.bmm(left, right, out=out)
            else:
                out.baddbmm_(left, right)
            return
        if first:
            out.zero_()
        count, cols = hi - lo, out.shape[-1]
        offsets = self.rows * torch.arange(count, device=self.left.device)[:, None]
        out.view(count * self.rows, cols).index_add_(
            0, (self.left[lo:hi] + offsets).flatten(),
            self.right[lo:hi].reshape(-1, cols).to(out.dtype)
        )

    def compact(self, name: str, workspace: Workspace) -> None:
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

    def flat(self, cache: WeightedSumCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(left, right, sample)`` over rows: ``[K, ...]`` each, ``sample[k]`` = trajectory."""
        if self.sample is not None:
            return self.left, self.right, self.sample
        batch, length = self.right.shape[:2]
        left = self.left.reshape(batch * length) if self.indexed else self.left.reshape(
            batch * length, -1)
        return left, self.right.reshape(batch * length, -1), cache.all_rows(
            batch, length, self.right.device)

    def weighted_sum(self, coefficients: torch.Tensor, cache: WeightedSumCache
                     ) -> torch.Tensor:
        """``sum_b c_b G_b`` (float32) as one matmul over the rows ``(b, t)`` of both factors
        in their own dtype (one index_add for embeddings, accumulated in float32)."""
        left, right, sample = self.flat(cache)
        per_row = cache.row_coefficients(sample, coefficients)
        owned = self.sample is not None  # compacted rows live in our buffers: scale in place
        if self.indexed:
            values = scaled(right, per_row, owned).float()
            out = torch.zeros(self.rows, values.shape[1], dtype=torch.float32,
                              device=values.device)
            return out.index_add_(0, left, values)
        if cache.scales_input(right):
            right = cache.scaled_input(right, per_row, owned)
        else:
            left = scaled(left, per_row, owned)
        return bmm_f32(left.mT, right)


def all_zero(x: torch.Tensor) -> bool:
    return float(x.abs().amax()) == 0.0  # NaN compares unequal: counts as nonzero


def active_length(grad: torch.Tensor, hints: dict[int, int]) -> int:
    """Leading positions of ``grad [B, L, d]`` outside which it is exactly 0 in every row.

    In a causal LM the last position and right padding reach no log-prob, so their output
    gradients are 0 in every layer. ``hints`` maps ``L`` to what an earlier layer of the same
    backward found: positions from there on are checked by one reduction, those before it are
    not searched (at worst a zero position is kept: more work, never a wrong norm). On a GPU
    nothing is trimmed: the check reads values on the host, which would stall the backward.
    """
    length = grad.shape[1]
    if grad.is_cuda:
        return length
    hint = hints.get(length)
    if hint is not None and (hint == length or all_zero(grad[:, hint:])):
        return hint
    while length > 0 and all_zero(grad[:, length - 1]):
        length -= 1
    hints.setdefault(grad.shape[1], length)
    return length


@dataclasses.dataclass(frozen=True)
class PieceShape:
    """What the planner knows of a factored piece before its gradient exists."""

    indexed: bool  # one-hot left factor (embedding lookup)
    length: int  # positions per sample (L)


def left_gram(a: Factored, b: Factored) -> torch.Tensor:
    """``[B, La, Lb]`` float32 inner products of the left factors (one-hot rows gathered)."""
    if a.indexed and b.indexed:
        return (a.left[:, :, None] == b.left[:, None, :]).to(torch.float32)
    if a.indexed:  # onehot(x_t) . left_s = left_s[x_t]
        index = a.left[:, None, :].expand(-1, b.left.shape[1], -1)
        return torch.gather(b.left, 2, index).transpose(1, 2).float()
    if b.indexed:
        return left_gram(b, a).transpose(1, 2)
    return bmm_f32(a.left, b.left.transpose(1, 2))


def ghost_sq_norms(piece: Factored, workspace: Workspace) -> torch.Tensor:
    """``||G_b||^2 = sum_{t,s} (left_t . left_s)(right_t . right_s)``, ``[B]``; on a CPU, sets
    ``piece.live`` from the output gradient's Gram diagonal ``||g_bt||^2`` (0 only for a zero
    row, barring float32 underflow of ``|g| < 1e-22``) when the batch fits one Gram block."""
    trimmed = piece.trimmed()
    batch, length = trimmed.right.shape[:2]
    if batch * length * length > GRAM_CHUNK_ELEMENTS:
        return ghost_inner(trimmed, trimmed)
    left = left_gram(trimmed, trimmed)
    right = workspace.gram(trimmed.right)  # layers reading the same input share it
    if not trimmed.right.is_cuda:  # compacting the live rows needs their count on the host
        grad_gram = right if trimmed.indexed else left
        piece.live = torch.diagonal(grad_gram, dim1=1, dim2=2) != 0
    return (left * right).sum(dim=(1, 2), dtype=torch.float32)


def ghost_inner(a: Factored, b: Factored) -> torch.Tensor:
    """``<G^a_i, G^b_i>_F = sum_{t,s} (left^a_t . left^b_s)(right^a_t . right^b_s)``, ``[B]``,
    in batch chunks that bound the ``[chunk, La, Lb]`` temporaries."""
    batch, la, lb = a.right.shape[0], a.right.shape[1], b.right.shape[1]
    chunk = max(1, GRAM_CHUNK_ELEMENTS // max(1, la * lb))
    out = []
    for lo in range(0, batch, chunk):
        hi = lo + chunk
        part_a = Factored(a.left[lo:hi], a.right[lo:hi], a.rows, a.active)
        part_b = Factored(b.left[lo:hi], b.right[lo:hi], b.rows, b.active)
        right = bmm_f32(part_a.right, part_b.right.transpose(1, 2))
        out.append((left_gram(part_a, part_b) * right).sum(dim=(1, 2), dtype=torch.float32))
    return torch.cat(out)


class WeightedSumCache:
    """What the weighted sums of one ``accumulate_grads`` share: per-row coefficients, and
    for each layer input the choice to scale it (once, for every layer reading it: q/k/v,
    gate/up) or to scale each reader's output gradient instead, whichever moves fewer
    elements."""

    def __init__(self, pieces: list[Factored]) -> None:
        self._all_rows: dict[tuple, torch.Tensor] = {}
        self._coefficients: dict[tuple, torch.Tensor] = {}
        self._scaled_inputs: dict[tuple, torch.Tensor] = {}
        self._reader_rows: dict[tuple, int] = collections.Counter()
        for piece in pieces:
            if not piece.indexed:
                self._reader_rows[tensor_key(piece.flat(self)[1])] += piece.rows

    def all_rows(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        if (batch, length) not in self._all_rows:
            self._all_rows[batch, length] = torch.arange(batch, device=device
                                                         ).repeat_interleave(length)
        return self._all_rows[batch, length]

    def row_coefficients(self, sample: torch.Tensor, coefficients: torch.Tensor
                         ) -> torch.Tensor:
        key = (id(sample), coefficients.dtype)
        if key not in self._coefficients:
            self._coefficients[key] = coefficients[sample.to(coefficients.device)][:, None]
        return self._coefficients[key]

    def scales_input(self, x: torch.Tensor) -> bool:
        return x.shape[-1] < self._reader_rows[tensor_key(x)]

    def scaled_input(self, x: torch.Tensor, per_row: torch.Tensor, owned: bool) -> torch.Tensor:
        key = tensor_key(x)
        if key not in self._scaled_inputs:
            self._scaled_inputs[key] = scaled(x, per_row, owned)
        return self._scaled_inputs[key]
