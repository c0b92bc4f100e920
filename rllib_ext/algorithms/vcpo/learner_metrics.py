"""Names of the VCPO learner's metrics (per module, reported under learners/<module_id>/...).

Ray-free, so the learner core (``torch/step.py``) and the RLlib learner share them."""

ESS_RATIO = "ess_ratio"  # (sum w)^2 / (B sum w^2) with the unclipped sequence IS weights
ESS_RATIO_CLIPPED = "ess_ratio_clipped"  # the same with the weights the loss applies
LR_SCALE = "ess_lr_scale"  # the multiplier of this optimiser step
EFFECTIVE_LR = "effective_lr"  # base lr x multiplier
IS_WEIGHT_MEAN = "is_weight_mean"
IS_WEIGHT_MAX = "is_weight_max"
IS_TRUNCATED_FRACTION = "is_truncated_fraction"  # trajectories with w > is_truncation
K3_KL = "k3_kl_behaviour_policy"  # KL(engine || policy) on the sampled tokens
ENTROPY = "entropy"  # mean per-token entropy of the current policy on the response tokens
GRAD_NORM = "grad_norm"  # global norm before clipping
TRAJ_GRAD_NORM_MEAN = "trajectory_grad_norm_mean"  # mean ||grad log pi(tau_i)|| (OPOB routes)
STALENESS_MEAN = "staleness_mean"
STALENESS_MAX = "staleness_max"
STALENESS_HISTOGRAM = "staleness"  # the per-trajectory values (a TensorBoard histogram)
REWARD_MEAN = "reward_mean"
NUM_SKIPPED_STEPS = "num_skipped_nonfinite_steps"
