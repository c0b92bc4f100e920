"""TMF-PG's return and baseline math (pure numpy, unit-tested against brute force).

An agent of an asynchronous episode acts at its own activation steps j = 0, 1, ..., n-1
(env steps at which it is in S_t); RLlib's single-agent episode holds exactly those steps,
with the reward of step j and the behaviour log-probability logp_j = log pi(a_j | o_j, mu).

Entropy-regularised objective (coefficient tau, discount gamma per own activation): the
agent collects gamma^j (r_j + tau * H(pi(. | o_j, mu_j))) at its activation j. Its policy
gradient is

    grad J_tau = E[ sum_j gamma^j ( grad log pi(a_j | o_j) (G_j - b_j) + tau grad H(pi(. | o_j)) ) ]

with the soft return-to-go of the steps *after* j estimated by -tau logp (an unbiased
estimate of the entropy) and step j's own entropy differentiated exactly:

    G_j = r_j + sum_{j' > j} gamma^(j' - j) (r_j' - tau logp_j') = R_j - tau L_j,
    R_j = sum_{j' >= j} gamma^(j' - j) r_j',      L_j = sum_{j' > j} gamma^(j' - j) logp_j'

(:func:`returns_to_go` gives R and L, so that tau, which may follow a schedule, is applied
where the loss is computed: the baseline below is linear, b(R - tau L) = b(R) - tau b(L)).

The weight gamma^j (:func:`activation_discounts`) is what the exact gradient of J has and
what the usual "discounted" policy-gradient estimators drop (for gamma < 1 they overweigh
later decisions). Any b_j that does not depend on a_j keeps the gradient unbiased; the
baseline here is the leave-one-out mean of G over the samples of the same group (same
activation index j and same own observation o_j) in the batch.
"""

from __future__ import annotations

import numpy as np


def returns_to_go(rewards: np.ndarray, logps: np.ndarray,
                  gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """(R, L) for one agent's steps: R_j = sum_{j' >= j} gamma^(j' - j) r_j' and
    L_j = sum_{j' > j} gamma^(j' - j) logp_j'; the soft return is G_j = R_j - tau L_j."""
    rewards = np.asarray(rewards, dtype=np.float64)
    logps = np.asarray(logps, dtype=np.float64)
    reward_to_go, logp_to_go = np.empty_like(rewards), np.empty_like(rewards)
    future_reward = future_logp = 0.0
    for j in range(len(rewards) - 1, -1, -1):
        reward_to_go[j] = future_reward = rewards[j] + gamma * future_reward
        logp_to_go[j] = future_logp
        future_logp = gamma * (logps[j] + future_logp)
    return reward_to_go, logp_to_go


def activation_discounts(length: int, gamma: float) -> np.ndarray:
    """gamma^j for an agent's activations j = 0 .. length - 1."""
    return gamma ** np.arange(length, dtype=np.float64)


def leave_one_out_baseline(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """b_i = mean{values[k] : groups[k] == groups[i], k != i}; 0 for a sample alone in its
    group. ``groups`` holds one integer id per sample."""
    values = np.asarray(values, dtype=np.float64)
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=values)
    others = counts[inverse] - 1
    return np.divide(sums[inverse] - values, others, out=np.zeros_like(values),
                     where=others > 0)


def baseline_groups(activation_index: np.ndarray, own_observation: np.ndarray,
                    num_observations: int) -> np.ndarray:
    """Group id j * O + o of each sample (activation index j, own observation o)."""
    return np.asarray(activation_index) * num_observations + np.asarray(own_observation)
