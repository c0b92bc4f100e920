"""The pure math of VCPO and of the stabilisers it is compared against.

Conventions (shared by every function here):

* a batch holds ``B`` trajectories (responses), padded to ``T`` response tokens;
* ``logp`` / ``behaviour_logp``: float ``[B, T]`` per-token log-probabilities of the response
  tokens under the current policy pi_theta / the inference engine mu;
* ``mask``: ``[B, T]`` bool or float, non-zero on real response tokens. Values at masked
  positions are never read (``torch.where``, not multiplication), so padding may hold anything,
  including ``-inf`` or ``nan``;
* ``rewards``: float ``[B]``; ``group_ids``: int ``[B]``, equal for the responses to one prompt.

Everything that becomes a coefficient of the loss (importance weights, advantages, masks) is
returned detached. Non-finite values on real tokens are either tamed by a documented clamp or
rejected with a ``ValueError`` naming the argument.
"""

from __future__ import annotations

import math

import torch

LR_SCALE_RULES = ("sqrt", "linear", "none")


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_pair(logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Check shapes of a (logp, behaviour_logp, mask) triple; return the mask as bool."""
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T]; got shape {tuple(logp.shape)}")
    if behaviour_logp.shape != logp.shape:
        raise ValueError(
            f"behaviour_logp must have the shape of logp {tuple(logp.shape)}; "
            f"got {tuple(behaviour_logp.shape)}"
        )
    return _check_mask(mask, logp)


def _check_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if mask.shape != like.shape:
        raise ValueError(
            f"mask must have the shape of logp {tuple(like.shape)}; got {tuple(mask.shape)}"
        )
    return mask.bool() if mask.dtype != torch.bool else mask


def _reject_nan(name: str, values: torch.Tensor, where: torch.Tensor | None = None) -> None:
    bad = torch.isnan(values)
    if where is not None:
        bad = bad & where
    if bool(bad.any()):
        raise ValueError(
            f"{name} contains NaN on {int(bad.sum())} real (unmasked) entries; "
            "fix the upstream computation (log-probs of real tokens must be numbers)"
        )


def _check_vector(name: str, values: torch.Tensor, batch: int | None = None) -> None:
    if values.dim() != 1:
        raise ValueError(f"{name} must be a 1-D [B] tensor; got shape {tuple(values.shape)}")
    if batch is not None and values.shape[0] != batch:
        raise ValueError(f"{name} must have length B={batch}; got {values.shape[0]}")
    if values.numel() == 0:
        raise ValueError(f"{name} is empty; a batch needs at least one trajectory")


def _as_float(values: torch.Tensor) -> torch.Tensor:
    values = values.detach()
    return values if values.dtype.is_floating_point else values.to(torch.get_default_dtype())


def _check_finite(name: str, values: torch.Tensor) -> None:
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} must be finite; got {values.tolist()}")


def _check_non_negative(name: str, values: torch.Tensor) -> None:
    _check_finite(name, values)
    if bool((values < 0).any()):
        raise ValueError(f"{name} must be >= 0; got min {float(values.min())}")


# --------------------------------------------------------------------------------------------
# Sequence-level importance weights and ESS
# --------------------------------------------------------------------------------------------


def sequence_log_ratio(
    logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor, clamp: float = 20.0
) -> torch.Tensor:
    """Summed log importance ratio of each trajectory, clamped.

    ``log w_i = clip( sum_t mask_it * (logp_it - behaviour_logp_it), -clamp, clamp )``

    No length normalisation (as in the reference). The clamp keeps ``exp`` finite (``e^20`` is
    about 4.9e8) and also turns ``+-inf`` log-probabilities on real tokens into ``+-clamp``;
    ``nan`` on a real token raises ``ValueError``. Returns a detached ``[B]`` tensor.
    """
    if not clamp > 0:
        raise ValueError(f"clamp must be > 0; got {clamp}")
    keep = _check_pair(logp, behaviour_logp, mask)
    diff = logp.detach() - behaviour_logp.detach()
    _reject_nan("logp - behaviour_logp", diff, keep)
    # inf - inf on a real token is nan and was rejected above; +-inf alone survives the sum.
    summed = torch.where(keep, diff, torch.zeros_like(diff)).sum(dim=-1)
    return summed.clamp(-clamp, clamp)


def sequence_is_weights(log_ratio: torch.Tensor) -> torch.Tensor:
    """Sequence importance weights ``w_i = exp(log_ratio_i)`` (detached).

    Pass a clamped log-ratio (``sequence_log_ratio``) so the result is finite.
    """
    return torch.exp(log_ratio.detach())


def truncate_weights(weights: torch.Tensor, c: float) -> torch.Tensor:
    """Truncated importance weights ``min(w_i, c)`` (the reference uses ``c = 8``)."""
    if not c > 0:
        raise ValueError(f"truncation level c must be > 0; got {c}")
    return weights.detach().clamp(max=c)


def effective_sample_size(weights: torch.Tensor) -> torch.Tensor:
    """Kish effective sample size ``ESS = (sum_i w_i)^2 / sum_i w_i^2`` (scalar tensor).

    Computed on ``w / max(w)`` (ESS is scale-invariant), so weights up to ``e^20`` cannot
    overflow ``w^2``. All-zero weights give ``ESS = 0``. Weights must be finite and >= 0.
    """
    _check_vector("weights", weights)
    w = weights.detach()
    _check_non_negative("weights", w)
    top = w.max()
    if float(top) == 0.0:
        return torch.zeros((), dtype=w.dtype, device=w.device)
    w = w / top
    return w.sum() ** 2 / (w * w).sum()


def ess_ratio(weights: torch.Tensor) -> torch.Tensor:
    """``rho = ESS / B`` in ``(0, 1]`` for positive weights (``0`` only if all weights are 0)."""
    return effective_sample_size(weights) / weights.shape[0]


def ess_lr_scale(
    ess_ratio: float | torch.Tensor,
    rho_ref: float = 1.0,
    rule: str = "sqrt",
    floor: float = 0.0,
) -> float:
    """Learning-rate multiplier from the ESS ratio.

    ``s = min(1, rho / rho_ref)``; ``"sqrt"``: ``sqrt(s)``, ``"linear"``: ``s``, ``"none"``: ``1``;
    the result is ``max(floor, .)``. The reference uses ``"sqrt"``, ``rho_ref = 1.0`` (math) or
    ``0.55`` (multi-turn) and no floor.
    """
    rho = float(ess_ratio)
    if not (math.isfinite(rho) and 0.0 <= rho <= 1.0 + 1e-6):
        raise ValueError(f"ess_ratio must be in [0, 1]; got {rho}")
    if not (math.isfinite(rho_ref) and rho_ref > 0):
        raise ValueError(f"rho_ref must be a finite number > 0; got {rho_ref}")
    if rule not in LR_SCALE_RULES:
        raise ValueError(f"rule must be one of {LR_SCALE_RULES}; got {rule!r}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1]; got {floor}")
    s = min(1.0, rho / rho_ref)
    scale = {"sqrt": math.sqrt(s), "linear": s, "none": 1.0}[rule]
    return max(floor, scale)


# --------------------------------------------------------------------------------------------
# Group statistics and advantages
# --------------------------------------------------------------------------------------------


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary group ids to ``0..G-1``; returns (index [B], G)."""
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor; got dtype {group_ids.dtype}")
    _, index = torch.unique(group_ids, return_inverse=True)
    return index, int(index.max()) + 1


def _group_sum(values: torch.Tensor, index: torch.Tensor, groups: int) -> torch.Tensor:
    return torch.zeros(groups, dtype=values.dtype, device=values.device).index_add_(0, index, values)


def group_reward_std(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per-trajectory value of its group's reward standard deviation, ``[B]``.

    The unbiased (Bessel-corrected, ``n - 1``) sample std, as ``torch.std`` and the reference
    (verl) GRPO use: ``sigma_g = sqrt( sum_{i in g} (R_i - mean_g)^2 / (n_g - 1) )``.
    Singleton groups have no defined spread and get ``0`` (so their advantage is 0).
    """
    _check_vector("rewards", rewards)
    _check_vector("group_ids", group_ids, rewards.shape[0])
    _check_finite("rewards", rewards)
    rewards = _as_float(rewards)
    index, groups = _group_index(group_ids)
    r = rewards.double()
    count = _group_sum(torch.ones_like(r), index, groups)
    mean = _group_sum(r, index, groups) / count
    sq = _group_sum((r - mean[index]) ** 2, index, groups)
    var = torch.where(count > 1, sq / (count - 1).clamp(min=1), torch.zeros_like(sq))
    return var.sqrt()[index].to(rewards.dtype)


def group_mean_std_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO advantages ``A_i = (R_i - mean_g) / (sigma_g + eps)``, ``[B]``.

    ``sigma_g`` is the unbiased group std of :func:`group_reward_std`. Groups with
    ``sigma_g <= eps`` (all rewards equal, or a single response) get ``A_i = 0``. With
    ``normalize_std=False`` (Dr. GRPO): ``A_i = R_i - mean_g``.
    """
    sigma = group_reward_std(rewards, group_ids)
    index, groups = _group_index(group_ids)
    r = _as_float(rewards)
    mean = _group_sum(r, index, groups) / _group_sum(torch.ones_like(r), index, groups)
    centred = r - mean[index]
    if not normalize_std:
        return centred
    return torch.where(sigma > eps, centred / (sigma + eps), torch.zeros_like(centred))


def opob_baseline(
    rewards: torch.Tensor,
    weights: torch.Tensor,
    grad_sq_norms: torch.Tensor,
    group_ids: torch.Tensor,
    eps: float = 1e-20,
) -> torch.Tensor:
    """Off-policy optimal baseline, per trajectory the value ``b*_g`` of its group, ``[B]``.

    ``b*_g = sum_{i in g} w_i^2 ||g_i||^2 R_i / sum_{i in g} w_i^2 ||g_i||^2``

    where ``g_i = grad_theta log pi_theta(tau_i)`` is the pure score function (no weight folded
    in) and ``w_i`` is the weight the update actually applies, i.e. the TRUNCATED weight
    ``min(w_i, c)``. This ``b`` minimises the second moment
    ``sum_i ||(R_i - b) w_i g_i||^2`` of the estimator ``sum_i (R_i - b) w_i g_i`` that the loss
    uses (set the derivative in ``b`` to zero). When a group's denominator is ``<= eps`` (all its
    weights or norms are 0, e.g. masked IS dropped the group) ``b*_g`` falls back to the plain
    group mean. Sums are taken in float64, so tiny but positive weights stay exact.

    Difference from the reference implementation: there ``g_i`` already contains the truncated
    weight (``g_i = min(w_i, c) grad log pi``) and the baseline weight multiplies by ``w_i^2``
    again, i.e. it uses ``w_i^2 min(w_i, c)^2 ||grad log pi||^2`` - the weight counted twice,
    which is the optimum for an estimator weighted by ``w_i min(w_i, c)``, not for the one
    applied. We implement the optimum for the applied estimator. To reproduce the reference
    exactly, pass ``weights = w * min(w, c)``.
    """
    _check_vector("rewards", rewards)
    batch = rewards.shape[0]
    _check_vector("weights", weights, batch)
    _check_vector("grad_sq_norms", grad_sq_norms, batch)
    _check_vector("group_ids", group_ids, batch)
    _check_finite("rewards", rewards)
    _check_non_negative("weights", weights)
    _check_non_negative("grad_sq_norms", grad_sq_norms)
    rewards = _as_float(rewards)
    index, groups = _group_index(group_ids)
    r = rewards.double()
    q = weights.detach().double() ** 2 * grad_sq_norms.detach().double()
    num = _group_sum(q * r, index, groups)
    den = _group_sum(q, index, groups)
    mean = _group_sum(r, index, groups) / _group_sum(torch.ones_like(r), index, groups)
    b = torch.where(den > eps, num / den.clamp(min=eps), mean)
    return b[index].to(rewards.dtype)


def opob_advantages(
    rewards: torch.Tensor,
    weights: torch.Tensor,
    grad_sq_norms: torch.Tensor,
    group_ids: torch.Tensor,
    eps: float = 1e-6,
    baseline_eps: float = 1e-20,
) -> torch.Tensor:
    """OPOB advantages ``A_i = (R_i - b*_g) / sigma_g``, ``[B]``.

    ``b*_g`` from :func:`opob_baseline` (``weights`` = truncated weights, ``baseline_eps`` its
    ``eps``), ``sigma_g`` the unbiased group reward std (:func:`group_reward_std`). Groups with
    ``sigma_g <= eps`` give ``A_i = 0`` (no signal). The update is
    ``sum_i A_i min(w_i, c) g_i``: multiply by the truncated weight in the loss coefficient.
    """
    baseline = opob_baseline(rewards, weights, grad_sq_norms, group_ids, eps=baseline_eps)
    sigma = group_reward_std(rewards, group_ids)
    centred = _as_float(rewards) - baseline
    return torch.where(sigma > eps, centred / sigma.clamp(min=eps), torch.zeros_like(centred))


# --------------------------------------------------------------------------------------------
# Stabilisers the paper compares against
# --------------------------------------------------------------------------------------------


def token_tis_weights(
    logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor, c: float
) -> torch.Tensor:
    """Token-level truncated IS weights ``min(exp(logp_t - behaviour_logp_t), c)``, ``[B, T]``.

    ``0`` on masked positions. ``exp`` of a ``+inf`` ratio is ``inf`` and truncates to ``c``;
    ``nan`` on a real token raises ``ValueError``. Detached.
    """
    if not c > 0:
        raise ValueError(f"truncation level c must be > 0; got {c}")
    keep = _check_pair(logp, behaviour_logp, mask)
    diff = logp.detach() - behaviour_logp.detach()
    _reject_nan("logp - behaviour_logp", diff, keep)
    weights = torch.exp(diff.clamp(max=math.log(c))).clamp(max=c)
    return torch.where(keep, weights, torch.zeros_like(weights))


def masked_is_mask(log_ratio_seq: torch.Tensor, c: float) -> torch.Tensor:
    """Sequence-level masked IS: ``1.0`` where ``w_i = exp(log_ratio_i) <= c``, else ``0.0``.

    Our choice: a dropped sequence gets weight 0; a kept one keeps its UNtruncated weight, so the
    applied weight is ``w_i * mask_i``. Compared in log space (``log_ratio <= log c``), so no
    overflow; a ``nan`` log-ratio is dropped (mask 0), ``-inf`` is kept (its weight is 0 anyway).
    """
    if not c > 0:
        raise ValueError(f"threshold c must be > 0; got {c}")
    lr = log_ratio_seq.detach()
    keep = (lr <= math.log(c)) & ~torch.isnan(lr)
    return keep.to(lr.dtype if lr.dtype.is_floating_point else torch.float32)


def geometric_mean_sequence_mask(
    logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    mask: torch.Tensor,
    low: float,
    high: float,
) -> torch.Tensor:
    """Geometric-mean sequence masking: ``1.0`` where ``low <= exp(mean_t log r_t) <= high``.

    ``log r_t = logp_t - behaviour_logp_t`` over the real tokens of the trajectory; compared in
    log space. Trajectories without real tokens, or with a non-finite mean (a ``+-inf`` ratio),
    get ``0.0``; ``nan`` on a real token raises ``ValueError``. Returns a float ``[B]`` mask.
    """
    if not (0 < low <= high):
        raise ValueError(f"need 0 < low <= high; got low={low}, high={high}")
    keep = _check_pair(logp, behaviour_logp, mask)
    diff = logp.detach() - behaviour_logp.detach()
    _reject_nan("logp - behaviour_logp", diff, keep)
    count = keep.sum(dim=-1)
    total = torch.where(keep, diff, torch.zeros_like(diff)).sum(dim=-1)
    mean = total / count.clamp(min=1)
    inside = (mean >= math.log(low)) & (mean <= math.log(high)) & (count > 0)
    inside &= torch.isfinite(mean)
    return inside.to(logp.dtype)


# --------------------------------------------------------------------------------------------
# Diagnostics and loss
# --------------------------------------------------------------------------------------------


def k3_kl(
    logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor, clamp: float = 20.0
) -> torch.Tensor:
    """K3 estimate of ``KL(mu || pi)`` from tokens sampled by the engine ``mu``, scalar tensor.

    Per real token ``r = logp - behaviour_logp = log(pi/mu)``, ``k3 = exp(r) - 1 - r >= 0``;
    ``E_mu[k3] = E_mu[-r] = KL(mu || pi)`` because ``E_mu[exp(r)] = 1``. Returns the token-mean
    over the mask (``0`` when there is no real token). ``r`` is clamped to ``[-clamp, clamp]``
    so ``exp`` stays finite; ``nan`` on a real token raises ``ValueError``. Detached.
    """
    keep = _check_pair(logp, behaviour_logp, mask)
    r = logp.detach() - behaviour_logp.detach()
    _reject_nan("logp - behaviour_logp", r, keep)
    r = torch.where(keep, r.clamp(-clamp, clamp), torch.zeros_like(r))
    k3 = torch.expm1(r) - r
    return k3.sum() / keep.sum().clamp(min=1)


def policy_gradient_loss(
    logp: torch.Tensor,
    mask: torch.Tensor,
    coefficients: torch.Tensor,
    normalizer: float | torch.Tensor,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Surrogate policy-gradient loss, scalar.

    ``L = -(1/normalizer) * sum_i c_i * sum_t mask_it * v_it * logp_it``

    with ``c_i`` the detached per-trajectory coefficients (advantage x truncated IS weight) and
    ``v_it`` optional detached per-token weights (token-level TIS / masking; 1 when omitted).
    Its gradient is ``-(1/normalizer) sum_i c_i g_i`` with ``g_i = grad sum_t mask v logp``.
    ``normalizer`` is e.g. ``B`` (sequence mean) or the number of real tokens (token mean).
    Masked positions are excluded with ``where``, so padding may hold non-finite values.
    """
    keep = _check_mask(mask, logp)
    _check_vector("coefficients", coefficients, logp.shape[0])
    _check_finite("coefficients", coefficients.detach())
    norm = float(normalizer)
    if not (math.isfinite(norm) and norm > 0):
        raise ValueError(f"normalizer must be a finite number > 0; got {norm}")
    per_token = mask.to(logp.dtype) if mask.dtype == torch.bool else mask.detach().to(logp.dtype)
    if token_weights is not None:
        if token_weights.shape != logp.shape:
            raise ValueError(
                f"token_weights must have the shape of logp {tuple(logp.shape)}; "
                f"got {tuple(token_weights.shape)}"
            )
        per_token = per_token * token_weights.detach()
    terms = torch.where(keep, per_token * logp, torch.zeros_like(logp))
    return -(coefficients.detach().to(logp.dtype) * terms.sum(dim=-1)).sum() / norm
