"""Per-token log-probs (and entropy) of response tokens, without a [B, R, V] logits tensor.

Ray-free (torch and numpy only). Batch layout (built by :func:`pack_prompt_response` from token
lists): every row is one trajectory, prompt followed by response, right-padded to L tokens::

    input_ids       [B, L]  prompt + response + padding
    attention_mask  [B, L]  1 on prompt and response tokens
    response_index  [B, R]  position in input_ids of response token j (0 where j is padding)
    response_mask   [B, R]  1 on real response tokens

Only the real response tokens reach the LM head: their hidden states are gathered into a packed
``[N, d]`` tensor (N = real response tokens of the batch, padding excluded), and
:class:`LMHeadLogProbs` runs the head over it in chunks of tokens. Per chunk: logits in the
compute dtype (bfloat16 under autocast), log-sum-exp, target logit and entropy in float32.
Nothing of size ``N x V`` is kept: the backward recomputes each chunk's logits from the saved
hidden states and the per-token log-sum-exp. Peak memory of the head is about
``chunk x V x 10`` bytes (the chunk's logits in the compute dtype plus two float32 copies),
whatever B and R are; the price is one more head matmul in the backward (the recompute).

Chunks are aligned to rows (trajectories): a chunk holds whole rows, or one piece of a row
longer than the chunk. The per-sample-gradient machinery relies on it (it sees the head's
per-token output gradients chunk by chunk in the backward, see ``HeadObserver``).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np
import torch

LM_BATCH_KEYS = ("input_ids", "attention_mask", "response_index", "response_mask")

# Bytes one chunk of the head may use (its logits in the compute dtype + two float32 copies).
DEFAULT_HEAD_CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}
_BYTES_PER_LOGIT = 10


def default_head_chunk_tokens(vocab_size: int, device: torch.device | str) -> int:
    """Tokens per chunk of the head for a device: ``DEFAULT_HEAD_CHUNK_BYTES / (10 V)``."""
    kind = torch.device(device).type
    budget = DEFAULT_HEAD_CHUNK_BYTES.get(kind, DEFAULT_HEAD_CHUNK_BYTES["cuda"])
    return max(1, budget // (_BYTES_PER_LOGIT * vocab_size))


def pack_prompt_response(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                         response_width: int | None = None) -> dict[str, torch.Tensor]:
    """Lay out (prompt, response) token lists as the batch documented in the module docstring.

    ``response_width`` fixes R (default: the longest response, at least 1).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    for row, prompt in enumerate(prompts):
        if not len(prompt):
            raise ValueError(f"row {row}: empty prompt (a response needs at least one token "
                             "of context, e.g. <bos>)")
    width = max([len(r) for r in responses] + [1]) if response_width is None else response_width
    prompt_lengths = np.array([len(p) for p in prompts])
    response_lengths = np.minimum([len(r) for r in responses], width)
    total = prompt_lengths + np.array([len(r) for r in responses])
    input_ids = np.full((len(prompts), total.max()), pad_id, dtype=np.int64)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        input_ids[row, :total[row]] = np.concatenate([prompt, response])
    columns = np.arange(input_ids.shape[1])
    attention_mask = (columns[None, :] < total[:, None]).astype(np.int64)
    response_mask = np.arange(width)[None, :] < response_lengths[:, None]
    response_index = np.where(response_mask, prompt_lengths[:, None] + np.arange(width), 0)
    return {"input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "response_index": torch.from_numpy(response_index.astype(np.int64)),
            "response_mask": torch.from_numpy(response_mask.astype(np.float32))}


def lm_rows(batch: dict[str, torch.Tensor], rows: torch.Tensor, longest: int
            ) -> dict[str, torch.Tensor]:
    """Rows ``rows`` of an LM batch, cut to ``longest`` positions (the longest of those rows:
    right padding beyond it is dropped)."""
    return {"input_ids": batch["input_ids"][rows, :longest],
            "attention_mask": batch["attention_mask"][rows, :longest],
            "response_index": batch["response_index"][rows],
            "response_mask": batch["response_mask"][rows]}


@dataclasses.dataclass(frozen=True)
class ResponseTokens:
    """The real response tokens of a batch, packed in row order (``N`` tokens).

    ``row``/``column``: where token k sits in the ``[B, R]`` response layout; ``source``: the
    position in ``input_ids`` whose hidden state predicts it (``response_index - 1``);
    ``target``: its token id; ``row_lengths``: tokens per row (host ints, B entries).
    """

    row: torch.Tensor
    column: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor
    row_lengths: tuple[int, ...]

    @property
    def count(self) -> int:
        return self.row.shape[0]


