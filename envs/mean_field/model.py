"""Exact mean-field model of a game: population flow, values, best response, exploitability,
and an equilibrium solver.

A representative agent lives through H env steps; at step t it acts with probability alpha_t
(the activation fraction B_t / N, which is also the step's duration in rounds, ``core.py``)
and is passive otherwise. A policy is a map (mu, t) -> pi_t(. | ., mu) ([O, A]
row-stochastic); along a flow it becomes the time-indexed tables pi_t = pi_t(. | ., mu_t).
The step kernels along a flow are r_t = r(., ., mu_t), P_t = P(. | ., ., mu_t; dt = alpha_t)
and P0_t = P_0(. | ., mu_t; dt = alpha_t).

Flow (the paper author's, with B_t / N = alpha_t):

    mu_{t+1}(o) = sum_o' mu_t(o') [ alpha_t sum_a pi_t(a | o') P_t(o | o', a)
                                    + (1 - alpha_t) P0_t(o | o') ]

Values (tau >= 0 the entropy regularisation, tau = 0 the plain game; gamma discounts per own
action, the learner's clock, so it means the same under every schedule):

    Q_t(o, a) = r_t(o, a) + gamma sum_o' P_t(o' | o, a) W_{t+1}(o')
    V_t(o)    = sum_a pi_t(a | o) [Q_t(o, a) - tau log pi_t(a | o)]         (acting at (o, t))
    W_t(o)    = alpha_t V_t(o) + (1 - alpha_t) sum_o' P0_t(o' | o) W_{t+1}(o')
    W_H       = 0,     J(pi; mu) = sum_o mu_0(o) W_0(o)

V is the author's value of an active agent; W is the value before the activation draw.
Best response (dynamic programming over the same flow): V*_t(o) = max_a Q*_t(o, a)
(tau = 0) or tau log sum_a exp(Q*_t(o, a) / tau) (tau > 0), with Q*, W* built from V*; the
best-response policy is argmax / softmax(Q*_t / tau).

Exploitability, as the author's equilibrium condition V^{pi*}(o', mu*_t) >= V^pi(o', mu*_t)
for all pi, o', t reads it: per acting state and step

    e_t(o') = V*_t(o') - V^pi_t(o') >= 0          (0 for all o', t <=> pi is an equilibrium)

and its mu_0-weighted summary  E(pi) = sum_o mu_0(o) (W*_0 - W^pi_0)(o)
= max_pi' J(pi'; mu^pi) - J(pi; mu^pi) >= 0, with mu^pi the flow pi induces.
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


def per_step(alpha, horizon: int) -> np.ndarray:
    """alpha_0 .. alpha_{H-1} ([H]) from a number or a length-H sequence."""
    alphas = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (horizon,))
    if np.any(alphas <= 0) or np.any(alphas > 1):
        raise ValueError(f"activation fractions must be in (0, 1], got {alpha!r}.")
    return alphas


@dataclass
class Kernels:
    """The game's tables along a flow: ``rewards`` [H, O, A], ``active`` P_t [H, O, A, O],
    ``passive`` P0_t [H, O, O]."""

    rewards: np.ndarray
    active: np.ndarray
    passive: np.ndarray


def step_kernels(game: MeanFieldGame, mu: np.ndarray, alpha: float):
    """(r(., ., mu) [O, A], P(. | ., ., mu; alpha) [O, A, O], P_0(. | ., mu; alpha) [O, O])."""
    return game.step_tables(mu, alpha)


def kernels_along(game: MeanFieldGame, mus: np.ndarray, alphas: np.ndarray) -> Kernels:
    """The kernels at mu_0 .. mu_{H-1} of a given flow."""
    tables = [step_kernels(game, mus[t], alphas[t]) for t in range(len(alphas))]
    return Kernels(*(np.stack(column) for column in zip(*tables)))


def flow_step(mu: np.ndarray, pi: np.ndarray, active: np.ndarray, passive: np.ndarray,
              alpha: float) -> np.ndarray:
    """mu_{t+1}(o) = sum_o' mu_t(o') [alpha sum_a pi(a | o') P(o | o', a)
    + (1 - alpha) P_0(o | o')]."""
    moved = np.einsum("o,oa,oap->p", mu, pi, active)
    return alpha * moved + (1.0 - alpha) * mu @ passive


def flow_and_kernels(game: MeanFieldGame, policy: PolicyFn, alphas: np.ndarray,
                     mu0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, Kernels]:
    """The flow mu_0..mu_H ([H+1, O]) of ``policy``, its tables pi_0..pi_{H-1} ([H, O, A])
    and the kernels along the flow."""
    mu = np.asarray(game.initial_distribution if mu0 is None else mu0, dtype=np.float64)
    horizon = len(alphas)
    mus = np.empty((horizon + 1, game.num_observations))
    pis = np.empty((horizon, game.num_observations, game.num_actions))
    tables = []
    mus[0] = mu
    for t in range(horizon):
        rewards, active, passive = step_kernels(game, mu, alphas[t])
        pis[t] = policy(mu, t)
        mu = flow_step(mu, pis[t], active, passive, alphas[t])
        mus[t + 1] = mu
        tables.append((rewards, active, passive))
    return mus, pis, Kernels(*(np.stack(column) for column in zip(*tables)))


def mean_field_flow(game: MeanFieldGame, policy: PolicyFn, alpha, horizon: int,
                    mu0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The flow mu_0..mu_H ([H+1, O]) and tables pi_0..pi_{H-1} ([H, O, A]) of ``policy``
    with activation fraction(s) ``alpha`` (a number or one per step)."""
    mus, pis, _ = flow_and_kernels(game, policy, per_step(alpha, horizon), mu0)
    return mus, pis


def _entropy_term(pi: np.ndarray, tau: float) -> np.ndarray:
    """-tau sum_a pi log pi per row (0 log 0 = 0)."""
    if tau == 0.0:
        return np.zeros(pi.shape[0])
    logs = np.log(np.where(pi > 0, pi, 1.0))
    return -tau * (pi * logs).sum(axis=1)


@dataclass
class ValueTables:
    """``agent`` W_t(o) [H+1, O] (before the activation draw), ``active`` V_t(o) [H, O] (an
    agent acting at (o, t)), ``q`` Q_t(o, a) [H, O, A]; see the module docstring."""

    agent: np.ndarray
    active: np.ndarray
    q: np.ndarray


def _backward(kernels: Kernels, alphas: np.ndarray, gamma: float, acting) -> ValueTables:
    """The shared backward recursion; ``acting(t, q)`` gives V_t from Q_t."""
    horizon, num_obs, num_actions = kernels.rewards.shape
    agent = np.zeros((horizon + 1, num_obs))
    active = np.empty((horizon, num_obs))
    q = np.empty((horizon, num_obs, num_actions))
    for t in range(horizon - 1, -1, -1):
        q[t] = kernels.rewards[t] + gamma * kernels.active[t] @ agent[t + 1]
        active[t] = acting(t, q[t])
        agent[t] = alphas[t] * active[t] \
            + (1.0 - alphas[t]) * kernels.passive[t] @ agent[t + 1]
    return ValueTables(agent=agent, active=active, q=q)


def policy_values(kernels: Kernels, pis: np.ndarray, alphas: np.ndarray, gamma: float = 1.0,
                  entropy_coeff: float = 0.0) -> ValueTables:
    """W^pi, V^pi and Q^pi of the tables ``pis`` along the flow of ``kernels``."""
    return _backward(kernels, alphas, gamma, lambda t, q: (pis[t] * q).sum(axis=1)
                     + _entropy_term(pis[t], entropy_coeff))


def best_response(kernels: Kernels, alphas: np.ndarray, gamma: float = 1.0,
                  entropy_coeff: float = 0.0) -> tuple[ValueTables, np.ndarray]:
    """Optimal values against the flow of ``kernels`` and the (soft) best-response tables
    ([H, O, A]): greedy for ``entropy_coeff`` 0 (ties split evenly), softmax(Q*/tau)
    otherwise."""
    tau = entropy_coeff
    horizon, num_obs, num_actions = kernels.rewards.shape
    policy = np.empty((horizon, num_obs, num_actions))

    def acting(t, q):
        top = q.max(axis=1, keepdims=True)
        if tau == 0.0:
            greedy = np.isclose(q, top, rtol=0.0, atol=1e-12).astype(np.float64)
            policy[t] = greedy / greedy.sum(axis=1, keepdims=True)
            return top[:, 0]
        weights = np.exp((q - top) / tau)
        total = weights.sum(axis=1, keepdims=True)
        policy[t] = weights / total
        return top[:, 0] + tau * np.log(total[:, 0])

    return _backward(kernels, alphas, gamma, acting), policy


@dataclass
class Evaluation:
    """A policy against its own flow: the flow, its tables, J, the best-response J, and the
    per-(t, o') exploitability ``gaps`` [H, O] = V*_t(o') - V^pi_t(o')."""

    mus: np.ndarray
    pis: np.ndarray
    value: float
    best_response_value: float
    gaps: np.ndarray

    @property
    def exploitability(self) -> float:
        """The mu_0-weighted summary J* - J."""
        return self.best_response_value - self.value

    @property
    def max_gap(self) -> float:
        """max_{t, o'} e_t(o'): 0 exactly at an equilibrium."""
        return float(self.gaps.max())


@dataclass
class MeanFieldModel:
    """The mean-field limit of an N-agent env: the game, the activation fraction(s) alpha
    (a number, or one per step for time-varying schedules), the horizon H in env steps, and
    the discount gamma per own action."""

    game: MeanFieldGame
    alpha: float | np.ndarray
    horizon: int
    gamma: float = 1.0

    @property
    def alphas(self) -> np.ndarray:
        return per_step(self.alpha, self.horizon)

    def flow(self, policy: PolicyFn, mu0: np.ndarray | None = None):
        """(mus [H+1, O], pis [H, O, A]) of ``policy``."""
        mus, pis, _ = flow_and_kernels(self.game, policy, self.alphas, mu0)
        return mus, pis

    def evaluate(self, policy: PolicyFn, entropy_coeff: float = 0.0) -> Evaluation:
        """J(pi; mu^pi), max_pi' J(pi'; mu^pi), exploitability per (t, o') and summary."""
        alphas = self.alphas
        mus, pis, kernels = flow_and_kernels(self.game, policy, alphas)
        own = policy_values(kernels, pis, alphas, self.gamma, entropy_coeff)
        best, _ = best_response(kernels, alphas, self.gamma, entropy_coeff)
        mu0 = mus[0]
        return Evaluation(mus=mus, pis=pis, value=float(mu0 @ own.agent[0]),
                          best_response_value=float(mu0 @ best.agent[0]),
                          gaps=best.active - own.active)

    def exploitability(self, policy: PolicyFn, entropy_coeff: float = 0.0) -> float:
        return self.evaluate(policy, entropy_coeff).exploitability


# ----------------------------------------------------------------------------- equilibrium


class NotConverged(RuntimeError):
    """The solver stopped above its tolerance: its point is not an equilibrium."""


@dataclass
class Equilibrium:
    """The solver's result: time-indexed ``tables`` [H, O, A], their exploitability (the
    summary E, on the game with the solver's entropy coefficient), whether it reached
    ``tol``, and the iterations used."""

    tables: np.ndarray
    exploitability: float
    converged: bool
    iterations: int
    tol: float

    def policy(self) -> PolicyFn:
        """The equilibrium policy; raises :class:`NotConverged` for a point above ``tol``
        (it is not an equilibrium, so its value is not an equilibrium value)."""
        if not self.converged:
            raise NotConverged(
                f"equilibrium solver stopped after {self.iterations} iterations with "
                f"exploitability {self.exploitability:.3g} > tol {self.tol:g}; raise "
                "max_iterations or lower learning_rate.")
        return time_indexed_policy(self.tables)


def solve_equilibrium(model: MeanFieldModel, entropy_coeff: float = 0.0, *,
                      tol: float = 1e-6, max_iterations: int = 20000,
                      learning_rate: float = 1.0) -> Equilibrium:
    """The time-indexed equilibrium by online mirror descent on policy tables (a reference
    solution for tests and benches; it is not TMF-PG): with pi_k the current tables and
    Q^k = Q^{pi_k} against the flow mu^{pi_k} (entropy-regularised for tau > 0),

        y_{k+1} = (1 - eta tau) y_k + eta Q^k,       pi_{k+1} = softmax(y_{k+1})

    (Perolat et al. 2022; converges in monotone games, to softmax(Q* / tau) for tau > 0).
    Stops when the exploitability E(pi_k) <= tol; otherwise reports converged = False."""
    game, alphas, gamma = model.game, model.alphas, model.gamma
    tau, eta = entropy_coeff, learning_rate
    logits = np.zeros((model.horizon, game.num_observations, game.num_actions))
    tables = np.full_like(logits, 1.0 / game.num_actions)
    gap = np.inf
    for iteration in range(1, max_iterations + 1):
        mus, _, kernels = flow_and_kernels(game, time_indexed_policy(tables), alphas)
        own = policy_values(kernels, tables, alphas, gamma, tau)
        best, _ = best_response(kernels, alphas, gamma, tau)
        gap = float(mus[0] @ (best.agent[0] - own.agent[0]))
        if gap <= tol:
            return Equilibrium(tables, gap, True, iteration, tol)
        logits = (1.0 - eta * tau) * logits + eta * own.q
        logits -= logits.max(axis=2, keepdims=True)
        tables = np.exp(logits)
        tables /= tables.sum(axis=2, keepdims=True)
    return Equilibrium(tables, gap, False, max_iterations, tol)
