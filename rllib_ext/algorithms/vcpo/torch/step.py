"""The VCPO learner step as plain PyTorch (no Ray): log-probs, importance weights, baselines,
exact micro-batched gradients, the ESS learning-rate scale and the step's metrics.

Per optimiser step on B trajectories (whole groups of n responses):

1. current per-token log-probs ``logp`` (``rllib_ext.llm.log_probs``: only real response
   tokens reach the LM head, in chunks), the engine's ``behaviour_logp``;
2. sequence IS weights ``w_i = exp(clamp(sum_t logp - behaviour_logp, +-20))`` and the weights
   the loss applies according to ``correction`` (``seq_tis``: ``min(w_i, c)``; ``none``;
   ``token_tis``; ``masked_is``; ``geo_mask``);
3. advantages: GRPO group mean/std, or the off-policy optimal baseline (OPOB), which needs the
   exact per-trajectory gradient norms (``opob.py``: one-shot per-sample gradients or the
   reference's per-trajectory loop);
4. the gradient of ``-(1/(B R)) sum_i A_i w~_i sum_t logp_it`` (R = response width, B the whole
   batch over all learners), accumulated over micro-batches (``micro_batches.py``); exact,
   because all of the above is group-local;
5. ``lr = base_lr * ess_lr_scale(ESS/B)`` for this step, from the whole batch's weights.

With several learners (``distributed.py``) the batch size, the ESS sums, the metrics and the
gradients are all-reduced. A step with non-finite log-probs or rewards is skipped (all learners
agree). The caller owns the optimiser: it clips and steps with the returned lr scale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math

import torch
from torch import nn

from rllib_ext.algorithms.vcpo import learner_metrics as names
from rllib_ext.algorithms.vcpo import losses
from rllib_ext.algorithms.vcpo.torch.distributed import Collective
from rllib_ext.algorithms.vcpo.torch.micro_batches import (
    MicroBatch,
    default_micro_batch_tokens,
    plan_micro_batches,
)
from rllib_ext.algorithms.vcpo.torch.opob import (
    RowTerms,
    Terms,
    loop_accumulate,
    one_shot_accumulate,
)
from rllib_ext.algorithms.vcpo.torch.per_sample import PerSampleGradients
from rllib_ext.llm.log_probs import lm_rows, response_log_probs

logger = logging.getLogger(__name__)

CORRECTIONS = ("seq_tis", "none", "token_tis", "masked_is", "geo_mask")
BASELINES = ("opob", "grpo")
OPOB_ROUTES = ("auto", "ghost", "loop")
LEARNER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class NonFiniteStep(Exception):
    """Log-probs of real tokens (or rewards) are not finite: the step is skipped."""


@dataclasses.dataclass(frozen=True)
class VCPOStepSettings:
    """The learner-side VCPO settings (see ``VCPOConfig.training`` for their meaning)."""

    correction: str = "seq_tis"
    is_truncation: float = 8.0
    log_ratio_clamp: float = 20.0
    geo_mask_low: float = 0.5
    geo_mask_high: float = 2.0
    ess_lr_rule: str = "sqrt"
    ess_reference_ratio: float = 1.0
    ess_lr_floor: float = 0.0
    baseline: str = "opob"
    opob_grad_norms: str = "auto"
    temperature: float = 1.0
    micro_batch_tokens: int | str | None = "auto"  # "auto": the device's default; None: no limit
    dtype: str = "auto"  # "auto" (bfloat16 on a GPU, float32 on a CPU), "bfloat16", "float32"
    head_chunk_tokens: int | None = None  # None: the device's default (log_probs)


@dataclasses.dataclass(frozen=True)
class StepBatch:
    """One learner's share of a train batch (whole groups)."""

    lm: dict[str, torch.Tensor]  # the LM layout (rllib_ext.llm.log_probs.LM_BATCH_KEYS)
    behaviour_logp: torch.Tensor  # [B, R]
    rewards: torch.Tensor  # [B]
    group_ids: torch.Tensor  # [B]
    versions: torch.Tensor | None = None  # [B] policy version each sample was generated with


@dataclasses.dataclass(frozen=True)
class StepOutcome:
    """What the step found; the gradient itself is in the parameters' ``.grad``."""

    skipped: bool
    lr_scale: float
    loss: float
    metrics: dict[str, float]
    staleness: list[int]  # this learner's per-trajectory values
    routes: dict[str, int]  # micro-batches per route