def response_tokens(batch: dict[str, torch.Tensor]) -> ResponseTokens:
    """Locate the real response tokens (``response_mask != 0``) of a batch."""
    mask = batch["response_mask"] != 0
    row, column = mask.nonzero(as_tuple=True)  # row-major: row order, then column order
    position = batch["response_index"][row, column]
    lengths = mask.sum(dim=1).tolist()
    return ResponseTokens(row=row, column=column, source=(position - 1).clamp(min=0),
                          target=batch["input_ids"][row, position], row_lengths=tuple(lengths))


def chunk_bounds(row_lengths: tuple[int, ...], chunk_tokens: int) -> tuple[tuple[int, int], ...]:
    """Row-aligned ``(lo, hi)`` token ranges of at most ``chunk_tokens`` tokens each: whole
    consecutive rows, or pieces of one row when the row alone is longer."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1; got {chunk_tokens}")
    bounds, start, lo = [], 0, 0
    for length in row_lengths:
        end = start + length
        if length > chunk_tokens:  # close the open chunk, then pieces of this row
            if lo < start:
                bounds.append((lo, start))
            bounds += [(a, min(end, a + chunk_tokens)) for a in range(start, end, chunk_tokens)]
            lo = end
        elif end - lo > chunk_tokens:
            bounds.append((lo, start))
            lo = start
        start = end
    if lo < start:
        bounds.append((lo, start))
    return tuple(bounds)


@dataclasses.dataclass(frozen=True)
class HeadInputs:
    """What the chunked head saw: enough to recompute any chunk's logits later."""

    hidden: torch.Tensor  # [N, d]
    weight: torch.Tensor  # [V, d] (the parameter, any dtype)
    bias: torch.Tensor | None
    target: torch.Tensor  # [N]
    row: torch.Tensor  # [N] the trajectory of each token
    row_lengths: tuple[int, ...]  # tokens per trajectory (host ints)
    log_normalizer: torch.Tensor  # [N] float32 log-sum-exp of the tempered logits
    temperature: float
    bounds: tuple[tuple[int, int], ...]
    compute_dtype: torch.dtype


class HeadObserver(Protocol):
    """Takes over the head weight's gradient (per-sample gradients of the head): told of the
    forward, then given each chunk's ``grad_logits = d objective / d (W h)`` ``[hi - lo, V]``
    and inputs ``hidden`` ``[hi - lo, d]`` (both in the compute dtype) during the backward, and
    finally the per-token ``upstream = d objective / d logp`` ``[N]``."""

    def head_forward(self, head: HeadInputs) -> None: ...

    def head_chunk(self, head: HeadInputs, lo: int, hi: int, grad_logits: torch.Tensor,
                   hidden: torch.Tensor) -> None: ...

    def head_done(self, head: HeadInputs, upstream: torch.Tensor) -> None: ...


def _logits(head: HeadInputs, lo: int, hi: int, weight: torch.Tensor) -> torch.Tensor:
    """Tempered float32 logits of tokens ``lo:hi`` (matmul in the compute dtype)."""
    z = head.hidden[lo:hi].to(head.compute_dtype) @ weight.T
    if head.bias is not None:
        z = z + head.bias.to(head.compute_dtype)
    z = z.float()
    return z / head.temperature if head.temperature != 1.0 else z


def head_grad_logits(head: HeadInputs, lo: int, hi: int, upstream: torch.Tensor,
                     weight: torch.Tensor) -> torch.Tensor:
    """``d objective / d (W h)`` for tokens ``lo:hi``, given ``upstream = d objective / d logp``
    per token: ``upstream_t (onehot(y_t) - softmax_t) / T`` (float32, ``[hi - lo, V]``)."""
    z = _logits(head, lo, hi, weight)
    grad = torch.exp(z.sub_(head.log_normalizer[lo:hi, None])).mul_(-upstream[:, None])
    grad.scatter_add_(1, head.target[lo:hi, None], upstream[:, None])
    return grad / head.temperature if head.temperature != 1.0 else grad


def head_weight_grad(head: HeadInputs, upstream: torch.Tensor) -> tuple[torch.Tensor,
                                                                         torch.Tensor | None]:
    """``(d objective / d W, d objective / d b)`` of the head for per-token ``upstream``
    weights (float32), recomputing each chunk's logits: the head's share of a weighted
    gradient ``sum_t upstream_t grad logp_t``."""
    weight = head.weight.detach().to(head.compute_dtype)
    grad_w = torch.zeros(head.weight.shape, dtype=torch.float32, device=head.weight.device)
    grad_b = None if head.bias is None else torch.zeros(
        head.bias.shape, dtype=torch.float32, device=head.weight.device)
    with torch.no_grad():
        for lo, hi in head.bounds:
            grad = head_grad_logits(head, lo, hi, upstream[lo:hi], weight)
            grad_w += (grad.to(head.compute_dtype).T @ head.hidden[lo:hi].to(head.compute_dtype)
                       ).float()
            if grad_b is not None:
                grad_b += grad.sum(0)
    return grad_w, grad_b


