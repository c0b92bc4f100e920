"""VCPO's TorchLearner: off-policy corrected policy gradient for causal LMs.

Per optimiser step on a minibatch of B trajectories (whole groups of n responses):

1. current per-token log-probs ``logp`` (the RLModule forward), the engine's ``behaviour_logp``;
2. sequence IS weights ``w_i = exp(clamp(sum_t logp - behaviour_logp, +-20))`` and the weights
   the loss applies according to ``correction`` (``seq_tis``: ``min(w_i, c)``; ``none``;
   ``token_tis``; ``masked_is``; ``geo_mask``);
3. advantages: GRPO group mean/std, or the off-policy optimal baseline (OPOB), which needs the
   exact per-trajectory gradient norms ``||grad log pi(tau_i)||`` — from one forward and one
   backward with activation/output-gradient capture (``opob_grad_norms="ghost"``, cheap) or one
   backward per trajectory (``"loop"``, the reference's route);
4. loss ``-(1/(B R)) sum_i A_i w~_i sum_t logp_it`` (R = response width: a constant
   normaliser, so a trajectory's weight does not depend on the batch's lengths);
5. the step itself with ``lr = base_lr * ess_lr_scale(ESS/B)`` for this step only; a step whose
   loss or gradients are not finite is skipped and counted.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from ray.rllib.core import ALL_MODULES
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

from rllib_ext.algorithms.vcpo import losses
from rllib_ext.algorithms.vcpo.torch.per_sample_grads import PerSampleGradients, loop_accumulate
from rllib_ext.algorithms.vcpo.vcpo_learner import (
    EFFECTIVE_LR,
    ESS_RATIO,
    ESS_RATIO_CLIPPED,
    GRAD_NORM,
    IS_WEIGHT_MAX,
    IS_WEIGHT_MEAN,
    K3_KL,
    LR_SCALE,
    NUM_SKIPPED_STEPS,
    REWARD_MEAN,
    STALENESS_HISTOGRAM,
    STALENESS_MAX,
    STALENESS_MEAN,
    TRAJ_GRAD_NORM_MEAN,
    VCPOLearner,
)
from rllib_ext.llm.causal_lm_module import LM_BATCH_KEYS, RESPONSE_LOGP, response_log_probs
from rllib_ext.llm.env_runner import BEHAVIOUR_LOGP, GROUP_ID
from rllib_ext.utils.heap import keep_freed_heap


def applied_weights(correction: str, config, logp: torch.Tensor, behaviour_logp: torch.Tensor,
                    mask: torch.Tensor, log_ratio: torch.Tensor, weights: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-trajectory weights the loss applies, and per-token weights (or None).

    ``none``: 1; ``seq_tis``: min(w, c); ``token_tis``: per token min(r_t, c);
    ``masked_is``: w where w <= c else 0; ``geo_mask``: 1 where the geometric-mean token ratio
    lies in [geo_mask_low, geo_mask_high] else 0.
    """
    ones = torch.ones_like(weights)
    if correction == "none":
        return ones, None
    if correction == "seq_tis":
        return losses.truncate_weights(weights, config.is_truncation), None
    if correction == "token_tis":
        return ones, losses.token_tis_weights(logp, behaviour_logp, mask, config.is_truncation)
    if correction == "masked_is":
        return weights * losses.masked_is_mask(log_ratio, config.is_truncation), None
    if correction == "geo_mask":
        return losses.geometric_mean_sequence_mask(
            logp, behaviour_logp, mask, config.geo_mask_low, config.geo_mask_high), None
    raise ValueError(f"unknown correction {correction!r}")


def learner_cpus(config) -> int:
    """CPUs Ray gives this learner: the main process's when it is local, a learner actor's
    otherwise."""
    cpus = config.num_cpus_for_main_process if config.num_learners == 0 \
        else config.num_cpus_per_learner
    return max(1, int(cpus)) if isinstance(cpus, (int, float)) else 1