@dataclasses.dataclass(frozen=True)
class _MicroBatchResult:
    rows: torch.Tensor
    logp: torch.Tensor  # detached [b, R]
    entropy: torch.Tensor  # [b, R]
    sq_norms: torch.Tensor | None  # [b] (OPOB routes)
    loss: float


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in LEARNER_DTYPES:
        raise ValueError(f"learner_dtype must be 'auto' or one of {tuple(LEARNER_DTYPES)}; "
                         f"got {name!r}")
    return LEARNER_DTYPES[name]


def applied_weights(settings: VCPOStepSettings, logp: torch.Tensor, behaviour_logp: torch.Tensor,
                    mask: torch.Tensor, log_ratio: torch.Tensor, weights: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-trajectory weights the loss applies, and per-token weights (or None).

    ``none``: 1; ``seq_tis``: min(w, c); ``token_tis``: per token min(r_t, c);
    ``masked_is``: w where w <= c else 0; ``geo_mask``: 1 where the geometric-mean token ratio
    lies in [geo_mask_low, geo_mask_high] else 0.
    """
    correction = settings.correction
    if correction == "none":
        return torch.ones_like(weights), None
    if correction == "seq_tis":
        return losses.truncate_weights(weights, settings.is_truncation), None
    if correction == "token_tis":
        return torch.ones_like(weights), losses.token_tis_weights(
            logp, behaviour_logp, mask, settings.is_truncation)
    if correction == "masked_is":
        return weights * losses.masked_is_mask(log_ratio, settings.is_truncation), None
    if correction == "geo_mask":
        return losses.geometric_mean_sequence_mask(
            logp, behaviour_logp, mask, settings.geo_mask_low, settings.geo_mask_high), None
    raise ValueError(f"unknown correction {correction!r}")


class VCPOStep:
    """Computes one VCPO step's gradient into ``model``'s ``.grad`` (see the module docstring).

    ``model``: a Hugging Face causal LM with float32 (master) weights, on the device the step
    runs on; ``collective``: the learners to all-reduce with (default: ``torch.distributed``'s
    world, if initialised). ``compute_gradients(batch)`` returns the step's
    :class:`StepOutcome`.
    """

    def __init__(self, model: nn.Module, settings: VCPOStepSettings,
                 collective: Collective | None = None) -> None:
        self.model, self.settings = model, settings
        self.collective = collective or Collective()
        self.device = next(model.parameters()).device
        self.dtype = resolve_dtype(settings.dtype, self.device)
        tokens = settings.micro_batch_tokens
        self.micro_batch_tokens = default_micro_batch_tokens(model, self.device, self.dtype) \
            if tokens == "auto" else tokens
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.opob_route = self._opob_route()
        self._per_sample = PerSampleGradients(model) if self.opob_route == "one_shot" else None
        self._said_loop = False

    def _opob_route(self) -> str | None:
        settings = self.settings
        if settings.baseline == "grpo":
            return None
        checkpointing = getattr(self.model, "is_gradient_checkpointing", False)
        if settings.opob_grad_norms == "loop" or (settings.opob_grad_norms == "auto"
                                                  and checkpointing):
            if checkpointing and settings.opob_grad_norms == "auto":
                logger.info("VCPO learner: gradient checkpointing is on, so OPOB takes the "
                            "per-trajectory loop route (the one-shot route's hooks cannot run "
                            "under checkpointing)")
            return "loop"
        if checkpointing:
            raise ValueError("opob_grad_norms='ghost' cannot run with gradient checkpointing. "
                             "Fix: opob_grad_norms='auto' or 'loop', or disable checkpointing.")
        return "one_shot"

    # ------------------------------------------------------------------ the step

    def compute_gradients(self, batch: StepBatch, learner_version: int | None = None
                          ) -> StepOutcome:
        """Zero the gradients, then accumulate the step's gradient (all-reduced over learners)
        into ``.grad``. ``learner_version``: the version being trained (for staleness)."""
        for p in self._params:
            p.grad = None
        size, width = batch.behaviour_logp.shape
        self.collective.check_disjoint_groups(batch.group_ids)
        total = self.collective.sum(torch.tensor([float(size)], dtype=torch.float64,
                                                 device=self.device))
        normalizer = float(total[0]) * width
        lengths = batch.lm["attention_mask"].sum(dim=1).tolist()
        plan = plan_micro_batches(lengths, batch.group_ids.tolist(), self.micro_batch_tokens,
                                  self.opob_route)
        self._say_loop_fallback(plan)
        results, skipped = [], not bool(torch.isfinite(batch.rewards).all())
        if not skipped:
            terms = self._terms(batch)
            grpo = losses.group_mean_std_advantages(batch.rewards, batch.group_ids) \
                if self.opob_route is None else None
            try:
                for micro_batch in plan:
                    results.append(self._micro_batch(batch, micro_batch, terms, grpo, normalizer))
            except NonFiniteStep:
                skipped = True
                if self._per_sample is not None:
                    self._per_sample.release()
        outcome = self._outcome(batch, results, skipped, learner_version, plan)
        if outcome.skipped:
            for p in self._params:
                p.grad = None
        else:
            self.collective.sum_gradients(self._params)
        return outcome

    def _micro_batch(self, batch: StepBatch, micro_batch: MicroBatch, terms: Terms,
                     grpo: torch.Tensor | None, normalizer: float) -> _MicroBatchResult:
        rows = torch.tensor(micro_batch.rows, device=batch.rewards.device)
        longest = micro_batch.tokens // len(micro_batch.rows)
        lm = lm_rows(batch.lm, rows, longest)

        def local_terms(local: torch.Tensor, logp: torch.Tensor) -> RowTerms:
            return terms(rows[local], logp)

        if micro_batch.route == "plain":
            logp, entropy = self._forward(self.model, lm)
            row_terms = local_terms(torch.arange(len(rows), device=rows.device), logp.detach())
            loss = losses.policy_gradient_loss(logp, row_terms.score_mask,
                                               grpo[rows] * row_terms.weights, normalizer)
            loss.backward()
            return _MicroBatchResult(rows, logp.detach(), entropy, None, float(loss.detach()))
        rewards, groups = batch.rewards[rows], batch.group_ids[rows]
        if micro_batch.route == "one_shot":
            result = one_shot_accumulate(self._per_sample, self._forward, lm, rewards, groups,
                                         local_terms, normalizer)
        else:
            result = loop_accumulate(self.model, self._forward, lm, rewards, groups,
                                     local_terms, normalizer)
        row_terms = local_terms(torch.arange(len(rows), device=rows.device), result.logp)
        loss = losses.policy_gradient_loss(result.logp, row_terms.score_mask,
                                           result.advantages * result.weights, normalizer)
        return _MicroBatchResult(rows, result.logp, result.entropy, result.grad_sq_norms,
                                 float(loss))

    def _forward(self, model: nn.Module, lm: dict[str, torch.Tensor], head_observer=None):
        """(logp, entropy) ``[b, R]`` each; the forward under autocast when training in bf16."""
        autocast = torch.autocast(self.device.type, dtype=self.dtype) \
            if self.dtype != torch.float32 else contextlib.nullcontext()
        with autocast:
            return response_log_probs(model, lm, self.settings.temperature,
                                      chunk_tokens=self.settings.head_chunk_tokens,
                                      head_observer=head_observer, return_entropy=True)

    def _terms(self, batch: StepBatch) -> Terms:
        """The correction, row by row: score mask (mask x token weights) and applied weights
        from each row's own log-probs."""
        settings = self.settings

        def terms(rows: torch.Tensor, logp: torch.Tensor) -> RowTerms:
            mask, behaviour = batch.lm["response_mask"][rows], batch.behaviour_logp[rows]
            real = mask > 0
            if not (bool(torch.isfinite(logp[real]).all())
                    and bool(torch.isfinite(behaviour[real]).all())):
                raise NonFiniteStep
            log_ratio = losses.sequence_log_ratio(logp, behaviour, mask, settings.log_ratio_clamp)
            applied, token_weights = applied_weights(
                settings, logp, behaviour, mask, log_ratio, losses.sequence_is_weights(log_ratio))
            return RowTerms(mask if token_weights is None else mask * token_weights, applied)

        return terms

    def _say_loop_fallback(self, plan: list[MicroBatch]) -> None:
        if self.opob_route == "one_shot" and not self._said_loop and any(
                m.route == "loop" for m in plan):
            self._said_loop = True
            logger.info("VCPO learner: a group does not fit learner_micro_batch_tokens=%s; such "
                        "groups take the per-trajectory loop route (exact, one row at a time)",
                        self.micro_batch_tokens)

    # ------------------------------------------------------------------ metrics and lr scale

    def _outcome(self, batch: StepBatch, results: list[_MicroBatchResult], skipped: bool,
                 learner_version: int | None, plan: list[MicroBatch]) -> StepOutcome:
        """Whole-batch figures (over all learners): sums all-reduced, then the ESS lr scale."""
        size, width = batch.behaviour_logp.shape
        device = self.device
        routes = {route: sum(m.route == route for m in plan) for route in ("plain", "one_shot",
                                                                           "loop")}
        sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=device)
        maxima = torch.full((len(_MAXIMA),), -math.inf, dtype=torch.float64, device=device)
        sums[_SUMS.index("skipped")] = float(skipped)
        staleness: list[int] = []
        if not skipped:
            logp = torch.zeros(size, width, device=device)
            entropy = torch.zeros(size, width, device=device)
            norms = torch.zeros(size, dtype=torch.float64, device=device)
            for result in results:
                logp[result.rows] = result.logp.float()
                entropy[result.rows] = result.entropy.float()
                if result.sq_norms is not None:
                    norms[result.rows] = result.sq_norms.to(device)
            self._fill_sums(batch, logp, entropy, norms, results, sums, maxima)
            if batch.versions is not None and learner_version is not None:
                values = learner_version - batch.versions.long()
                staleness = values.tolist()
                sums[_SUMS.index("staleness")] = float(values.sum())
                maxima[_MAXIMA.index("staleness")] = float(values.max())
        sums, maxima = self.collective.sum(sums), self.collective.max(maxima)
        if sums[_SUMS.index("skipped")] > 0:
            return StepOutcome(True, 1.0, 0.0, {}, [], routes)
        s = dict(zip(_SUMS, sums.tolist(), strict=True))
        m = dict(zip(_MAXIMA, maxima.tolist(), strict=True))
        count, tokens = s["rows"], max(s["tokens"], 1.0)
        ess = s["w"] ** 2 / (count * s["w2"]) if s["w2"] > 0 else 0.0
        settings = self.settings
        lr_scale = losses.ess_lr_scale(min(ess, 1.0), settings.ess_reference_ratio,
                                       settings.ess_lr_rule, settings.ess_lr_floor)
        metrics = {
            names.ESS_RATIO: ess,
            names.ESS_RATIO_CLIPPED: s["applied"] ** 2 / (count * s["applied2"])
            if s["applied2"] > 0 else 0.0,
            names.LR_SCALE: lr_scale,
            names.IS_WEIGHT_MEAN: s["w"] / count,
            names.IS_WEIGHT_MAX: m["w"],
            names.IS_TRUNCATED_FRACTION: s["truncated"] / count,
            names.K3_KL: s["k3"] / tokens,
            names.ENTROPY: s["entropy"] / tokens,
            names.REWARD_MEAN: s["reward"] / count,
        }
        if self.opob_route is not None:
            metrics[names.TRAJ_GRAD_NORM_MEAN] = s["grad_norm"] / count
        if staleness:
            metrics[names.STALENESS_MEAN] = s["staleness"] / count
            metrics[names.STALENESS_MAX] = m["staleness"]
        return StepOutcome(False, lr_scale, s["loss"], metrics, staleness, routes)

    def _fill_sums(self, batch, logp, entropy, norms, results, sums, maxima) -> None:
        settings = self.settings
        mask, behaviour = batch.lm["response_mask"], batch.behaviour_logp
        real = mask > 0
        log_ratio = losses.sequence_log_ratio(logp, behaviour, mask, settings.log_ratio_clamp)
        weights = losses.sequence_is_weights(log_ratio).double()
        applied, _ = applied_weights(settings, logp, behaviour, mask, log_ratio,
                                     losses.sequence_is_weights(log_ratio))
        applied = applied.double()
        tokens = real.sum()
        values = {
            "rows": float(len(weights)), "tokens": float(tokens),
            "w": weights.sum(), "w2": (weights * weights).sum(),
            "applied": applied.sum(), "applied2": (applied * applied).sum(),
            "truncated": (weights > settings.is_truncation).sum(),
            "k3": losses.k3_kl(logp, behaviour, mask, settings.log_ratio_clamp) * tokens,
            "entropy": torch.where(real, entropy, 0.0).sum(),
            "reward": batch.rewards.double().sum(),
            "grad_norm": norms.clamp(min=0).sqrt().sum(),
            "loss": sum(r.loss for r in results),
        }
        for key, value in values.items():
            sums[_SUMS.index(key)] = float(value)
        maxima[_MAXIMA.index("w")] = float(weights.max())


_SUMS = ("skipped", "rows", "tokens", "w", "w2", "applied", "applied2", "truncated", "k3",
         "entropy", "reward", "grad_norm", "loss", "staleness")
_MAXIMA = ("w", "staleness")
