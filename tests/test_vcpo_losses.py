"""VCPO's pure math against brute-force (plain Python loop) computations."""

import math

import pytest
import torch

from rllib_ext.algorithms.vcpo import losses as L

B, T = 7, 5


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    behaviour = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    lengths = [5, 1, 3, 4, 2, 5, 3]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    # Garbage at padding must never leak into any result.
    logp[~mask] = float("nan")
    behaviour[~mask] = -float("inf")
    return logp, behaviour, mask


def _real(logp, behaviour, mask, i):
    return [(float(logp[i, t]), float(behaviour[i, t])) for t in range(T) if mask[i, t]]


def test_sequence_log_ratio_and_weights(batch):
    logp, behaviour, mask = batch
    got = L.sequence_log_ratio(logp, behaviour, mask, clamp=20.0)
    for i in range(B):
        want = sum(a - b for a, b in _real(logp, behaviour, mask, i))
        assert got[i].item() == pytest.approx(want, rel=1e-12)
    assert torch.allclose(L.sequence_is_weights(got), torch.exp(got))
    # the clamp: a huge ratio and +-inf on a real token become +-clamp
    big = torch.tensor([[30.0, 0.0], [float("inf"), 0.0], [-float("inf"), 0.0]])
    out = L.sequence_log_ratio(big, torch.zeros_like(big), torch.ones(3, 2), clamp=20.0)
    assert out.tolist() == [20.0, 20.0, -20.0]
    assert torch.isfinite(L.sequence_is_weights(out)).all()


def test_sequence_log_ratio_rejects_nan_on_real_tokens():
    logp = torch.tensor([[0.0, float("nan")]])
    with pytest.raises(ValueError, match="NaN on 1 real"):
        L.sequence_log_ratio(logp, torch.zeros_like(logp), torch.ones(1, 2))
    with pytest.raises(ValueError, match="behaviour_logp must have the shape"):
        L.sequence_log_ratio(logp, torch.zeros(1, 3), torch.ones(1, 2))
    with pytest.raises(ValueError, match="clamp must be > 0"):
        L.sequence_log_ratio(logp, torch.zeros_like(logp), torch.ones(1, 2), clamp=0)


def test_truncate_weights():
    w = torch.tensor([0.5, 8.0, 9.0, 1e8])
    assert L.truncate_weights(w, 8.0).tolist() == [0.5, 8.0, 8.0, 8.0]
    with pytest.raises(ValueError, match="truncation level c"):
        L.truncate_weights(w, -1.0)


def test_effective_sample_size():
    w = torch.tensor([0.5, 2.0, 1.0, 3.0])
    want = sum(w.tolist()) ** 2 / sum(x * x for x in w.tolist())
    assert L.effective_sample_size(w).item() == pytest.approx(want, rel=1e-6)
    assert L.ess_ratio(w).item() == pytest.approx(want / 4, rel=1e-6)
    assert L.ess_ratio(torch.ones(5)).item() == pytest.approx(1.0)
    # one dominant weight -> ESS ~ 1; e^20-sized weights do not overflow
    huge = torch.tensor([math.exp(20.0), 1.0, 1.0, 1.0], dtype=torch.float32)
    assert L.effective_sample_size(huge).item() == pytest.approx(1.0, rel=1e-6)
    assert L.effective_sample_size(torch.zeros(3)).item() == 0.0
    with pytest.raises(ValueError, match="weights must be >= 0"):
        L.effective_sample_size(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="weights must be finite"):
        L.effective_sample_size(torch.tensor([1.0, float("inf")]))


@pytest.mark.parametrize(
    ("rho", "rho_ref", "rule", "floor", "want"),
    [
        (0.25, 1.0, "sqrt", 0.0, 0.5),
        (0.25, 1.0, "linear", 0.0, 0.25),
        (0.25, 1.0, "none", 0.0, 1.0),
        (0.44, 0.55, "sqrt", 0.0, math.sqrt(0.8)),
        (0.9, 0.55, "sqrt", 0.0, 1.0),
        (0.01, 1.0, "linear", 0.1, 0.1),
    ],
)
def test_ess_lr_scale(rho, rho_ref, rule, floor, want):
    assert L.ess_lr_scale(torch.tensor(rho), rho_ref, rule, floor) == pytest.approx(want)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ess_ratio": 1.5}, "ess_ratio must be in"),
        ({"ess_ratio": float("nan")}, "ess_ratio must be in"),
        ({"ess_ratio": 0.5, "rho_ref": 0.0}, "rho_ref must be"),
        ({"ess_ratio": 0.5, "rule": "cubic"}, "rule must be one of"),
        ({"ess_ratio": 0.5, "floor": 2.0}, "floor must be in"),
    ],
)
def test_ess_lr_scale_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        L.ess_lr_scale(**kwargs)