class LMHeadLogProbs(torch.autograd.Function):
    """``(logp [N], entropy [N])`` of the target tokens under ``softmax((W h + b) / T)``, in
    row-aligned chunks (see the module docstring); differentiable in ``hidden``, ``weight`` and
    ``bias`` through ``logp`` (the entropy is a diagnostic, not differentiable)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens: ResponseTokens, temperature, bounds,
                compute_dtype, observer):
        with torch.autocast(hidden.device.type, enabled=False), torch.no_grad():
            w = weight.detach().to(compute_dtype)
            log_normalizer = torch.empty(hidden.shape[0], dtype=torch.float32,
                                         device=hidden.device)
            head = HeadInputs(hidden.detach(), weight.detach(), None if bias is None
                              else bias.detach(), tokens.target, tokens.row, tokens.row_lengths,
                              log_normalizer, temperature, bounds, compute_dtype)
            logp = torch.empty_like(log_normalizer)
            entropy = torch.empty_like(log_normalizer)
            for lo, hi in bounds:
                z = _logits(head, lo, hi, w)
                lse = torch.logsumexp(z, dim=-1)
                log_normalizer[lo:hi] = lse
                logp[lo:hi] = z.gather(1, head.target[lo:hi, None])[:, 0] - lse
                probs = torch.exp(z - lse[:, None])
                entropy[lo:hi] = lse - (probs * z).sum(-1)
        if observer is not None:
            observer.head_forward(head)
        # The inputs are kept detached in ``head`` (no reference back into the graph).
        ctx.head, ctx.observer = head, observer
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        head, observer = ctx.head, ctx.observer
        hidden, weight, bias, dtype = head.hidden, head.weight, head.bias, head.compute_dtype
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
            if want_b else None
        upstream = grad_logp.float()
        with torch.autocast(hidden.device.type, enabled=False), torch.no_grad():
            w = weight.to(dtype)
            for lo, hi in head.bounds:
                grad = head_grad_logits(head, lo, hi, upstream[lo:hi], w)
                if grad_b is not None:
                    grad_b += grad.sum(0)
                grad = grad.to(dtype)
                h = hidden[lo:hi].to(dtype)
                if grad_h is not None:
                    grad_h[lo:hi] = grad @ w
                if grad_w is not None:
                    grad_w += (grad.T @ h).float()
                if observer is not None:
                    observer.head_chunk(head, lo, hi, grad, h)
            if observer is not None:
                observer.head_done(head, upstream)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None)


def compute_dtype_for(device: torch.device | str, fallback: torch.dtype) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on for ``device``, else ``fallback``."""
    kind = torch.device(device).type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else fallback


def response_log_probs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0, *,
                       chunk_tokens: int | None = None, head_observer: HeadObserver | None = None,
                       return_entropy: bool = False):
    """Per-token log-probs ``[B, R]`` (float32, zero on padding) of the response tokens under
    a Hugging Face causal LM, the logits divided by the sampling ``temperature`` (directly
    comparable with the engine's behaviour log-probs). With ``return_entropy``, also the
    per-token entropy ``[B, R]`` of the tempered next-token distribution (detached).

    ``chunk_tokens``: tokens per head chunk (default: :func:`default_head_chunk_tokens`).
    ``head_observer``: per-sample-gradient machinery that takes over the head weight's gradient
    (the head then gets no ``.grad`` from autograd; see ``per_sample.PerSampleGradients``).
    """
    tokens = response_tokens(batch)
    hidden = model.get_decoder()(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).last_hidden_state
    head = model.get_output_embeddings()
    chunk = chunk_tokens or default_head_chunk_tokens(head.weight.shape[0], hidden.device)
    bounds = chunk_bounds(tokens.row_lengths, chunk)
    weight, bias = head.weight, head.bias
    if head_observer is not None:  # the observer builds the head's gradients itself
        weight = weight.detach()
        bias = None if bias is None else bias.detach()
    packed = hidden[tokens.row, tokens.source]  # only real response tokens reach the head
    logp, entropy = LMHeadLogProbs.apply(
        packed, weight, bias, tokens, float(temperature), bounds,
        compute_dtype_for(hidden.device, hidden.dtype), head_observer)
    shape = batch["response_mask"].shape
    logp = logp.new_zeros(shape).index_put((tokens.row, tokens.column), logp)
    if not return_entropy:
        return logp
    return logp, entropy.new_zeros(shape).index_put((tokens.row, tokens.column), entropy)
