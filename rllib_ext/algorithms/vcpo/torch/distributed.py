"""What several learners share in a VCPO step (Ray-free: ``torch.distributed``).

With ``num_learners > 1`` every learner holds whole groups (the Algorithm shards the batch by
group), so corrections and baselines stay local; the learners then all-reduce (sum) the batch
size (the loss normaliser is the whole batch's ``B x R``), the sums behind the ESS and the
metrics, the skip decision, and finally every gradient. The per-sample routes write ``p.grad``
directly, which DDP would never see: VCPO reduces its gradients itself, and RLlib's DDP
wrapper is not used. Without an initialised process group of more than one rank every
operation is local.
"""

from __future__ import annotations

import torch
from torch import distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

BUCKET_BYTES = 64 << 20


class Collective:
    def __init__(self, group=None) -> None:
        self.group = group
        self.world = dist.get_world_size(group) if dist.is_available() and \
            dist.is_initialized() else 1

    @property
    def active(self) -> bool:
        return self.world > 1

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self.group)
        return values

    def max(self, values: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
        return values

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """``p.grad`` = the sum over learners, in buckets of about 64 MiB per dtype (a missing
        gradient counts as zero, so every learner reduces the same tensors)."""
        if not self.active:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        same_kind: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            same_kind.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
        for grads in same_kind.values():
            for bucket in _buckets(grads):
                flat = _flatten_dense_tensors(bucket)
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
                for grad, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket),
                                         strict=True):
                    grad.copy_(reduced)

    def check_disjoint_groups(self, group_ids: torch.Tensor) -> None:
        """Raise if two learners hold rows of one group (OPOB and GRPO baselines would then be
        computed from part of a group on each)."""
        if not self.active:
            return
        mine = sorted(set(group_ids.tolist()))
        everyone: list[list[int]] = [[] for _ in range(self.world)]
        dist.all_gather_object(everyone, mine, group=self.group)
        seen: dict[int, int] = {}
        for rank, groups in enumerate(everyone):
            for group in groups:
                if group in seen:
                    raise ValueError(
                        f"group {group} has rows on learners {seen[group]} and {rank}: VCPO's "
                        "baselines need whole groups on one learner. Fix: shard the batch by "
                        "group (vcpo_learner.group_shards), not with LearnerGroup.update("
                        "episodes=...)")
                seen[group] = rank


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    out, current, size = [], [], 0
    for t in tensors:
        current.append(t)
        size += t.numel() * t.element_size()
        if size >= BUCKET_BYTES:
            out.append(current)
            current, size = [], 0
    return out + [current] if current else out
