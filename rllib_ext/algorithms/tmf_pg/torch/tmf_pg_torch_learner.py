"""TMF-PG loss in torch: entropy-regularised REINFORCE with a population baseline."""

from __future__ import annotations

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.annotations import override

from rllib_ext.algorithms.tmf_pg.tmf_pg_learner import (
    DISCOUNTS,
    LOGP_ADVANTAGES,
    REWARD_ADVANTAGES,
    REWARD_RETURNS,
    TMFPGLearner,
)


class TMFPGTorchLearner(TMFPGLearner, TorchLearner):
    """loss = -mean_i[ w_i log pi(a_i | o_i, mu_i) A_i ] - tau mean_i[ w_i H(pi(. | o_i, mu_i)) ]

    over all acting agent-steps i of the batch, with the soft advantage
    A_i = (R_i - b(R)_i) - tau (L_i - b(L)_i) and w_i = gamma^j_i (j_i the step's activation
    index) from :class:`~rllib_ext.algorithms.tmf_pg.tmf_pg_learner.MeanFieldAdvantages`, and
    tau the module's current entropy coefficient (its schedule's value); the gradient is the
    (sample) policy gradient of the regularised objective J_tau (``returns.py``).
    """

    @override(TorchLearner)
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        module = self.module[module_id]
        dist = module.get_train_action_dist_cls().from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])
        log_probs = dist.logp(batch[Columns.ACTIONS])
        weights = batch[DISCOUNTS]
        entropy = dist.entropy()
        tau = self.entropy_coeff_schedulers_per_module[module_id].get_current_value()
        advantages = batch[REWARD_ADVANTAGES] - tau * batch[LOGP_ADVANTAGES]
        policy_loss = -(weights * log_probs * advantages).mean()
        loss = policy_loss - tau * (weights * entropy).mean()
        entropy = entropy.mean()
        self.metrics.log_dict({
            "policy_loss": policy_loss.detach(),
            "entropy": entropy.detach(),
            "return_mean": batch[REWARD_RETURNS].mean().detach(),
            "advantage_abs_mean": advantages.abs().mean().detach(),
            "num_samples": torch.tensor(float(len(log_probs))),
        }, key=module_id, window=1)
        return loss
