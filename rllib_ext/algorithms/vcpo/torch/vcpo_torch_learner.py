"""VCPO's TorchLearner: RLlib's side of the learner step.

The step itself (log-probs, importance weights, baselines, micro-batched exact gradients, the
ESS learning-rate scale, metrics) is plain PyTorch in :mod:`.step`; this class feeds it the
batch, logs what it returns, clips and takes the optimiser step with the step's lr scale, and
counts skipped non-finite steps. With ``num_learners > 1`` the step all-reduces its gradients
itself (:mod:`.distributed`), so the module is not wrapped in DDP.
"""

from __future__ import annotations

import contextlib
import math

import torch
from ray.rllib.core import ALL_MODULES
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

from rllib_ext.algorithms.vcpo.learner_metrics import (
    EFFECTIVE_LR,
    GRAD_NORM,
    NUM_SKIPPED_STEPS,
    STALENESS_HISTOGRAM,
)
from rllib_ext.algorithms.vcpo.torch.step import StepBatch, StepOutcome, VCPOStep, VCPOStepSettings
from rllib_ext.algorithms.vcpo.vcpo_learner import VCPOLearner
from rllib_ext.llm.env_runner import BEHAVIOUR_LOGP, GROUP_ID
from rllib_ext.llm.log_probs import LM_BATCH_KEYS
from rllib_ext.utils.heap import keep_freed_heap


def learner_cpus(config) -> int:
    """CPUs Ray gives this learner: the main process's when it is local, a learner actor's
    otherwise."""
    cpus = config.num_cpus_for_main_process if config.num_learners == 0 \
        else config.num_cpus_per_learner
    return max(1, int(cpus)) if isinstance(cpus, (int, float)) else 1


def step_settings(config, temperature: float) -> VCPOStepSettings:
    return VCPOStepSettings(
        correction=config.correction, is_truncation=config.is_truncation,
        log_ratio_clamp=config.log_ratio_clamp, geo_mask_low=config.geo_mask_low,
        geo_mask_high=config.geo_mask_high, ess_lr_rule=config.ess_lr_rule,
        ess_reference_ratio=config.ess_reference_ratio, ess_lr_floor=config.ess_lr_floor,
        baseline=config.baseline, opob_grad_norms=config.opob_grad_norms,
        temperature=temperature, micro_batch_tokens=config.learner_micro_batch_tokens,
        dtype=config.learner_dtype)


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
        self._steps = {
            module_id: VCPOStep(self.module[module_id].model,
                                step_settings(self.config, self.module[module_id].temperature))
            for module_id in self.module.keys()}

    def _make_modules_ddp_if_necessary(self) -> None:
        """No DDP: the VCPO step all-reduces its gradients itself (see ``distributed.py``)."""

    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        params = self.get_parameters(self._module[module_id])
        optimizer = torch.optim.AdamW(params, weight_decay=config.weight_decay)
        self.register_optimizer(module_id=module_id, optimizer=optimizer, params=params,
                                lr_or_lr_schedule=config.lr)

    def _uncompiled_update(self, batch: dict, **kwargs):
        self._compute_off_policyness(batch)
        # update() has already counted this step: the weights being trained are one older.
        version = self._weights_seq_no - 1
        outcomes = {module_id: step.compute_gradients(self._step_batch(batch[module_id]),
                                                      version)
                    for module_id, step in self._steps.items()}
        for module_id, outcome in outcomes.items():
            self._log_outcome(module_id, outcome)
        gradients = {pid: p.grad for pid, p in self._params.items() if p.grad is not None}
        if any(o.skipped for o in outcomes.values()) or not self._log_grad_norm(gradients):
            self._skip_step()
            return {}, {}, {}
        with self._scaled_learning_rates({m: o.lr_scale for m, o in outcomes.items()}):
            self.apply_gradients(self.postprocess_gradients(gradients))
        self.metrics.log_value((ALL_MODULES, NUM_SKIPPED_STEPS), 0, reduce="lifetime_sum")
        return {}, {m: torch.tensor(o.loss) for m, o in outcomes.items()}, {}

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        # (abstract in RLlib's Learner) VCPO's gradient is not the backward of one loss
        # tensor: the exact OPOB routes build it from per-sample gradients (see .step).
        raise NotImplementedError("VCPOTorchLearner computes its gradient in VCPOStep; "
                                  "use Learner.update()")

    @staticmethod
    def _step_batch(batch: dict) -> StepBatch:
        return StepBatch(lm={key: batch[key] for key in LM_BATCH_KEYS},
                         behaviour_logp=batch[BEHAVIOUR_LOGP], rewards=batch[Columns.REWARDS],
                         group_ids=batch[GROUP_ID], versions=batch.get(WEIGHTS_SEQ_NO))

    def _log_outcome(self, module_id, outcome: StepOutcome) -> None:
        for key, value in outcome.metrics.items():
            self.metrics.log_value((module_id, key), value, window=1)
        for value in outcome.staleness:
            self.metrics.log_value((module_id, STALENESS_HISTOGRAM), value,
                                   reduce="item_series", window=len(outcome.staleness))

    def _log_grad_norm(self, gradients: dict) -> bool:
        """Log the global gradient norm (before clipping); False when it is not finite."""
        present = list(gradients.values())
        norm = float(torch.linalg.vector_norm(torch.stack(
            torch._foreach_norm(present)))) if present else 0.0
        if math.isfinite(norm):
            self.metrics.log_value((ALL_MODULES, GRAD_NORM), norm, window=1)
        return math.isfinite(norm)

    def _skip_step(self) -> None:
        for optimizer in self._optimizer_parameters:
            optimizer.zero_grad(set_to_none=True)
        self.metrics.log_value((ALL_MODULES, NUM_SKIPPED_STEPS), 1, reduce="lifetime_sum")

    @contextlib.contextmanager
    def _scaled_learning_rates(self, scales: dict):
        """Each module's optimisers at ``lr x scale`` for one step, then restored."""
        restore = []
        for module_id, optimizer_names in self._module_optimizers.items():
            for name in optimizer_names:
                for group in self.get_optimizer(module_id, name).param_groups:
                    restore.append((group, group["lr"]))
                    group["lr"] = group["lr"] * scales.get(module_id, 1.0)
                self.metrics.log_value((module_id, EFFECTIVE_LR), float(group["lr"]), window=1)
        try:
            yield
        finally:
            for group, lr in restore:
                group["lr"] = lr
