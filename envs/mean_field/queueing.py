"""Dynamic queueing game.

Q queues with service rates s_q > 0. An agent is a customer: its observation is the queue
it is in and its own backlog level, o = (q, b) with q in {0..Q-1}, b in {0..B}, flattened to
o = q * (B + 1) + b. Its action a in {0..Q-1} is the queue to be in for the step (a = q
stays). The load of queue q is the fraction of the population waiting in it with work,

    L_q(mu) = sum_{b >= 1} mu(q, b),

and a waiting customer of queue q is served (its backlog drops by one) with probability

    sigma_q(mu) = s_q / (s_q + L_q(mu))

so an empty queue serves at once and a queue loaded to L_q = s_q serves half its customers
per step: queues drain over time, the slower the more loaded they are. New work arrives with
probability lam per acting step (backlog capped at B). For an acting agent at (q, b):

    r((q, b), a, mu) = -( h * b  +  c * 1[b >= 1] * L_a(mu) / s_a  +  kappa * 1[a != q] )

    next queue q' = a; next backlog b' = min(B, max(0, b - served) + arrived),
    served ~ Bernoulli(sigma_a(mu)) if b >= 1 else 0,   arrived ~ Bernoulli(lam).

The three costs are holding (h per unit of backlog), congestion (c times the load-to-rate
ratio of the queue waited in) and switching (kappa). The game is Lipschitz in mu.

Env config keys (besides the common ones in ``env.py``), defaults in brackets:
    service_rates          s, a list of Q >= 2 numbers > 0    [0.5, 0.3, 0.2]
    arrival_prob           lam in [0, 1]                      [0.3]
    max_backlog            B >= 1                             [3]
    holding_cost           h >= 0                             [0.5]
    congestion_cost        c >= 0                             [1.0]
    switching_cost         kappa >= 0                         [0.1]
    initial_distribution   mu_0 over the Q*(B+1) observations, or "uniform_queues"
                           (uniform over queues, backlog 1)    ["uniform_queues"]
"""

from __future__ import annotations

import numpy as np

from envs.mean_field.core import (
    MeanFieldGame,
    check_distribution,
    check_float,
    check_int,
    check_vector,
)
from envs.mean_field.env import MeanFieldEnv

DEFAULTS = {
    "service_rates": [0.5, 0.3, 0.2],
    "arrival_prob": 0.3,
    "max_backlog": 3,
    "holding_cost": 0.5,
    "congestion_cost": 1.0,
    "switching_cost": 0.1,
    "initial_distribution": "uniform_queues",
}


class DynamicQueueingGame(MeanFieldGame):
    """See the module docstring for the costs and dynamics."""

    def __init__(self, service_rates=DEFAULTS["service_rates"],
                 arrival_prob=DEFAULTS["arrival_prob"], max_backlog=DEFAULTS["max_backlog"],
                 holding_cost=DEFAULTS["holding_cost"],
                 congestion_cost=DEFAULTS["congestion_cost"],
                 switching_cost=DEFAULTS["switching_cost"],
                 initial_distribution=DEFAULTS["initial_distribution"]):
        self.service_rates = check_vector("service_rates", service_rates, positive=True,
                                          min_length=2)
        self.arrival_prob = check_float("arrival_prob", arrival_prob, low=0.0, high=1.0)
        self.max_backlog = check_int("max_backlog", max_backlog, low=1)
        self.holding_cost = check_float("holding_cost", holding_cost, low=0.0)
        self.congestion_cost = check_float("congestion_cost", congestion_cost, low=0.0)
        self.switching_cost = check_float("switching_cost", switching_cost, low=0.0)
        self.num_queues = len(self.service_rates)
        self.levels = self.max_backlog + 1
        self.num_observations = self.num_queues * self.levels
        self.num_actions = self.num_queues
        if isinstance(initial_distribution, str) and initial_distribution == "uniform_queues":
            mu0 = np.zeros((self.num_queues, self.levels))
            mu0[:, 1] = 1.0 / self.num_queues
            self.initial_distribution = mu0.ravel()
        else:
            self.initial_distribution = check_distribution(
                "initial_distribution", initial_distribution, self.num_observations)
        # Per observation: its queue and backlog.
        self.queue_of = np.repeat(np.arange(self.num_queues), self.levels)
        self.backlog_of = np.tile(np.arange(self.levels), self.num_queues)
        # Index grids for the kernel: destination observation (a, clip(b + change)) per
        # (o, a) for the backlog changes -1, 0, +1.
        self._rows, self._actions = np.meshgrid(np.arange(self.num_observations),
                                                np.arange(self.num_actions), indexing="ij")
        self._destinations = [
            self._actions * self.levels
            + np.clip(self.backlog_of[:, None] + change, 0, self.max_backlog)
            for change in (-1, 0, 1)]

    def loads(self, mu: np.ndarray) -> np.ndarray:
        """L_q(mu) = sum_{b >= 1} mu(q, b), shape [Q]."""
        return mu.reshape(self.num_queues, self.levels)[:, 1:].sum(axis=1)

    def service_probs(self, mu: np.ndarray) -> np.ndarray:
        """sigma_q(mu) = s_q / (s_q + L_q(mu)), shape [Q]."""
        return self.service_rates / (self.service_rates + self.loads(mu))

    def rewards(self, mu: np.ndarray) -> np.ndarray:
        waiting = (self.backlog_of >= 1).astype(np.float64)
        congestion = self.congestion_cost * self.loads(mu) / self.service_rates     # [A]
        switch = self.switching_cost * (self.queue_of[:, None] != np.arange(self.num_actions))
        return -(self.holding_cost * self.backlog_of[:, None]
                 + waiting[:, None] * congestion[None, :] + switch)

    def transitions(self, mu: np.ndarray) -> np.ndarray:
        lam = self.arrival_prob
        served = np.where(self.backlog_of[:, None] >= 1, self.service_probs(mu)[None, :], 0.0)
        # Probability of each backlog change -1, 0, +1 for every (o, a): [O, A].
        down = served * (1 - lam)
        up = (1 - served) * lam
        kernel = np.zeros((self.num_observations, self.num_actions, self.num_observations))
        for destination, prob in zip(self._destinations, (down, 1.0 - down - up, up)):
            # One destination per (o, a) and change: no repeated index within one `+=`.
            kernel[self._rows, self._actions, destination] += prob
        return kernel

    def observation_labels(self) -> list[str]:
        return [f"queue {q}, backlog {b}" for q, b in zip(self.queue_of, self.backlog_of)]


class DynamicQueueingEnv(MeanFieldEnv):
    """RLlib MultiAgentEnv of the dynamic queueing game (see the module docstring)."""

    game_class = DynamicQueueingGame
    game_defaults = DEFAULTS
