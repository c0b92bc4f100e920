"""Dynamic queueing game (a congestion game in the TMF class; parameters are ours, see
``docs/tmf_pg.md``).

Q queues with service capacities s_q > 0. An agent is a customer: its observation is the
queue it is in and its own backlog, o = (q, b) with q in {0..Q-1}, b in {0..B}, flattened to
o = q * (B + 1) + b. Its action a in {0..Q-1} is the queue to be in next (a = q stays). The
load of queue q is the fraction of the population waiting in it with work,

    L_q(mu) = sum_{b >= 1} mu(q, b),

and every customer of queue q with work is served (its backlog drops by one) at rate

    nu_q(mu) = s_q / (s_q + L_q(mu))          per round,

so a queue shares its capacity s_q among its waiting customers (each at most at rate 1): the
more loaded, the slower. New work arrives at rate lam per round (backlog capped at B). Within
a queue the backlog is the continuous-time birth-death chain with generator G_q(mu)
(b -> b - 1 at nu_q, b -> b + 1 at lam); over an env step of dt rounds (``core.py``: dt = the
activation fraction) with the rates frozen at mu_t, the backlog moves by S_q(mu, dt) =
expm(G_q(mu) dt). Service and arrivals never stop: idle customers keep being served,

    P_0((q', b') | (q, b), mu)     = 1[q' = q] S_q(mu, dt)[b, b']
    P((q', b') | (q, b), a, mu)    = 1[q' = a] S_a(mu, dt)[b, b']    (move, then wait in a)

An acting customer pays for the queue it is in (the cost grows with that queue's load, so
the game is monotone in mu(o)):

    r((q, b), a, mu) = -( h * b  +  c * 1[b >= 1] * L_q(mu) / s_q  +  kappa * 1[a != q] )

holding (h per unit of backlog), congestion (c times the load-to-capacity ratio of its
queue) and switching (kappa). Costs are charged at the customer's decisions, once per round
in expectation under every schedule.

Env config keys (besides the common ones in ``env.py``), defaults in brackets:
    service_rates          s, a list of Q >= 2 capacities > 0     [0.5, 0.3, 0.2]
    arrival_rate           lam >= 0, per round                    [0.3]
    max_backlog            B >= 1                                 [3]
    holding_cost           h >= 0                                 [0.5]
    congestion_cost        c >= 0                                 [1.0]
    switching_cost         kappa >= 0                             [0.1]
    initial_distribution   mu_0 over the Q*(B+1) observations, "uniform_queues_steady"
                           (customers spread evenly over the queues, each queue's backlogs
                           in the steady state of its chain at that split, see
                           :func:`steady_backlogs`) or "uniform_queues" (evenly spread,
                           backlog 1)                       ["uniform_queues_steady"]

The steady start keeps the backlog transient out of the comparison between schedules: an
all-acting population pays its first costs at t = 0 on the initial backlogs, a sequential one
spreads its decisions over the first round, so a start far from steady state (backlog 1 for
everyone) weighs differently under the two (fixed policies then differ by ~12% in J).
"""

from __future__ import annotations

import numpy as np

from envs.mean_field.core import (
    MeanFieldGame,
    check_distribution,
    check_float,
    check_int,
    check_vector,
    config_error,
)
from envs.mean_field.env import MeanFieldEnv

DEFAULTS = {
    "service_rates": [0.5, 0.3, 0.2],
    "arrival_rate": 0.3,
    "max_backlog": 3,
    "holding_cost": 0.5,
    "congestion_cost": 1.0,
    "switching_cost": 0.1,
    "initial_distribution": "uniform_queues_steady",
}
INITIAL_DISTRIBUTIONS = ("uniform_queues_steady", "uniform_queues")