REWARDS = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.2, 3.0, 0.0])
GROUPS = torch.tensor([7, 7, 7, 3, 3, 3, 11, 5, 5])  # group 11 is a singleton, 3 has a spread


def _groups_of(groups):
    out = {}
    for i, g in enumerate(groups.tolist()):
        out.setdefault(g, []).append(i)
    return out


def _unbiased_std(xs):
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_group_reward_std_and_grpo_advantages():
    sigma = L.group_reward_std(REWARDS, GROUPS)
    adv = L.group_mean_std_advantages(REWARDS, GROUPS, eps=1e-6)
    plain = L.group_mean_std_advantages(REWARDS, GROUPS, normalize_std=False)
    for idx in _groups_of(GROUPS).values():
        rs = [REWARDS[i].item() for i in idx]
        mean, std = sum(rs) / len(rs), _unbiased_std(rs)
        for i in idx:
            assert sigma[i].item() == pytest.approx(std, abs=1e-6)
            want = 0.0 if std <= 1e-6 else (REWARDS[i].item() - mean) / (std + 1e-6)
            assert adv[i].item() == pytest.approx(want, abs=1e-6)
            assert plain[i].item() == pytest.approx(REWARDS[i].item() - mean, abs=1e-6)
    assert adv[6].item() == 0.0  # singleton group
    assert adv[:3].abs().sum() > 0


def test_group_ids_must_be_integers():
    with pytest.raises(ValueError, match="group_ids must be an integer tensor"):
        L.group_reward_std(REWARDS, GROUPS.float())
    with pytest.raises(ValueError, match="group_ids must have length"):
        L.group_reward_std(REWARDS, GROUPS[:3])


def _brute_baseline(rewards, weights, norms, groups, i):
    idx = _groups_of(groups)[groups[i].item()]
    q = [weights[j].item() ** 2 * norms[j].item() for j in idx]
    if sum(q) == 0:
        return sum(rewards[j].item() for j in idx) / len(idx)
    return sum(qj * rewards[j].item() for qj, j in zip(q, idx, strict=True)) / sum(q)


def test_opob_baseline_and_advantages():
    g = torch.Generator().manual_seed(1)
    weights = L.truncate_weights(torch.rand(9, generator=g) * 10, 8.0)
    weights[7:] = 0.0  # a group whose weights were all dropped -> plain mean
    norms = torch.rand(9, generator=g) * 100
    base = L.opob_baseline(REWARDS, weights, norms, GROUPS)
    adv = L.opob_advantages(REWARDS, weights, norms, GROUPS)
    sigma = L.group_reward_std(REWARDS, GROUPS)
    for i in range(9):
        b = _brute_baseline(REWARDS, weights, norms, GROUPS, i)
        assert base[i].item() == pytest.approx(b, rel=1e-5)
        want = 0.0 if sigma[i] <= 1e-6 else (REWARDS[i].item() - b) / sigma[i].item()
        assert adv[i].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert base[7].item() == pytest.approx(1.5)  # fallback: mean of group 5
    # equal weights and norms -> the GRPO mean baseline
    flat = L.opob_baseline(REWARDS, torch.ones(9), torch.ones(9), GROUPS)
    assert flat[:3].tolist() == pytest.approx([2 / 3] * 3)


def test_opob_baseline_is_the_variance_minimiser():
    """b* minimises sum_i ||(R_i - b) w_i g_i||^2 over b (grid check on explicit vectors)."""
    g = torch.Generator().manual_seed(2)
    grads = torch.randn(6, 4, generator=g, dtype=torch.float64)
    rewards = torch.rand(6, generator=g, dtype=torch.float64)
    w = torch.rand(6, generator=g, dtype=torch.float64) * 3
    b_star = L.opob_baseline(rewards, w, (grads**2).sum(1), torch.zeros(6, dtype=torch.long))[0]

    def second_moment(b):
        return sum(((rewards[i] - b) * w[i] * grads[i]).pow(2).sum() for i in range(6))

    grid = torch.linspace(-1, 2, 3001, dtype=torch.float64)
    best = grid[torch.stack([second_moment(b) for b in grid]).argmin()]
    assert b_star.item() == pytest.approx(best.item(), abs=1e-3)
    assert second_moment(b_star) <= second_moment(rewards.mean())


