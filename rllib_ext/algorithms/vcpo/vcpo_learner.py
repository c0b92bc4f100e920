"""Framework-agnostic part of the VCPO learner: its batch pipeline and metric names."""

from __future__ import annotations

from ray.rllib.connectors.common import NumpyToTensor
from ray.rllib.core.learner.learner import Learner

from rllib_ext.llm.learner_connector import LLMEpisodesToBatch

# Learner metrics (per module, reported under learners/<module_id>/...).
ESS_RATIO = "ess_ratio"  # (sum w)^2 / (B sum w^2) with the unclipped sequence IS weights
ESS_RATIO_CLIPPED = "ess_ratio_clipped"  # the same with the weights the loss applies
LR_SCALE = "ess_lr_scale"  # the multiplier of this optimiser step
EFFECTIVE_LR = "effective_lr"  # base lr x multiplier
IS_WEIGHT_MEAN = "is_weight_mean"
IS_WEIGHT_MAX = "is_weight_max"
K3_KL = "k3_kl_behaviour_policy"  # KL(engine || policy) on the sampled tokens
GRAD_NORM = "grad_norm"  # global norm before clipping
TRAJ_GRAD_NORM_MEAN = "trajectory_grad_norm_mean"  # mean ||grad log pi(tau_i)|| (OPOB routes)
STALENESS_MEAN = "staleness_mean"
STALENESS_MAX = "staleness_max"
STALENESS_HISTOGRAM = "staleness"  # the per-trajectory values (a TensorBoard histogram)
REWARD_MEAN = "reward_mean"
NUM_SKIPPED_STEPS = "num_skipped_nonfinite_steps"


class VCPOLearner(Learner):
    """Replaces RLlib's default learner pipeline with the causal-LM batch builder."""

    def build(self) -> None:
        super().build()
        self._learner_connector.append(LLMEpisodesToBatch())
        self._learner_connector.append(NumpyToTensor(as_learner_connector=True,
                                                     device=self._device))
