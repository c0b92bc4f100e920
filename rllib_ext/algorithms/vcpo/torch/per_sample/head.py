"""Per-sample gradients of the chunked LM head's weight (``rllib_ext.llm.log_probs``).

The head ``W [V, d]`` sees only real response tokens, packed ``[N, d]``; its backward runs in
row-aligned chunks and hands each chunk's output gradient ``gl [c, V]`` and inputs
``h [c, d]`` to :class:`HeadRecorder`, which takes trajectory b's squared norm
``||G_b||^2``, ``G_b = sum_{t in b} gl_t h_t^T``, per row:

* short rows inside one chunk: ghost norm from ``l x l`` Gram matrices,
  ``sum_{t,s} (gl_t . gl_s)(h_t . h_s)``, ``O(l^2 (V + d))`` (rows of a chunk padded to a batch);
* longer rows, or rows split over several chunks: ``G_b`` built in a ``[V, d]`` float32 buffer
  (one open row at a time), ``O(l V d)``, the cost of the head's own weight-gradient matmul.

When the head's weight is tied to the input embedding, the norm of the sum needs the inner
product with the embedding's piece ``sum_t onehot(x_t) e_t^T``:
``<G_head,b, G_emb,b> = sum_t <G_head,b[x_t], e_t>``, so the recorder also keeps
``G_head,b[x_bt]`` for the row's input tokens ``x_bt`` (``[B, L, d]``, one activation's size).

The weighted gradient ``sum_b c_b G_b``: when the caller promises the coefficients' form
(:class:`RowClasses`: OPOB's ``c_b = w_b (R_b - b*) / (-N sigma)`` is a per-row scale times a
value per (group, reward) class), the recorder sums ``w_b G_b`` per class during the backward,
for the FLOPs of the head's ordinary weight gradient (each token goes to one class; binary
rewards make two classes per group), and the weighted sum is a ``[classes] x [classes, V, d]``
product. Otherwise (arbitrary coefficients, or the class sums would exceed their memory
budget) it is the head's weight gradient for per-token upstream weights ``c_b u_t``,
recomputed chunk by chunk (``log_probs.head_weight_grad``): one head forward plus one
weight-gradient matmul more than a plain step.

Per row the recorder picks Gram norms or building ``G_b`` by a FLOP + memory-traffic estimate
(``device_costs``): Grams cost ``2 l^2 (V + d)`` (plus the class matmul), building costs the
row's weight-gradient matmul ``2 l V d`` plus a few passes over ``V x d``.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Callable

import torch

from rllib_ext.algorithms.vcpo.torch.per_sample.buffers import Workspace
from rllib_ext.algorithms.vcpo.torch.per_sample.factored import Factored
from rllib_ext.algorithms.vcpo.torch.per_sample.precision import addmm_f32_, bmm_f32
from rllib_ext.llm.log_probs import HeadInputs, head_weight_grad


@dataclasses.dataclass(frozen=True)
class RowClasses:
    """A promise about the coefficients to come: ``c_i = scale_i * k[index_i]`` for class values
    ``k`` known only after the backward (``index_i = -1``: ``c_i = 0``). OPOB's coefficients
    have this form with one class per (group, reward value): ``c_i = w_i (R_i - b*_g) /
    (-N sigma_g)``. It lets the head sum its per-sample gradients per class during its own
    backward (``A_k = sum_{i in k} scale_i G_i``), for the cost of its ordinary weight
    gradient, instead of recomputing the head after the norms."""

    scale: torch.Tensor  # [B]
    index: torch.Tensor  # [B] int64, -1 = no contribution
    count: int
    host_index: tuple[int, ...]  # the same on the host (the head's backward reads no device
    # values: on a GPU that would stall it)

    @classmethod
    def of(cls, scale: torch.Tensor, index: list[int]) -> RowClasses:
        """Classes ``0..max(index)`` (``-1``: no contribution) of rows scaled by ``scale``."""
        return cls(scale, torch.tensor(index, device=scale.device), max(index, default=-1) + 1,
                   tuple(index))

    def coefficients(self, values: torch.Tensor) -> torch.Tensor:
        values = torch.cat([values.to(self.scale.dtype), values.new_zeros(1).to(self.scale.dtype)])
        return self.scale * values[self.index]  # index -1 picks the appended 0


@dataclasses.dataclass
class HeadPiece:
    """The head weight's per-sample gradient after its backward: norms, the rows the tied
    embedding meets, per-class sums (with :class:`RowClasses`), and what the weighted sum
    recomputes from otherwise."""

    sq_norms: torch.Tensor  # [B] float32
    embedding_rows: torch.Tensor | None  # [B, L, d] float32: G_head,b[x_bt]
    class_sums: torch.Tensor | None  # [classes, V, d] float32
    head: HeadInputs
    upstream: torch.Tensor  # [N] d objective / d logp_t

    def inner_with_embedding(self, piece: Factored) -> torch.Tensor:
        """``<G_head,b, G_emb,b>`` ``[B]`` for an embedding piece (one-hot left factor)."""
        if self.embedding_rows is None:
            raise RuntimeError("the head's recorder was not given the embedding's token ids")
        trimmed = piece.trimmed()
        rows = self.embedding_rows[:, : trimmed.active]
        return (rows * trimmed.right.float()).sum(dim=(1, 2))

    def weighted_sum(self, coefficients: torch.Tensor,
                     class_values: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_b c_b G_b``: from the class sums when ``class_values`` are given and the sums
        were kept, else recomputed chunk by chunk (one head forward + one matmul)."""
        if class_values is not None and self.class_sums is not None:
            return torch.tensordot(class_values.to(self.class_sums), self.class_sums, dims=1)
        upstream = self.upstream * coefficients.to(self.upstream.device)[self.head.row]
        return head_weight_grad(self.head, upstream)[0]


