"""``PerSampleGradients``: exact per-trajectory score-function gradients from one forward and
one backward pass (see the package docstring for the routes and their cost)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from rllib_ext.algorithms.vcpo.torch.per_sample.buffers import Workspace, tensor_key
from rllib_ext.algorithms.vcpo.torch.per_sample.device_costs import memory_cost
from rllib_ext.algorithms.vcpo.torch.per_sample.factored import (
    Factored,
    PieceShape,
    WeightedSumCache,
    active_length,
)
from rllib_ext.algorithms.vcpo.torch.per_sample.head import HeadRecorder, RowClasses
from rllib_ext.algorithms.vcpo.torch.per_sample.modules import (
    Call,
    Hooked,
    UnsupportedModuleError,
    hook_modules,
    trainable_named_parameters,
    unit_affine_output,
)
from rllib_ext.algorithms.vcpo.torch.per_sample.params import (
    STRATEGIES,
    ParamGrads,
    accumulate_into_grad,
)
from rllib_ext.llm.log_probs import HeadInputs

ForwardFn = Callable[..., torch.Tensor]


def score_objective(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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


class PerSampleGradients:
    """Exact per-trajectory score-function gradients from one forward and one backward pass.

    Usage (one optimiser step)::

        psg = PerSampleGradients(model)
        with psg.capture():
            logp = forward_fn(model, batch, head_observer=psg)  # [B, T]; hooks record
        sq_norms = psg.backward(logp, mask)               # ||g_i||^2, [B] float64
        coefficients = ...                                # e.g. -A_i * w_i / normalizer
        psg.accumulate_grads(coefficients)                # p.grad += sum_i c_i g_i

    ``forward_fn`` gets this object as ``head_observer``: a forward that runs the chunked LM
    head (``rllib_ext.llm.log_probs.response_log_probs``) passes it as ``head_observer``, so
    the head's per-sample gradient is taken inside the head's own backward (see ``head.py``).

    ``g_i = grad_theta sum_t mask_it logp_it``; ``mask`` may be float (per-token weights known
    after the forward, e.g. token TIS, then enter ``g_i``). ``accumulate_grads`` *adds* to
    ``p.grad`` like ``loss.backward()`` does. To get the gradient of
    ``losses.policy_gradient_loss(logp, mask, c, N)`` pass ``coefficients = -c / N``.

    Cost: the forward, and a backward in which autograd computes only input gradients (it is
    asked for the gradients of the hooked layer outputs, not of the weights). Tensor hooks on
    those outputs receive each output gradient as soon as it exists and build the per-sample
    weight gradients right there, while it is in cache, by one of three exact routes per
    parameter (``strategy`` forces one; ``"auto"`` picks the cheapest by a FLOP + memory-traffic
    estimate, see ``ParamGrads.route_costs`` and ``device_costs``):

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
      On a CPU the Gram diagonal shows which rows ``(i, t)`` have a nonzero output gradient:
      the hook copies just those rows of ``g`` and ``a`` into reused buffers (an input read by
      several layers once), and the weighted sum multiplies only them.

    Under bfloat16 autocast the factors stay in bfloat16 (a layer input that is float32, the
    residual stream, is cast once per capture, as autocast casts it for the layer itself);
    Gram matrices, norms and the weighted sums accumulate in float32. On a GPU the hooks never
    read values on the host (no trailing-zero trimming, no live-row compaction).

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
        head_class_bytes: int | None = None,
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
                "backward pass - disable it (model.gradient_checkpointing_disable()) or use "
                "the loop route"
            )
        self.model = model
        self.strategy = strategy
        self.materialize_budget_bytes = materialize_budget_bytes
        self.chunk_bytes = chunk_bytes
        device = next(model.parameters()).device
        #: memory for the head's per-class sums (see ``RowClasses``): 1 GiB on a CPU, 8 on a GPU
        self.head_class_bytes = head_class_bytes if head_class_bytes is not None else \
            (8 << 30 if device.type == "cuda" else 1 << 30)
        self._memory_cost = functools.partial(memory_cost, device)  # of a tensor's bytes
        self._param_names = {id(p): n for n, p in trainable_named_parameters(model)}
        self._params_by_address = {p.data_ptr(): p for _, p in model.named_parameters()
                                   if p.requires_grad}
        self._hooked: list[Hooked] = hook_modules(model)
        self._calls: list[Call] | None = None
        self._head: HeadInputs | None = None
        self._head_recorder: HeadRecorder | None = None
        self._records: dict[int, ParamGrads] | None = None
        self._capturing = False
        self._casts: dict[tuple, torch.Tensor] = {}
        self._pending: list[ParamGrads] | None = None
        self._classes: RowClasses | None = None
        self._batch_size = 0
        self._workspace = Workspace(chunk_bytes)
        self._active_hints: dict[int, int] = {}  # see active_length; per backward
        self._exact_division: dict[int, bool] = {}  # per scale module; see _scale_weight_piece
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
        self._calls, self._head, self._capturing = [], None, True
        try:
            with torch.enable_grad():
                yield
        finally:
            self._capturing = False
            self._casts.clear()
            for handle in handles:
                handle.remove()

    def _record(
        self, hooked: Hooked, module: nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> None:
        if not self._capturing:
            return
        x = args[0] if args else next(iter(kwargs.values()))
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            raise RuntimeError(
                f"module {hooked.name!r} produced an output without grad_fn; run the forward "
                "with gradients enabled and trainable parameters"
            )
        version = x._version
        if hooked.kind == "linear":
            x = self._as_computed(x)
        self._calls.append(Call(hooked, x.detach(), output, version, output._version))

    def _as_computed(self, x: torch.Tensor) -> torch.Tensor:
        """A linear layer's input as the layer multiplied it: autocast casts a float32 input to
        its dtype (cast once per input tensor, shared by the layers that read it)."""
        kind = x.device.type
        if not (torch.is_autocast_enabled(kind) and x.dtype == torch.float32):
            return x
        key = tensor_key(x)
        if key not in self._casts:
            self._casts[key] = x.detach().to(torch.get_autocast_dtype(kind))
        return self._casts[key]

    # -- the chunked LM head (rllib_ext.llm.log_probs.HeadObserver) ----------------------------

    def head_forward(self, head: HeadInputs) -> None:
        if not self._capturing:
            raise RuntimeError("the chunked head reported a forward outside capture()")
        if head.bias is not None and head.bias.data_ptr() in self._params_by_address:
            raise UnsupportedModuleError(
                "the LM head has a trainable bias, which the chunked head's per-sample "
                "gradients do not support; freeze it or use the loop route")
        if self._head is not None:
            raise RuntimeError("the chunked head ran twice in one capture")
        self._head = head

    def head_chunk(self, head: HeadInputs, lo: int, hi: int, grad_logits: torch.Tensor,
                   hidden: torch.Tensor) -> None:
        self._head_recorder.chunk(head, lo, hi, grad_logits, hidden)

    def head_done(self, head: HeadInputs, upstream: torch.Tensor) -> None:
        piece = self._head_recorder.finish(head, upstream)
        self._records[id(self._head_param())].add(piece, self._workspace)

    def _head_param(self) -> nn.Parameter:
        param = self._params_by_address.get(self._head.weight.data_ptr())
        if param is None:
            raise RuntimeError("the chunked head's weight is not a trainable parameter of the "
                               "model")
        return param

    # -- phase 2: backward --------------------------------------------------------------------

    def backward(self, logp: torch.Tensor, mask: torch.Tensor,
                 classes: RowClasses | None = None) -> torch.Tensor:
        """Per-trajectory ``||g_i||^2`` (``[B]``, float64) for the captured forward.

        Runs the backward pass (input gradients only), building the per-sample weight gradients
        on the way, and keeps what ``accumulate_grads`` needs. ``classes``: the form the
        coefficients will have (then pass ``class_values`` to ``accumulate_grads``), which
        spares the chunked head its recomputation.
        """
        if not self._calls and self._head is None:
            raise RuntimeError("nothing captured: run forward_fn inside `with psg.capture():`")
        calls, self._calls = self._calls or [], None
        objective = score_objective(logp, mask)
        batch = logp.shape[0]
        self._check_calls(calls, batch)
        self._classes = classes
        self._records = records = self._plan(calls, batch)
        self._active_hints.clear()
        handles = [
            call.output.register_hook(functools.partial(self._on_output_grad, call, records))
            for call in calls
        ]
        try:
            # The gradients come back through the hooks (and the head's backward); the
            # returned tuple is not needed. Without hooked calls, the head alone: ask for
            # the gradient of logp itself so that the head's backward runs.
            targets = [c.output for c in calls] or [logp]
            torch.autograd.grad(objective, targets, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
            self._records, self._head, self._head_recorder = None, None, None
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
    def _check_calls(calls: list[Call], batch: int) -> None:
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

    def _plan(self, calls: list[Call], batch: int) -> dict[int, ParamGrads]:
        """One record per trainable parameter the calls touch, with its route."""
        records: dict[int, ParamGrads] = {}

        def expect(param: nn.Parameter | None, shape: PieceShape | None) -> ParamGrads | None:
            if param is None:
                return None
            if id(param) not in records:
                records[id(param)] = ParamGrads(self._param_names[id(param)], param, batch)
            records[id(param)].expected += 1
            if shape is not None:
                records[id(param)].shapes.append(shape)
            return records[id(param)]

        embedding_ids: dict[int, torch.Tensor] = {}
        for call in calls:
            hooked = call.hooked
            if hooked.kind == "linear":
                length = call.output.numel() // (batch * call.output.shape[-1])
                expect(hooked.weight, PieceShape(indexed=False, length=length))
            elif hooked.kind == "embedding":
                expect(hooked.weight, PieceShape(indexed=True, length=call.input.numel() // batch))
                if hooked.weight is not None:
                    embedding_ids[id(hooked.weight)] = call.input.reshape(batch, -1)
            else:
                expect(hooked.weight, None)
                self._exact_division[id(hooked.module)] = _divides_exactly(hooked.module)
            expect(hooked.bias, None)
        if self._head is not None:
            param = self._head_param()
            record = expect(param, None)
            record.expects_head = True
            self._head_recorder = HeadRecorder(batch, embedding_ids.get(id(param)),
                                               self._memory_cost, self._workspace,
                                               self._classes, self.head_class_bytes)
        budget = self.materialize_budget_bytes
        for rec in records.values():
            budget -= rec.choose_route(self.strategy, budget, self.chunk_bytes,
                                       self._memory_cost)
        self.last_plan = {rec.name: rec.route for rec in records.values()}
        return records

    def _on_output_grad(
        self, call: Call, records: dict[int, ParamGrads], grad: torch.Tensor
    ) -> None:
        """Tensor hook: turn one output gradient into per-sample weight-gradient pieces."""
        hooked, batch = call.hooked, grad.shape[0]
        g = grad.reshape(batch, -1, grad.shape[-1])
        pieces: list[tuple[nn.Parameter, Factored | torch.Tensor]] = []
        if hooked.kind == "linear":
            if hooked.weight is not None:
                a = call.input.reshape(batch, -1, call.input.shape[-1])
                pieces.append((hooked.weight, Factored(g, a, g.shape[-1],
                                                       active_length(g, self._active_hints))))
        elif hooked.kind == "embedding":
            index = call.input.reshape(batch, -1)
            padding_idx = hooked.module.padding_idx
            if padding_idx is not None:  # autograd gives the padding row no gradient
                g = g.masked_fill((index == padding_idx)[..., None], 0)
            pieces.append((hooked.weight, Factored(index, g, hooked.module.num_embeddings,
                                                   active_length(g, self._active_hints))))
        elif hooked.weight is not None:  # "scale": y = weight * h(x) + bias
            pieces.append((hooked.weight, self._scale_weight_piece(call, g)))
        if hooked.bias is not None:
            pieces.append((hooked.bias, g.sum(dim=1)))
        for param, piece in pieces:
            records[id(param)].add(piece, self._workspace)

    def _scale_weight_piece(self, call: Call, g: torch.Tensor) -> torch.Tensor:
        """``sum_t g_bt * h_bt`` for ``y = weight * h(x) (+ bias)``, ``[B, d]``.

        Without a bias and with no zero weight (checked before the backward), ``h = y / weight``
        and the division can move out of the sum: ``(sum_t g_bt * y_bt) / weight`` (exact up
        to float32 rounding; this saves re-running the norm). Otherwise ``h`` is recomputed.
        """
        module = call.hooked.module
        if self._exact_division[id(module)]:
            y = call.output.detach().reshape(g.shape)
            return (g * y).sum(dim=1) / module._parameters["weight"].detach()
        with torch.no_grad():
            h = unit_affine_output(module, call.input)
        return (g * h.reshape(g.shape)).sum(dim=1)

    # -- phase 3: the weighted gradient -------------------------------------------------------

    def accumulate_grads(self, coefficients: torch.Tensor | None = None, *,
                         class_values: torch.Tensor | None = None) -> None:
        """``p.grad += sum_i c_i g_i`` for every trainable parameter; frees the step's state.

        Either ``coefficients`` ``[B]``, or ``class_values`` ``[classes]`` after a backward
        given ``classes``: then ``c_i = classes.scale_i * class_values[classes.index_i]``.
        """
        if self._pending is None:
            raise RuntimeError("call backward(logp, mask) before accumulate_grads(coefficients)")
        if (coefficients is None) == (class_values is None):
            raise ValueError("pass either coefficients or class_values")
        if class_values is not None:
            if self._classes is None:
                raise ValueError("class_values need a backward(..., classes=RowClasses(...))")
            coefficients = self._classes.coefficients(class_values)
        if coefficients.shape != (self._batch_size,):
            raise ValueError(
                f"coefficients must have shape [B]=({self._batch_size},); got "
                f"{tuple(coefficients.shape)}"
            )
        if not bool(torch.isfinite(coefficients).all()):
            raise ValueError("coefficients must be finite")
        pending, self._pending = self._pending, None
        c = coefficients.detach()
        cache = WeightedSumCache([f for rec in pending for f in rec.factored])
        while pending:
            rec = pending.pop()
            grad = rec.weighted_sum(c.to(rec.param.device), cache, class_values)
            if grad is not None:
                accumulate_into_grad(rec.param, grad)

    def release(self) -> None:
        """Drop the step's captured state and the reused buffers, without touching ``.grad``."""
        self._calls, self._pending, self._head, self._classes = None, None, None, None
        self._workspace.clear()

    def forward_backward(
        self, forward_fn: ForwardFn, batch: Any, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``capture``, ``forward_fn(model, batch, head_observer=self)``, ``backward``; returns
        (detached logp, ``||g_i||^2``)."""
        with self.capture():
            logp = forward_fn(self.model, batch, head_observer=self)
        return logp.detach(), self.backward(logp, mask)


def _divides_exactly(module: nn.Module) -> bool:
    """Whether ``h = y / weight`` is exact for this scale module (no bias, no zero weight, at
    least float32)."""
    weight = module._parameters["weight"]
    return (module._parameters.get("bias") is None
            and weight.dtype in (torch.float32, torch.float64)
            and not bool((weight == 0).any()))
