"""Resource selection (congestion) game (parameters are ours, see ``docs/tmf_pg.md``).

M resources with base values v_m. An agent's observation is the resource it holds,
o in {0..M-1}; its action is the resource to hold next, a in {0..M-1}. When an agent acts
it collects the payoff of the resource it holds, pays a switching cost if it moves, and
moves (deterministically) to the chosen resource; an idle agent keeps its resource:

    r(o, a, mu)    = v_o - c * mu(o) - kappa * 1[a != o]
    P(o' | o, a)   = 1[o' = a],        P_0(o' | o) = 1[o' = o]

The payoff falls with the fraction mu(o) on the agent's own resource, so the game is
monotone: sum_o (mu(o) - mu'(o)) (r(o, a, mu) - r(o, a, mu')) = -c ||mu - mu'||^2 <= 0.

The payoff falls linearly with the fraction mu(o) of the population on the resource
(congestion c > 0). Without switching costs the game has the stationary (Wardrop)
equilibrium mu* that equalises payoffs on its support,

    v_m - c * mu*(m) = lambda  for mu*(m) > 0,      v_m - c * 0 <= lambda  otherwise,

found by :func:`wardrop_equilibrium`; the policy pi(a | o, mu) = mu*(a) started from
mu_0 = mu* is an exact equilibrium for every activation fraction (the flow stays at mu*
and every resource of the support pays lambda).

Env config keys (besides the common ones in ``env.py``), defaults in brackets:
    resource_values        v, a list of M >= 2 numbers          [1.0, 0.8, 0.6, 0.4]
    congestion             c > 0                                [1.0]
    switching_cost         kappa >= 0                           [0.0]
    initial_distribution   mu_0, M probabilities or "uniform"   ["uniform"]
"""

from __future__ import annotations

import numpy as np

from envs.mean_field.core import (
    MeanFieldGame,
    check_distribution,
    check_float,
    check_vector,
)
from envs.mean_field.env import MeanFieldEnv

DEFAULTS = {
    "resource_values": [1.0, 0.8, 0.6, 0.4],
    "congestion": 1.0,
    "switching_cost": 0.0,
    "initial_distribution": "uniform",
}


class ResourceSelectionGame(MeanFieldGame):
    """See the module docstring for the payoff and dynamics."""

    def __init__(self, resource_values=DEFAULTS["resource_values"],
                 congestion=DEFAULTS["congestion"], switching_cost=DEFAULTS["switching_cost"],
                 initial_distribution=DEFAULTS["initial_distribution"]):
        self.values = check_vector("resource_values", resource_values, min_length=2)
        self.congestion = check_float("congestion", congestion, low=0.0, low_open=True)
        self.switching_cost = check_float("switching_cost", switching_cost, low=0.0)
        size = len(self.values)
        self.num_observations = self.num_actions = size
        if isinstance(initial_distribution, str) and initial_distribution == "uniform":
            self.initial_distribution = np.full(size, 1.0 / size)
        else:
            self.initial_distribution = check_distribution(
                "initial_distribution", initial_distribution, size)
        self._switch = self.switching_cost * (1.0 - np.eye(size))
        self._moves = np.broadcast_to(np.eye(size)[None, :, :], (size, size, size))

    def rewards(self, mu: np.ndarray) -> np.ndarray:
        payoff = self.values - self.congestion * mu
        return payoff[:, None] - self._switch

    def transitions(self, mu: np.ndarray, dt: float = 1.0) -> np.ndarray:
        return self._moves

    def observation_labels(self) -> list[str]:
        return [f"resource {m}" for m in range(self.num_observations)]


def wardrop_equilibrium(values, congestion: float) -> tuple[np.ndarray, float]:
    """The distribution mu* with v_m - c mu*(m) = lambda on its support and v_m <= lambda
    off it (sum mu* = 1), and the equalised payoff lambda.

    Water filling: sort v descending; with support the top s resources,
    lambda_s = (sum_{m<=s} v_m - c) / s; the support is the largest s with v_s > lambda_s.
    """
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(-values)
    sorted_values = values[order]
    level = None
    for size in range(len(values), 0, -1):
        candidate = (sorted_values[:size].sum() - congestion) / size
        if sorted_values[size - 1] > candidate:
            level = candidate
            break
    mu = np.clip(values - level, 0.0, None) / congestion
    return mu / mu.sum(), float(level)


class ResourceSelectionEnv(MeanFieldEnv):
    """RLlib MultiAgentEnv of the resource selection game (see the module docstring)."""

    game_class = ResourceSelectionGame
    game_defaults = DEFAULTS
