"""Per-sample gradients of the chunked LM head's weight (``rllib_ext.llm.log_probs``).

The head ``W [V, d]`` sees only real response tokens, packed ``[N, d]``; its backward runs in
row-aligned chunks and hands each chunk's output gradient ``gl [c, V]`` and inputs
``h [c, d]`` to :class:`HeadRecorder`, which takes trajectory b's squared norm
``||G_b||^2``, ``G_b = sum_{t in b} gl_t h_t^T``, per row:

* rows of at most ``d`` tokens inside one chunk: ghost norm from ``l x l`` Gram matrices,
  ``sum_{t,s} (gl_t . gl_s)(h_t . h_s)``, ``O(l^2 (V + d))`` (rows of a chunk padded to a batch);
* longer rows, or rows split over several chunks: ``G_b`` built in a ``[V, d]`` float32 buffer
  (one per open row), ``O(l V d)``, the cost of the head's own weight-gradient matmul.

When the head's weight is tied to the input embedding, the norm of the sum needs the inner
product with the embedding's piece ``sum_t onehot(x_t) e_t^T``:
``<G_head,b, G_emb,b> = sum_t <G_head,b[x_t], e_t>``, so the recorder also keeps
``G_head,b[x_bt]`` for the row's input tokens ``x_bt`` (``[B, L, d]``, one activation's size).

The weighted gradient ``sum_b c_b G_b`` is the head's weight gradient for per-token upstream
weights ``c_b u_t``: it is recomputed chunk by chunk (``log_probs.head_weight_grad``), one
head forward plus one weight-gradient matmul, instead of keeping ``B`` gradients of ``V x d``.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools

import torch

from rllib_ext.algorithms.vcpo.torch.per_sample.factored import Factored
from rllib_ext.algorithms.vcpo.torch.per_sample.precision import bmm_f32
from rllib_ext.llm.log_probs import HeadInputs, head_weight_grad


@dataclasses.dataclass
class HeadPiece:
    """The head weight's per-sample gradient after its backward: norms, the rows the tied
    embedding meets, and what the weighted sum recomputes from."""

    sq_norms: torch.Tensor  # [B] float32
    embedding_rows: torch.Tensor | None  # [B, L, d] float32: G_head,b[x_bt]
    head: HeadInputs
    upstream: torch.Tensor  # [N] d objective / d logp_t

    def inner_with_embedding(self, piece: Factored) -> torch.Tensor:
        """``<G_head,b, G_emb,b>`` ``[B]`` for an embedding piece (one-hot left factor)."""
        if self.embedding_rows is None:
            raise RuntimeError("the head's recorder was not given the embedding's token ids")
        trimmed = piece.trimmed()
        rows = self.embedding_rows[:, : trimmed.active]
        return (rows * trimmed.right.float()).sum(dim=(1, 2))

    def weighted_sum(self, coefficients: torch.Tensor) -> torch.Tensor:
        upstream = self.upstream * coefficients.to(self.upstream.device)[self.head.row]
        return head_weight_grad(self.head, upstream)[0]


class HeadRecorder:
    """Builds the :class:`HeadPiece` of one backward from the head's chunks (see the module
    docstring). ``token_ids [B, L]``: the embedding's input when the head's weight is tied to
    it (else None); ``ghost_max_tokens``: the longest row whose norm uses Gram matrices."""

    def __init__(self, batch: int, token_ids: torch.Tensor | None, ghost_max_tokens: int) -> None:
        self.batch, self.token_ids, self.ghost_max_tokens = batch, token_ids, ghost_max_tokens
        self.sq_norms: torch.Tensor | None = None
        self.embedding_rows: torch.Tensor | None = None
        self._open: tuple[int, torch.Tensor] | None = None  # a row built over several chunks
        self._starts: list[int] = []

    def chunk(self, head: HeadInputs, lo: int, hi: int, grad_logits: torch.Tensor,
              hidden: torch.Tensor) -> None:
        if self.sq_norms is None:
            self._start(head, hidden)
        row = self._row_of(lo)
        start, end = self._starts[row], self._starts[row + 1]
        if start < lo or end > hi:  # a piece of a row longer than the chunk
            self._build(row, grad_logits, hidden, last=end <= hi)
            return
        rows, bounds = [], []
        while row < len(head.row_lengths) and self._starts[row + 1] <= hi:
            bounds.append((self._starts[row] - lo, self._starts[row + 1] - lo))
            rows.append(row)
            row += 1
        short = [(r, b) for r, b in zip(rows, bounds) if 0 < b[1] - b[0] <= self.ghost_max_tokens]
        if short:
            self._ghost([r for r, _ in short], [b for _, b in short], grad_logits, hidden)
        for r, (a, b) in zip(rows, bounds):
            if b - a > self.ghost_max_tokens:
                self._build(r, grad_logits[a:b], hidden[a:b], last=True)

    def finish(self, head: HeadInputs, upstream: torch.Tensor) -> HeadPiece:
        if self.sq_norms is None:  # no response token at all
            self.sq_norms = torch.zeros(self.batch, dtype=torch.float32,
                                        device=head.hidden.device)
        return HeadPiece(self.sq_norms, self.embedding_rows, head, upstream)

    # -- internals -----------------------------------------------------------------------------

    def _start(self, head: HeadInputs, hidden: torch.Tensor) -> None:
        if len(head.row_lengths) != self.batch:
            raise ValueError(f"the head saw {len(head.row_lengths)} rows; the batch has "
                             f"{self.batch}")
        self._starts = [0, *itertools.accumulate(head.row_lengths)]
        self.sq_norms = torch.zeros(self.batch, dtype=torch.float32, device=hidden.device)
        if self.token_ids is not None:
            self.embedding_rows = torch.zeros(
                (*self.token_ids.shape, hidden.shape[1]), dtype=torch.float32,
                device=hidden.device)

    def _row_of(self, token: int) -> int:
        """The row holding packed token ``token`` (rows without tokens skipped)."""
        return bisect.bisect_right(self._starts, token) - 1

    def _ghost(self, rows: list[int], bounds: list[tuple[int, int]], grad_logits: torch.Tensor,
               hidden: torch.Tensor) -> None:
        """Norms (and embedding rows) of whole short rows of one chunk, padded to a batch."""
        longest = max(b - a for a, b in bounds)
        device = hidden.device
        first = torch.tensor([a for a, _ in bounds], device=device)
        length = torch.tensor([b - a for a, b in bounds], device=device)
        offset = torch.arange(longest, device=device)
        valid = offset[None, :] < length[:, None]
        index = torch.where(valid, first[:, None] + offset[None, :], 0)
        gl = grad_logits[index] * valid[..., None].to(grad_logits.dtype)  # [k, l, V]
        h = hidden[index] * valid[..., None].to(hidden.dtype)  # [k, l, d]
        norms = (bmm_f32(gl, gl.transpose(1, 2)) * bmm_f32(h, h.transpose(1, 2))).sum((1, 2))
        row_index = torch.tensor(rows, device=device)
        self.sq_norms.index_copy_(0, row_index, norms)
        if self.token_ids is not None:
            ids = self.token_ids[row_index]  # [k, L]
            at_ids = torch.gather(gl, 2, ids[:, None, :].expand(-1, longest, -1))  # [k, l, L]
            self.embedding_rows.index_copy_(0, row_index, bmm_f32(at_ids.transpose(1, 2), h))

    def _build(self, row: int, grad_logits: torch.Tensor, hidden: torch.Tensor,
               last: bool) -> None:
        """Add tokens of ``row`` to its ``[V, d]`` gradient; take its norm after the last."""
        if self._open is None or self._open[0] != row:
            self._open = (row, torch.zeros(grad_logits.shape[1], hidden.shape[1],
                                           dtype=torch.float32, device=hidden.device))
        gradient = self._open[1]
        gradient += bmm_f32(grad_logits.T, hidden)
        if not last:
            return
        self.sq_norms[row] = gradient.square().sum()
        if self.token_ids is not None:
            self.embedding_rows[row] = gradient[self.token_ids[row]]
        self._open = None