class VCPOTorchLearner(VCPOLearner, TorchLearner):
    def build(self) -> None:
        # As many compute threads as CPUs allocated: on a shared machine (vLLM engines beside
        # the learner) more threads spin against each other (measured 3x slower steps with 2
        # threads on 2 busy cores).
        super().build()
        if self._device.type == "cpu":
            torch.set_num_threads(learner_cpus(self.config))
            if self.config.learner_heap_keep_mb:
                keep_freed_heap(self.config.learner_heap_keep_mb << 20)
        self._per_sample: dict[str, PerSampleGradients] = {}
        if self.config.baseline == "opob" and self.config.opob_grad_norms == "ghost":
            for module_id in self.module.keys():
                self._per_sample[module_id] = PerSampleGradients(self.module[module_id].model)
        # Set while computing a loss, consumed by compute_gradients/apply_gradients.
        self._coefficients: dict[str, torch.Tensor] = {}
        self._loop_grads: dict[str, dict[int, torch.Tensor]] = {}
        self._lr_scale: dict[str, float] = {}
        self._skip_step = False

    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        params = self.get_parameters(self._module[module_id])
        optimizer = torch.optim.AdamW(params, weight_decay=config.weight_decay)
        self.register_optimizer(module_id=module_id, optimizer=optimizer, params=params,
                                lr_or_lr_schedule=config.lr)

    def _uncompiled_update(self, batch: dict, **kwargs):
        # TorchLearner's update, with the forward pass inside the activation capture that the
        # cheap OPOB route needs.
        self._compute_off_policyness(batch)
        self._skip_step = False
        with contextlib.ExitStack() as stack:
            for per_sample in self._per_sample.values():
                stack.enter_context(per_sample.capture())
            fwd_out = self.module.forward_train(batch)
        loss_per_module = self.compute_losses(fwd_out=fwd_out, batch=batch)
        gradients = self.compute_gradients(loss_per_module)
        self.apply_gradients(self.postprocess_gradients(gradients))
        return fwd_out, loss_per_module, {}

    def compute_loss_for_module(self, *, module_id, config, batch: dict[str, Any],
                                fwd_out: dict[str, Any]) -> torch.Tensor:
        logp = fwd_out[RESPONSE_LOGP]
        mask = batch["response_mask"]
        behaviour = batch[BEHAVIOUR_LOGP]
        rewards = batch[Columns.REWARDS]
        groups = batch[GROUP_ID]
        size, width = logp.shape
        normalizer = float(size * width)
        log = self._logger(module_id)

        detached = logp.detach()
        real = mask > 0
        if not (torch.isfinite(detached[real]).all() and torch.isfinite(behaviour[real]).all()
                and torch.isfinite(rewards).all()):
            self._skip_step = True
            for per_sample in self._per_sample.values():
                per_sample.release()
            return (logp * 0.0).sum()

        log_ratio = losses.sequence_log_ratio(detached, behaviour, mask, config.log_ratio_clamp)
        weights = losses.sequence_is_weights(log_ratio)
        applied, token_weights = applied_weights(config.correction, config, detached, behaviour,
                                                 mask, log_ratio, weights)
        score_mask = mask if token_weights is None else mask * token_weights

        traj_sq_norms = None
        if config.baseline == "grpo":
            advantages = losses.group_mean_std_advantages(rewards, groups)
        elif config.opob_grad_norms == "ghost":
            traj_sq_norms = self._per_sample[module_id].backward(logp, score_mask)
            advantages = losses.opob_advantages(rewards, applied, traj_sq_norms, groups)
        else:
            advantages, traj_sq_norms = self._loop_route(module_id, batch, score_mask, rewards,
                                                         applied, groups, normalizer)
        coefficients = (advantages * applied).detach()
        self._coefficients[module_id] = -coefficients / normalizer
        loss = losses.policy_gradient_loss(logp, mask, coefficients, normalizer, token_weights)

        ess = losses.ess_ratio(weights)
        self._lr_scale[module_id] = losses.ess_lr_scale(
            float(ess.clamp(max=1.0)), config.ess_reference_ratio, config.ess_lr_rule,
            config.ess_lr_floor)
        log(ESS_RATIO, float(ess))
        log(ESS_RATIO_CLIPPED, float(losses.ess_ratio(applied)) if applied.sum() > 0 else 0.0)
        log(LR_SCALE, self._lr_scale[module_id])
        log(IS_WEIGHT_MEAN, float(weights.mean()))
        log(IS_WEIGHT_MAX, float(weights.max()))
        log(K3_KL, float(losses.k3_kl(detached, behaviour, mask)))
        log(REWARD_MEAN, float(rewards.mean()))
        if traj_sq_norms is not None:
            log(TRAJ_GRAD_NORM_MEAN, float(traj_sq_norms.clamp(min=0).sqrt().mean()))
        self._log_staleness(module_id, batch[WEIGHTS_SEQ_NO])
        return loss

    def _loop_route(self, module_id, batch, score_mask, rewards, applied, groups, normalizer):
        """The reference's exact route: one backward per trajectory, gradient kept aside."""
        module = self.module[module_id]
        lm_batch = {key: batch[key] for key in LM_BATCH_KEYS}
        params = list(module.parameters())
        for p in params:
            p.grad = None
        result = loop_accumulate(
            module.model, lambda model, rows: response_log_probs(model, rows, module.temperature),
            lm_batch, score_mask, rewards, applied, groups, normalizer)
        self._loop_grads[module_id] = {id(p): p.grad for p in params if p.grad is not None}
        for p in params:
            p.grad = None
        return result.advantages, result.grad_sq_norms

    def compute_gradients(self, loss_per_module, **kwargs):
        if self._skip_step or not (self._per_sample or self._loop_grads):
            gradients = super().compute_gradients(loss_per_module, **kwargs)
        else:
            for optimizer in self._optimizer_parameters:
                optimizer.zero_grad(set_to_none=True)
            for module_id, per_sample in self._per_sample.items():
                per_sample.accumulate_grads(self._coefficients[module_id])
            for module_id, grads in self._loop_grads.items():
                for p in self.module[module_id].parameters():
                    p.grad = grads.get(id(p))
            self._loop_grads.clear()
            gradients = {pid: p.grad for pid, p in self._params.items()}
        present = [g for g in gradients.values() if g is not None]
        norm = float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in present]))) if present else 0.0
        if not math.isfinite(norm):
            self._skip_step = True
        else:
            self.metrics.log_value((ALL_MODULES, GRAD_NORM), norm, window=1)
        return gradients

    def apply_gradients(self, gradients_dict) -> None:
        if self._skip_step:
            for optimizer in self._optimizer_parameters:
                optimizer.zero_grad(set_to_none=True)
            self.metrics.log_value((ALL_MODULES, NUM_SKIPPED_STEPS), 1, reduce="lifetime_sum")
            return
        # ESS-scaled learning rate for this single optimiser step, then restored.
        restore = []
        for module_id, names in self._module_optimizers.items():
            scale = self._lr_scale.get(module_id, 1.0)
            for name in names:
                for group in self.get_optimizer(module_id, name).param_groups:
                    restore.append((group, group["lr"]))
                    group["lr"] = group["lr"] * scale
                self._logger(module_id)(EFFECTIVE_LR, float(group["lr"]))
        try:
            super().apply_gradients(gradients_dict)
        finally:
            for group, lr in restore:
                group["lr"] = lr
        self.metrics.log_value((ALL_MODULES, NUM_SKIPPED_STEPS), 0, reduce="lifetime_sum")

    def _log_staleness(self, module_id, versions: torch.Tensor) -> None:
        # update() has already counted this step: the weights being trained are one older.
        staleness = (self._weights_seq_no - 1) - versions.long()
        log = self._logger(module_id)
        log(STALENESS_MEAN, float(staleness.float().mean()))
        log(STALENESS_MAX, float(staleness.max()))
        for value in staleness.tolist():
            self.metrics.log_value((module_id, STALENESS_HISTOGRAM), value,
                                   reduce="item_series", window=len(staleness))

    def _logger(self, module_id):
        def log(key, value):
            self.metrics.log_value((module_id, key), value, window=1)
        return log
