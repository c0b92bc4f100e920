"""Exact mean-field model of a game: population flow, values, best response, exploitability.

A representative agent lives through H env steps and acts at each with probability alpha
(the activation fraction). A policy is a map (mu, t) -> pi_t(. | ., mu) ([O, A]
row-stochastic; the shared network policy ignores t); along a flow it becomes the
time-indexed tables pi_t = pi_t(. | ., mu_t).

Flow (TMF working model):

    mu_{t+1}(o') = (1 - alpha) mu_t(o') + alpha sum_{o, a} mu_t(o) pi_t(a | o) P(o' | o, a, mu_t)

Value of policy pi against a flow (rewards only at acting steps; tau >= 0 is the entropy
regularisation, tau = 0 the plain game):

    Q_t(o, a) = r(o, a, mu_t) + sum_o' P(o' | o, a, mu_t) V_{t+1}(o')
    V_t(o)    = alpha sum_a pi_t(a | o) [Q_t(o, a) - tau log pi_t(a | o)] + (1 - alpha) V_{t+1}(o)
    V_H       = 0,     J(pi; mu) = sum_o mu_0(o) V_0(o)

Best response (dynamic programming over the same flow):

    V*_t(o) = alpha max_a Q*_t(o, a) + (1 - alpha) V*_{t+1}(o)                   (tau = 0)
    V*_t(o) = alpha tau log sum_a exp(Q*_t(o, a) / tau) + (1 - alpha) V*_{t+1}(o)  (tau > 0)

with Q* built from V*; the (soft) best-response policy is argmax / softmax(Q*_t / tau).

Exploitability(pi) = max_pi' J(pi'; mu^pi) - J(pi; mu^pi) = sum_o mu_0(o) (V*_0 - V^pi_0)(o)
>= 0, with mu^pi the flow pi induces; it is 0 exactly at a (regularised) equilibrium.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from envs.mean_field.core import MeanFieldGame

PolicyFn = Callable[[np.ndarray, int], np.ndarray]


def constant_policy(table: np.ndarray) -> PolicyFn:
    """The policy that ignores mu and t: pi(a | o) = table[o, a]."""
    table = np.asarray(table, dtype=np.float64)
    return lambda mu, t: table


def time_indexed_policy(tables: np.ndarray) -> PolicyFn:
    """The open-loop policy pi_t(a | o) = tables[t, o, a] (ignores mu)."""
    return lambda mu, t: tables[t]


def mean_field_flow(game: MeanFieldGame, policy: PolicyFn, alpha: float, horizon: int,
                    mu0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The flow mu_0..mu_H ([H+1, O]) of ``policy`` and its tables pi_0..pi_{H-1}
    ([H, O, A]); see the module docstring for the recursion."""
    mu = np.asarray(game.initial_distribution if mu0 is None else mu0, dtype=np.float64)
    mus = np.empty((horizon + 1, game.num_observations))
    pis = np.empty((horizon, game.num_observations, game.num_actions))
    mus[0] = mu
    for t in range(horizon):
        pi = policy(mu, t)
        pis[t] = pi
        moved = np.einsum("o,oa,oap->p", mu, pi, game.transitions(mu))
        mu = (1.0 - alpha) * mu + alpha * moved
        mus[t + 1] = mu
    return mus, pis


def _entropy_term(pi: np.ndarray, tau: float) -> np.ndarray:
    """-tau sum_a pi log pi per row (0 log 0 = 0)."""
    if tau == 0.0:
        return np.zeros(pi.shape[0])
    logs = np.log(np.where(pi > 0, pi, 1.0))
    return -tau * (pi * logs).sum(axis=1)


def policy_values(game: MeanFieldGame, mus: np.ndarray, pis: np.ndarray, alpha: float,
                  entropy_coeff: float = 0.0) -> np.ndarray:
    """V^pi_t(o) for t = 0..H ([H+1, O]) of the tables ``pis`` against the flow ``mus``."""
    horizon = len(pis)
    values = np.zeros((horizon + 1, game.num_observations))
    for t in range(horizon - 1, -1, -1):
        q = game.rewards(mus[t]) + game.transitions(mus[t]) @ values[t + 1]
        acting = (pis[t] * q).sum(axis=1) + _entropy_term(pis[t], entropy_coeff)
        values[t] = alpha * acting + (1.0 - alpha) * values[t + 1]
    return values


