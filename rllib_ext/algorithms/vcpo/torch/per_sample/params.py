"""One parameter's per-sample gradient: the pieces its module calls give, the route that turns
them into norms (planned from a FLOP + memory-traffic estimate), and its weighted sum."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from rllib_ext.algorithms.vcpo.torch.per_sample.buffers import Workspace
from rllib_ext.algorithms.vcpo.torch.per_sample.factored import (
    Factored,
    PieceShape,
    WeightedSumCache,
    ghost_inner,
    ghost_sq_norms,
)
from rllib_ext.algorithms.vcpo.torch.per_sample.head import HeadPiece
from rllib_ext.algorithms.vcpo.torch.per_sample.precision import bmm_f32

STRATEGIES = ("auto", "materialize", "chunked", "ghost")

Piece = Factored | torch.Tensor | HeadPiece


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def accumulate_into_grad(param: nn.Parameter, grad: torch.Tensor) -> None:
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


def sq_norms_of(per_sample: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(per_sample.flatten(1), dim=1, dtype=torch.float32).square()


def _like(piece: Factored | torch.Tensor) -> torch.Tensor:
    return piece.right if isinstance(piece, Factored) else piece


class ParamGrads:
    """The per-sample gradient of one parameter, built from the pieces its module calls give.

    A parameter used by several calls (tied embeddings, a reused module) gets one piece per
    call; the pieces are summed per sample BEFORE the norm is taken. Pieces arrive during the
    backward pass (from tensor hooks, while the output gradient is still in cache; the chunked
    LM head's from its own backward, see ``head.py``); the norm is taken as soon as the last
    expected piece is in.
    """

    def __init__(self, name: str, param: nn.Parameter, batch: int) -> None:
        self.name, self.param, self.batch = name, param, batch
        self.shapes: list[PieceShape] = []  # of the factored pieces to come
        self.expected = 0  # pieces to come, factored, dense and head
        self.expects_head = False
        self.route = "materialize"
        self.factored: list[Factored] = []
        self.dense: list[torch.Tensor] = []  # [B, *shape] each
        self.head: HeadPiece | None = None
        self.stored: torch.Tensor | None = None  # [B, *shape] (materialize)
        self.received = 0
        self.norms: torch.Tensor | None = None

    # -- planning ------------------------------------------------------------------------------

    def route_costs(self, memory_cost: float) -> dict[str, float]:
        """Rough cost (FLOPs, memory traffic weighted by ``memory_cost`` FLOPs per element, see
        ``device_costs``) of each route: building/normalising the per-sample gradients plus the
        later weighted sum."""
        rows, cols = self.param.shape[0], self.param.numel() // self.param.shape[0]
        batch = self.batch
        build = reread = ghost = 0
        for j, a in enumerate(self.shapes):
            left = 0 if a.indexed else rows
            build += batch * a.length * cols * (1 if a.indexed else 2 * rows)
            reread += memory_cost * batch * a.length * (cols + left)
            for b in self.shapes[j:]:
                both = 0 if a.indexed or b.indexed else rows
                ghost += 2 * batch * a.length * b.length * (cols + both)
        return {
            # bmm into storage; the stored gradients are written, normed and summed: 3 passes
            "materialize": build + memory_cost * 3 * batch * rows * cols,
            # built in cache-sized chunks (written, then read for the norm), rebuilt summed by
            # one matmul later
            "chunked": 2 * build + reread + memory_cost * 2 * batch * rows * cols,
            # Gram matrices for the norm, one matmul later
            "ghost": ghost + build + reread,
        }

    def choose_route(self, strategy: str, budget_bytes: int, chunk_bytes: int,
                     memory_cost: Callable[[int], float]) -> int:
        """Pick the route (``memory_cost(nbytes)``: the device's cost of moving one element of
        an ``nbytes`` tensor); returns the bytes of per-sample storage it keeps."""
        sample_bytes = self.param.numel() * self.param.element_size()
        stored_bytes = self.batch * sample_bytes
        has_dense = self.expected > len(self.shapes) + self.expects_head
        if not self.shapes:  # biases, norm weights ([B, d], stored), or the head alone
            self.route = "materialize"
        elif strategy == "auto":
            costs = self.route_costs(memory_cost(stored_bytes))
            if stored_bytes > budget_bytes or self.expects_head:
                del costs["materialize"]  # (the head's piece pairs with factored pieces)
            if sample_bytes > chunk_bytes and len(costs) > 1:
                del costs["chunked"]
            if has_dense:
                del costs["ghost"]
            self.route = min(costs, key=costs.get)
        elif strategy == "ghost" and has_dense:
            self.route = "chunked"
        elif strategy == "materialize" and self.expects_head:
            self.route = "ghost" if not has_dense else "chunked"
        else:
            self.route = strategy
        return stored_bytes if self.route == "materialize" and self.shapes else 0

    # -- pieces --------------------------------------------------------------------------------

    def add(self, piece: Piece, workspace: Workspace) -> None:
        if isinstance(piece, HeadPiece):
            self.head = piece
        elif self.route == "materialize":
            self._store(piece, workspace)
        elif isinstance(piece, Factored):
            self.factored.append(piece)
        else:
            self.dense.append(piece)
        self.received += 1
        if self.received == self.expected:
            self.norms = self._sq_norms(workspace)
            for j, piece in enumerate(self.factored):
                if piece.live is not None:
                    piece.compact(f"{self.name}#{j}", workspace)

    def _store(self, piece: Factored | torch.Tensor, workspace: Workspace) -> None:
        first = self.stored is None
        if first and self.expected == 1 and not isinstance(piece, Factored):
            self.stored = piece  # a lone dense piece is already the per-sample gradient
            return
        if first:
            flat = workspace.buffer(f"store:{self.name}", self.batch * self.param.numel(),
                                    _like(piece))
            self.stored = flat[: self.batch * self.param.numel()].view(self.batch, *self.param.shape)
        if isinstance(piece, Factored):
            piece.trimmed().add_into(self.stored.view(self.batch, piece.rows, -1), 0, self.batch,
                                     first)
        elif first:
            self.stored.copy_(piece)
        else:
            self.stored.add_(piece)

    def _fill(self, flat: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Write ``G[lo:hi]`` (all factored and dense pieces summed) into the flat scratch
        tensor ``flat``."""
        shaped = flat[: (hi - lo) * self.param.numel()].view(hi - lo, *self.param.shape)
        first = True
        for f in self.factored:
            f.trimmed().add_into(shaped.view(hi - lo, f.rows, -1), lo, hi, first)
            first = False
        for d in self.dense:
            shaped.copy_(d[lo:hi]) if first else shaped.add_(d[lo:hi])
            first = False
        return shaped

    def _sq_norms(self, workspace: Workspace) -> torch.Tensor:
        total = self._head_sq_norms() if self.head is not None else 0
        if self.route == "materialize":
            return total + sq_norms_of(self.stored) if self.stored is not None else total
        if self.route == "chunked":
            numel = self.param.numel()
            if not (self.factored or self.dense):
                return total
            flat = workspace.buffer("chunk", numel, _like((self.factored or self.dense)[0]))
            chunk = max(1, flat.numel() // numel)
            return total + torch.cat([sq_norms_of(self._fill(flat, lo, min(self.batch, lo + chunk)))
                                      for lo in range(0, self.batch, chunk)])
        for j, a in enumerate(self.factored):  # ghost
            total = total + ghost_sq_norms(a, workspace)
            for b in self.factored[j + 1 :]:
                total = total + 2 * ghost_inner(a.trimmed(), b.trimmed())
        return total

    def _head_sq_norms(self) -> torch.Tensor:
        """The head's own ``||G_head,b||^2`` plus twice its inner products with the other
        pieces (an embedding tied to the head)."""
        total = self.head.sq_norms
        for piece in self.factored:
            if not piece.indexed:
                raise RuntimeError(
                    f"parameter {self.name!r} is the chunked LM head's weight and also a "
                    "linear layer's: per-sample gradients support sharing it with an embedding "
                    "only")
            total = total + 2 * self.head.inner_with_embedding(piece)
        return total

    def finish(self, workspace: Workspace) -> torch.Tensor | None:
        """``||G_b||^2`` ``[B]`` once the backward is over (``None``: the parameter was unused)."""
        if self.norms is None and self.received:  # a call's output never reached logp
            self.norms = self._sq_norms(workspace)
        return self.norms

    def weighted_sum(self, coefficients: torch.Tensor, cache: WeightedSumCache,
                     class_values: torch.Tensor | None = None) -> torch.Tensor | None:
        """``sum_b c_b G_b`` (float32): one ``[B] x [B, P]`` product when stored, else one
        matmul a piece (the head's: recomputed, see ``HeadPiece.weighted_sum``)."""
        if not self.received:
            return None
        c = coefficients.to(accumulation_dtype(self.param.dtype))
        parts = [f.weighted_sum(c, cache).view(self.param.shape) for f in self.factored]
        parts += [torch.tensordot(c, d.to(c.dtype), dims=1) for d in self.dense]
        if self.stored is not None:
            flat = self.stored.reshape(self.batch, -1)
            parts.append(bmm_f32(c[None].to(flat.dtype), flat).view(self.param.shape))
        if self.head is not None:
            parts.append(self.head.weighted_sum(c, class_values).view(self.param.shape))
        return functools.reduce(torch.add, parts)
