"""TMF-PG's return and baseline math against brute force."""

import numpy as np
import pytest

from rllib_ext.algorithms.tmf_pg.returns import (
    activation_discounts,
    baseline_groups,
    leave_one_out_baseline,
    returns_to_go,
)


@pytest.mark.parametrize("gamma,tau", [(1.0, 0.0), (0.9, 0.0), (1.0, 0.1), (0.95, 0.5)])
def test_soft_returns_to_go_match_the_double_sum(gamma, tau):
    """G_j = R_j - tau L_j is the soft return r_j + sum_{j' > j} gamma^(j'-j) (r_j' - tau
    logp_j')."""
    rng = np.random.default_rng(0)
    rewards, logps = rng.normal(size=7), -rng.random(7) * 2
    expected = [rewards[j] + sum(gamma ** (k - j) * (rewards[k] - tau * logps[k])
                                 for k in range(j + 1, 7)) for j in range(7)]
    reward_to_go, logp_to_go = returns_to_go(rewards, logps, gamma)
    np.testing.assert_allclose(reward_to_go - tau * logp_to_go, expected)


def test_returns_to_go_by_hand():
    # R = [1 + 2, 2]; L = [log 0.5, 0]: the last step's own log-prob is not in its return.
    reward_to_go, logp_to_go = returns_to_go([1.0, 2.0], [np.log(0.25), np.log(0.5)], 1.0)
    np.testing.assert_allclose(reward_to_go, [3.0, 2.0])
    np.testing.assert_allclose(logp_to_go, [np.log(0.5), 0.0])


def test_leave_one_out_baseline_matches_a_loop():
    rng = np.random.default_rng(1)
    values = rng.normal(size=50)
    groups = rng.integers(0, 6, size=50)
    groups[0] = 99  # alone in its group
    expected = []
    for i in range(50):
        others = [values[k] for k in range(50) if groups[k] == groups[i] and k != i]
        expected.append(np.mean(others) if others else 0.0)
    np.testing.assert_allclose(leave_one_out_baseline(values, groups), expected)


def test_baseline_groups_separate_activation_index_and_observation():
    groups = baseline_groups(np.array([0, 0, 1, 1]), np.array([2, 3, 2, 2]), num_observations=4)
    assert groups.tolist() == [2, 3, 6, 6]


def test_activation_discounts():
    np.testing.assert_allclose(activation_discounts(4, 0.5), [1.0, 0.5, 0.25, 0.125])
    np.testing.assert_allclose(activation_discounts(3, 1.0), [1.0, 1.0, 1.0])