def best_response(game: MeanFieldGame, mus: np.ndarray, alpha: float,
                  entropy_coeff: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Optimal values V*_t ([H+1, O]) against the flow ``mus`` and the (soft) best-response
    tables ([H, O, A]): greedy for ``entropy_coeff`` 0 (ties split evenly), softmax(Q*/tau)
    otherwise."""
    horizon = len(mus) - 1
    values = np.zeros((horizon + 1, game.num_observations))
    policy = np.empty((horizon, game.num_observations, game.num_actions))
    tau = entropy_coeff
    for t in range(horizon - 1, -1, -1):
        q = game.rewards(mus[t]) + game.transitions(mus[t]) @ values[t + 1]
        top = q.max(axis=1, keepdims=True)
        if tau == 0.0:
            greedy = np.isclose(q, top, rtol=0.0, atol=1e-12).astype(np.float64)
            policy[t] = greedy / greedy.sum(axis=1, keepdims=True)
            acting = top[:, 0]
        else:
            weights = np.exp((q - top) / tau)
            total = weights.sum(axis=1, keepdims=True)
            policy[t] = weights / total
            acting = top[:, 0] + tau * np.log(total[:, 0])
        values[t] = alpha * acting + (1.0 - alpha) * values[t + 1]
    return values, policy


@dataclass
class Evaluation:
    """A policy against its own flow: flow, tables, J, best-response J, exploitability."""

    mus: np.ndarray
    pis: np.ndarray
    value: float
    best_response_value: float

    @property
    def exploitability(self) -> float:
        return self.best_response_value - self.value


@dataclass
class MeanFieldModel:
    """The mean-field limit of an N-agent env: the game, the activation fraction alpha and
    the horizon H in env steps."""

    game: MeanFieldGame
    alpha: float
    horizon: int

    def flow(self, policy: PolicyFn, mu0: np.ndarray | None = None):
        return mean_field_flow(self.game, policy, self.alpha, self.horizon, mu0)

    def evaluate(self, policy: PolicyFn, entropy_coeff: float = 0.0) -> Evaluation:
        """J(pi; mu^pi), max_pi' J(pi'; mu^pi) and so exploitability(pi)."""
        mus, pis = self.flow(policy)
        mu0 = mus[0]
        value = mu0 @ policy_values(self.game, mus, pis, self.alpha, entropy_coeff)[0]
        best = mu0 @ best_response(self.game, mus, self.alpha, entropy_coeff)[0][0]
        return Evaluation(mus=mus, pis=pis, value=float(value), best_response_value=float(best))

    def exploitability(self, policy: PolicyFn, entropy_coeff: float = 0.0) -> float:
        return self.evaluate(policy, entropy_coeff).exploitability


def fixed_point_equilibrium(model: MeanFieldModel, entropy_coeff: float,
                            iterations: int = 500, damping: float = 0.1,
                            tol: float = 1e-10) -> tuple[np.ndarray, float]:
    """Time-indexed regularised equilibrium by damped fictitious play on policy tables:
    pi <- (1 - damping) pi + damping softBR(mu^pi). Returns (tables [H, O, A],
    regularised exploitability). A reference solution for tests and benches; it is not
    TMF-PG."""
    game, horizon = model.game, model.horizon
    tables = np.full((horizon, game.num_observations, game.num_actions), 1.0 / game.num_actions)
    for _ in range(iterations):
        mus, _ = model.flow(time_indexed_policy(tables))
        _, response = best_response(game, mus, model.alpha, entropy_coeff)
        tables = (1.0 - damping) * tables + damping * response
        if np.abs(response - tables).max() < tol:
            break
    return tables, model.exploitability(time_indexed_policy(tables), entropy_coeff)