def test_opob_rejects_bad_inputs():
    with pytest.raises(ValueError, match="grad_sq_norms must be >= 0"):
        L.opob_baseline(REWARDS, torch.ones(9), -torch.ones(9), GROUPS)
    with pytest.raises(ValueError, match="weights must be finite"):
        L.opob_baseline(REWARDS, torch.full((9,), float("inf")), torch.ones(9), GROUPS)
    with pytest.raises(ValueError, match="rewards must be finite"):
        L.opob_advantages(REWARDS * float("nan"), torch.ones(9), torch.ones(9), GROUPS)


def test_token_tis_weights(batch):
    logp, behaviour, mask = batch
    got = L.token_tis_weights(logp, behaviour, mask, c=1.5)
    for i in range(B):
        for t in range(T):
            want = min(math.exp(logp[i, t] - behaviour[i, t]), 1.5) if mask[i, t] else 0.0
            assert got[i, t].item() == pytest.approx(want, rel=1e-12)
    inf = torch.tensor([[float("inf")]])
    assert L.token_tis_weights(inf, torch.zeros(1, 1), torch.ones(1, 1), c=8.0).item() == 8.0


def test_masked_is_mask():
    lr = torch.tensor([0.0, math.log(8.0) - 1e-9, math.log(8.0) + 1e-6, 25.0, -float("inf"),
                       float("nan"), float("inf")], dtype=torch.float64)
    assert L.masked_is_mask(lr, 8.0).tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]


def test_geometric_mean_sequence_mask(batch):
    logp, behaviour, mask = batch
    low, high = 0.6, 1.4
    got = L.geometric_mean_sequence_mask(logp, behaviour, mask, low, high)
    for i in range(B):
        pairs = _real(logp, behaviour, mask, i)
        geo = math.exp(sum(a - b for a, b in pairs) / len(pairs))
        assert got[i].item() == float(low <= geo <= high)
    assert 0 < got.sum() < B  # the fixture exercises both outcomes
    empty = L.geometric_mean_sequence_mask(logp[:1], behaviour[:1], torch.zeros(1, T), low, high)
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="need 0 < low <= high"):
        L.geometric_mean_sequence_mask(logp, behaviour, mask, 1.2, 1.1)


def test_k3_kl(batch):
    logp, behaviour, mask = batch
    terms = [math.exp(a - b) - 1 - (a - b)
             for i in range(B) for a, b in _real(logp, behaviour, mask, i)]
    assert L.k3_kl(logp, behaviour, mask).item() == pytest.approx(sum(terms) / len(terms))


def test_k3_kl_estimates_kl_mu_pi():
    """Sampling from mu, mean K3 converges to KL(mu || pi) (not KL(pi || mu))."""
    mu = torch.tensor([0.9, 0.05, 0.05], dtype=torch.float64)
    pi = torch.tensor([0.4, 0.3, 0.3], dtype=torch.float64)
    tokens = torch.multinomial(mu, 200_000, replacement=True, generator=torch.Generator().manual_seed(3))
    logp, behaviour = pi.log()[tokens][None], mu.log()[tokens][None]
    est = L.k3_kl(logp, behaviour, torch.ones_like(logp)).item()
    kl_mu_pi = (mu * (mu / pi).log()).sum().item()
    kl_pi_mu = (pi * (pi / mu).log()).sum().item()
    assert est == pytest.approx(kl_mu_pi, rel=0.02)
    assert abs(est - kl_pi_mu) > 0.1


def test_policy_gradient_loss_value_and_gradient(batch):
    logp, _, mask = batch
    logp = torch.where(mask, logp, torch.zeros_like(logp)).requires_grad_(True)
    coeff = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0, 2.0], dtype=torch.float64)
    tw = torch.rand(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    loss = L.policy_gradient_loss(logp, mask, coeff, 4.0, token_weights=tw)
    want = -sum(coeff[i].item() * sum(tw[i, t].item() * logp[i, t].item()
                                      for t in range(T) if mask[i, t]) for i in range(B)) / 4.0
    assert loss.item() == pytest.approx(want, rel=1e-12)
    loss.backward()
    assert torch.allclose(logp.grad, -coeff[:, None] * tw * mask / 4.0)


def test_policy_gradient_loss_ignores_padding_garbage_and_validates():
    logp = torch.tensor([[-1.0, -float("inf")], [-0.5, float("nan")]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss = L.policy_gradient_loss(logp, mask, torch.tensor([1.0, 2.0]), 2.0)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    with pytest.raises(ValueError, match="normalizer must be"):
        L.policy_gradient_loss(logp, mask, torch.ones(2), 0.0)
    with pytest.raises(ValueError, match="coefficients must have length"):
        L.policy_gradient_loss(logp, mask, torch.ones(3), 1.0)