# Short rows are padded to one batch for their Gram matrices unless that copy of their output
# gradients would exceed this; then they go row by row, on views (a large copy costs a memory
# pass and, beyond glibc's mmap threshold, fresh pages every step).
PADDED_COPY_BYTES = 4 << 20


class HeadRecorder:
    """Builds the :class:`HeadPiece` of one backward from the head's chunks (see the module
    docstring). ``token_ids [B, L]``: the embedding's input when the head's weight is tied to
    it (else None); ``classes``: see :class:`RowClasses` (kept as sums when they fit
    ``class_bytes``); ``memory_cost(nbytes)``: FLOPs per element moved (``device_costs``), for the
    per-row choice between Gram norms and building ``G_b``; ``workspace``: where the ``[V, d]``
    row buffer and the class sums live across steps (no fresh pages each step)."""

    def __init__(self, batch: int, token_ids: torch.Tensor | None,
                 memory_cost: Callable[[int], float],
                 workspace: Workspace, classes: RowClasses | None = None,
                 class_bytes: int = 1 << 30) -> None:
        self.batch, self.token_ids, self.memory_cost = batch, token_ids, memory_cost
        self.workspace, self.classes, self.class_bytes = workspace, classes, class_bytes
        self.sq_norms: torch.Tensor | None = None
        self.embedding_rows: torch.Tensor | None = None
        self.class_sums: torch.Tensor | None = None
        self._class_of: list[int] = []
        self._written: set[int] = set()  # classes of class_sums holding a value
        self._open: int | None = None  # the row being built (over one or several chunks)
        self._starts: list[int] = []

    def chunk(self, head: HeadInputs, lo: int, hi: int, grad_logits: torch.Tensor,
              hidden: torch.Tensor) -> None:
        if self.sq_norms is None:
            self._start(head, grad_logits, hidden)
        row = self._row_of(lo)
        start, end = self._starts[row], self._starts[row + 1]
        if start < lo or end > hi:  # a piece of a row longer than the chunk
            self._build(row, grad_logits, hidden, last=end <= hi)
            return
        short, long = [], []
        while row < len(head.row_lengths) and self._starts[row + 1] <= hi:
            a, b = self._starts[row] - lo, self._starts[row + 1] - lo
            if b > a:
                (short if self._gram_is_cheaper(b - a, grad_logits.shape[1], hidden.shape[1])
                 else long).append((row, a, b))
            row += 1
        if short:
            self._ghost(short, grad_logits, hidden)
        for r, a, b in long:
            self._build(r, grad_logits[a:b], hidden[a:b], last=True)

    def finish(self, head: HeadInputs, upstream: torch.Tensor) -> HeadPiece:
        if self.sq_norms is None:  # no response token at all
            self.sq_norms = torch.zeros(self.batch, dtype=torch.float32,
                                        device=head.hidden.device)
        if self.class_sums is not None:
            for k in set(range(len(self.class_sums))) - self._written:  # no token reached it
                self.class_sums[k].zero_()
        return HeadPiece(self.sq_norms, self.embedding_rows, self.class_sums, head, upstream)

    # -- internals -----------------------------------------------------------------------------

    def _start(self, head: HeadInputs, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
        if len(head.row_lengths) != self.batch:
            raise ValueError(f"the head saw {len(head.row_lengths)} rows; the batch has "
                             f"{self.batch}")
        self._starts = [0, *itertools.accumulate(head.row_lengths)]
        device = hidden.device
        self.sq_norms = torch.zeros(self.batch, dtype=torch.float32, device=device)
        if self.token_ids is not None:
            self.embedding_rows = torch.zeros(
                (*self.token_ids.shape, hidden.shape[1]), dtype=torch.float32, device=device)
        shape = (grad_logits.shape[1], hidden.shape[1])
        size, like = shape[0] * shape[1], self.sq_norms
        self._row_gradient = self.workspace.buffer("head:row", size, like)[:size].view(shape)
        if self.classes is not None and self.classes.count * size * 4 <= self.class_bytes:
            count = self.classes.count
            self.class_sums = self.workspace.buffer("head:classes", count * size, like)[
                :count * size].view(count, *shape)  # each class written first, then added to
            self._class_of = list(self.classes.host_index)

    def _gram_is_cheaper(self, length: int, vocab: int, width: int) -> bool:
        """Per row: Gram norms (plus, with class sums, the class matmul) vs building ``G_b``
        (its matmul, then memory passes: written, normed, and added to its class sum)."""
        summing = self.class_sums is not None
        gram = 2 * length * length * (vocab + width) + (2 * length * vocab * width if summing
                                                         else 0)
        build = 2 * length * vocab * width + self.memory_cost(4 * vocab * width) * (
            vocab * width * (5 if summing else 2))
        return gram < build

    def _row_of(self, token: int) -> int:
        """The row holding packed token ``token`` (rows without tokens skipped)."""
        return bisect.bisect_right(self._starts, token) - 1

    def _ghost(self, rows: list[tuple[int, int, int]], grad_logits: torch.Tensor,
               hidden: torch.Tensor) -> None:
        """Norms (embedding rows, class sums) of whole short rows of one chunk: padded to one
        batch when that copy is small, else row by row on views."""
        longest = max(b - a for _, a, b in rows)
        if len(rows) * longest * grad_logits.shape[1] * grad_logits.element_size() > \
                PADDED_COPY_BYTES:
            for r, a, b in rows:
                self._ghost_row(r, grad_logits[a:b], hidden[a:b])
        else:
            self._ghost_padded(rows, grad_logits, hidden)

    def _ghost_row(self, row: int, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
        gram = bmm_f32(grad_logits, grad_logits.T) * bmm_f32(hidden, hidden.T)
        self.sq_norms[row] = gram.sum()
        if self.token_ids is not None:
            at_ids = grad_logits[:, self.token_ids[row]]  # [l, L]
            self.embedding_rows[row] = bmm_f32(at_ids.T, hidden)
        if self.class_sums is not None and self._class_of[row] >= 0:
            scaled = hidden * self.classes.scale[row].to(hidden.dtype)  # (d << V: scale h)
            self._add_to_class(self._class_of[row], grad_logits.T, scaled)

    def _ghost_padded(self, rows: list[tuple[int, int, int]], grad_logits: torch.Tensor,
                      hidden: torch.Tensor) -> None:
        if self.class_sums is not None:  # rows of one class next to each other
            rows = sorted(rows, key=lambda row: self._class_of[row[0]])
        longest = max(b - a for _, a, b in rows)
        device = hidden.device
        first = _device_ints([a for _, a, _ in rows], device)
        length = _device_ints([b - a for _, a, b in rows], device)
        offset = torch.arange(longest, device=device)
        valid = offset[None, :] < length[:, None]
        index = torch.where(valid, first[:, None] + offset[None, :], 0)
        gl = grad_logits[index] * valid[..., None].to(grad_logits.dtype)  # [k, l, V]
        h = hidden[index] * valid[..., None].to(hidden.dtype)  # [k, l, d]
        norms = (bmm_f32(gl, gl.transpose(1, 2)) * bmm_f32(h, h.transpose(1, 2))).sum((1, 2))
        row_index = _device_ints([r for r, _, _ in rows], device)
        self.sq_norms.index_copy_(0, row_index, norms)
        if self.token_ids is not None:
            ids = self.token_ids[row_index]  # [k, L]
            at_ids = torch.gather(gl, 2, ids[:, None, :].expand(-1, longest, -1))  # [k, l, L]
            self.embedding_rows.index_copy_(0, row_index, bmm_f32(at_ids.transpose(1, 2), h))
        if self.class_sums is None:
            return
        scaled = h * self.classes.scale[row_index][:, None, None].to(h.dtype)
        classes = [self._class_of[r] for r, _, _ in rows]
        start = 0
        for k, members in itertools.groupby(classes):  # each token goes to one class
            count = len(list(members))
            if k >= 0:  # (the padding rows are zero: they add nothing)
                self._add_to_class(k, gl[start:start + count].reshape(-1, gl.shape[2]).T,
                                   scaled[start:start + count].reshape(-1, h.shape[2]))
            start += count

    def _add_to_class(self, k: int, left: torch.Tensor, right: torch.Tensor) -> None:
        """``class_sums[k] += left @ right`` (the first write overwrites: no zeroing pass)."""
        addmm_f32_(self.class_sums[k], left, right, first=k not in self._written)
        self._written.add(k)

    def _build(self, row: int, grad_logits: torch.Tensor, hidden: torch.Tensor,
               last: bool) -> None:
        """Add tokens of ``row`` to its ``[V, d]`` gradient; after the last: its norm, its
        rows at the embedding's ids, and its share of its class sum."""
        first = self._open != row
        self._open = row
        gradient = self._row_gradient
        addmm_f32_(gradient, grad_logits.T, hidden, first)
        if not last:
            return
        self.sq_norms[row] = torch.linalg.vector_norm(gradient).square()
        if self.token_ids is not None:
            self.embedding_rows[row] = gradient[self.token_ids[row]]
        k = self._class_of[row] if self.class_sums is not None else -1
        if k >= 0:
            if k in self._written:
                self.class_sums[k].addcmul_(gradient, self.classes.scale[row])
            else:
                torch.mul(gradient, self.classes.scale[row], out=self.class_sums[k])
                self._written.add(k)
        self._open = None


def _device_ints(values: list[int], device: torch.device) -> torch.Tensor:
    """Host ints on ``device`` without waiting for the device (a copy from pageable memory
    would wait for the stream's earlier work)."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