def backlog_generators(service_rates: np.ndarray, arrival_rate: float,
                       max_backlog: int) -> np.ndarray:
    """G_q ([Q, B+1, B+1]): the generator of one queue's backlog chain, with
    G_q[b, b-1] = nu_q (b >= 1), G_q[b, b+1] = lam (b < B) and rows summing to 0."""
    levels = max_backlog + 1
    generators = np.zeros((len(service_rates), levels, levels))
    down = np.arange(1, levels)
    generators[:, down, down - 1] = np.asarray(service_rates)[:, None]
    generators[:, down - 1, down] = arrival_rate
    generators -= np.eye(levels) * generators.sum(axis=2, keepdims=True)
    return generators


def uniformized_expm(generators: np.ndarray, dt: float, tail: float = 1e-15) -> np.ndarray:
    """expm(G dt) for a batch of generators G ([..., n, n], rows summing to 0) by
    uniformisation: with Lambda = max_i -G[i, i] and the stochastic matrix U = I + G / Lambda,

        expm(G dt) = sum_{k >= 0} e^{-Lambda dt} (Lambda dt)^k / k! * U^k,

    summed until the Poisson weights left are below ``tail``. Every term is non-negative, so
    the result is a stochastic matrix to rounding (no cancellation, unlike a Taylor series)."""
    rate = float(max(-np.diagonal(generators, axis1=-2, axis2=-1).min(), 1e-12))
    x = rate * dt
    step = np.eye(generators.shape[-1]) + generators / rate
    power = np.broadcast_to(np.eye(generators.shape[-1]), generators.shape).copy()
    weight = np.exp(-x)
    total, used = weight * power, weight
    k = 0
    while 1.0 - used > tail and k < 10_000:
        k += 1
        power = power @ step
        weight *= x / k
        total += weight * power
        used += weight
    return total


def steady_backlogs(service_rates: np.ndarray, arrival_rate: float, max_backlog: int,
                    split: np.ndarray, tol: float = 1e-13) -> np.ndarray:
    """mu(q, b) = split_q pi_q(b) ([Q, B+1]) with pi_q the stationary distribution of queue q's
    backlog chain at the loads of mu itself: by detailed balance
    pi_q(b) proportional to (lam / nu_q)^b, nu_q = s_q / (s_q + L_q), L_q = split_q (1 - pi_q(0));
    the loads are found by fixed-point iteration (a contraction here: nu_q in (0, 1])."""
    loads = np.zeros(len(service_rates))
    levels = np.arange(max_backlog + 1)
    for _ in range(10_000):
        rates = service_rates / (service_rates + loads)
        weights = (arrival_rate / rates[:, None]) ** levels
        stationary = weights / weights.sum(axis=1, keepdims=True)
        new_loads = split * (1.0 - stationary[:, 0])
        if np.abs(new_loads - loads).max() < tol:
            return split[:, None] * stationary
        loads = new_loads
    raise RuntimeError("steady_backlogs: the load iteration did not converge.")


class DynamicQueueingGame(MeanFieldGame):
    """See the module docstring for the costs and dynamics."""

    has_passive_moves = True

    def __init__(self, service_rates=DEFAULTS["service_rates"],
                 arrival_rate=DEFAULTS["arrival_rate"], max_backlog=DEFAULTS["max_backlog"],
                 holding_cost=DEFAULTS["holding_cost"],
                 congestion_cost=DEFAULTS["congestion_cost"],
                 switching_cost=DEFAULTS["switching_cost"],
                 initial_distribution=DEFAULTS["initial_distribution"]):
        self.service_rates = check_vector("service_rates", service_rates, positive=True,
                                          min_length=2)
        self.arrival_rate = check_float("arrival_rate", arrival_rate, low=0.0)
        self.max_backlog = check_int("max_backlog", max_backlog, low=1)
        self.holding_cost = check_float("holding_cost", holding_cost, low=0.0)
        self.congestion_cost = check_float("congestion_cost", congestion_cost, low=0.0)
        self.switching_cost = check_float("switching_cost", switching_cost, low=0.0)
        self.num_queues = len(self.service_rates)
        self.levels = self.max_backlog + 1
        self.num_observations = self.num_queues * self.levels
        self.num_actions = self.num_queues
        split = np.full(self.num_queues, 1.0 / self.num_queues)
        if isinstance(initial_distribution, str) and initial_distribution == "uniform_queues":
            mu0 = np.zeros((self.num_queues, self.levels))
            mu0[:, 1] = split
            self.initial_distribution = mu0.ravel()
        elif isinstance(initial_distribution, str) \
                and initial_distribution == "uniform_queues_steady":
            self.initial_distribution = steady_backlogs(
                self.service_rates, self.arrival_rate, self.max_backlog, split).ravel()
        elif isinstance(initial_distribution, str):
            raise config_error("initial_distribution", f"got {initial_distribution!r}",
                               f"use one of {', '.join(INITIAL_DISTRIBUTIONS)} or a list of "
                               f"{self.num_observations} probabilities.")
        else:
            self.initial_distribution = check_distribution(
                "initial_distribution", initial_distribution, self.num_observations)
        # Per observation: its queue and backlog.
        self.queue_of = np.repeat(np.arange(self.num_queues), self.levels)
        self.backlog_of = np.tile(np.arange(self.levels), self.num_queues)
        self._switch = self.switching_cost * (self.queue_of[:, None]
                                              != np.arange(self.num_actions))

    def loads(self, mu: np.ndarray) -> np.ndarray:
        """L_q(mu) = sum_{b >= 1} mu(q, b), shape [Q]."""
        return mu.reshape(self.num_queues, self.levels)[:, 1:].sum(axis=1)

    def service_rates_per_customer(self, mu: np.ndarray) -> np.ndarray:
        """nu_q(mu) = s_q / (s_q + L_q(mu)), shape [Q]."""
        return self.service_rates / (self.service_rates + self.loads(mu))

    def backlog_kernels(self, mu: np.ndarray, dt: float) -> np.ndarray:
        """S_q(mu, dt) = expm(G_q(mu) dt), shape [Q, B+1, B+1]."""
        generators = backlog_generators(self.service_rates_per_customer(mu),
                                        self.arrival_rate, self.max_backlog)
        return uniformized_expm(generators, dt)

    def rewards(self, mu: np.ndarray) -> np.ndarray:
        waiting = (self.backlog_of >= 1).astype(np.float64)
        congestion = self.congestion_cost * (self.loads(mu) / self.service_rates)[self.queue_of]
        return -(self.holding_cost * self.backlog_of + waiting * congestion)[:, None] \
            - self._switch

    def transitions(self, mu: np.ndarray, dt: float = 1.0) -> np.ndarray:
        return self._active_kernel(self.backlog_kernels(mu, dt))

    def passive_transitions(self, mu: np.ndarray, dt: float = 1.0) -> np.ndarray:
        return self._passive_kernel(self.backlog_kernels(mu, dt))

    def step_tables(self, mu: np.ndarray, dt: float = 1.0):
        kernels = self.backlog_kernels(mu, dt)
        return self.rewards(mu), self._active_kernel(kernels), self._passive_kernel(kernels)

    def _active_kernel(self, kernels: np.ndarray) -> np.ndarray:
        """[O, A, O] = [(q, b), a, (a', b')]: 1[a' = a] S_a[b, b'] for every q."""
        moved = np.einsum("ac,abd->bacd", np.eye(self.num_queues), kernels)
        moved = moved.reshape(self.levels, self.num_actions, self.num_observations)
        return moved[self.backlog_of]

    def _passive_kernel(self, kernels: np.ndarray) -> np.ndarray:
        """[O, O]: 1[q' = q] S_q[b, b'] (block-diagonal over queues)."""
        passive = np.zeros((self.num_observations, self.num_observations))
        for q in range(self.num_queues):
            block = slice(q * self.levels, (q + 1) * self.levels)
            passive[block, block] = kernels[q]
        return passive

    def observation_labels(self) -> list[str]:
        return [f"queue {q}, backlog {b}" for q, b in zip(self.queue_of, self.backlog_of)]


class DynamicQueueingEnv(MeanFieldEnv):
    """RLlib MultiAgentEnv of the dynamic queueing game (see the module docstring)."""

    game_class = DynamicQueueingGame
    game_defaults = DEFAULTS
