"""Shared pieces of the mean-field games: the game interface, activation schedules, the
vectorised N-agent simulator core, and parameter checking.

Working model (TMF, "Mean-Field Reinforcement Learning without Synchrony"; see
``shared/design/TMF.md``). N exchangeable agents have observations o in {0..O-1} and actions
a in {0..A-1}. At env step t a set S_t of agents acts; every other agent is idle: it keeps
its observation and gets no reward. An acting agent at o draws a ~ pi(. | o, mu_t), receives

    r(o, a, mu_t)            and moves to    o' ~ P(. | o, a, mu_t),

where mu_t(o) = #{i : o_i = o} / N is the population distribution over observations. A game
supplies the two tables ``rewards(mu) -> [O, A]`` and ``transitions(mu) -> [O, A, O]``; the
simulator below, the RLlib env (``env.py``) and the exact mean-field model (``model.py``) all
read the game only through them, so the N-agent env and the mean-field limit cannot drift
apart.

Activation schedules (env config key ``activation``), with their activation fraction
alpha = E|S_t| / N:

    "all"            every agent acts at every step                 alpha = 1
    "k=<int>"        k agents drawn uniformly without replacement  alpha = k / N
    "bernoulli=<p>"  each agent independently with probability p   alpha = p
    "sequential"     one agent drawn uniformly at random           alpha = 1 / N

Under every schedule each agent acts with probability alpha at each step, which is what the
representative agent of the mean-field model assumes.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from envs.validation import config_error


class MeanFieldGame:
    """A finite mean-field game: ``num_observations`` O, ``num_actions`` A, an initial
    distribution mu_0 over observations, and the mu-dependent reward and transition tables.

    Subclasses set the three attributes and implement :meth:`rewards` and
    :meth:`transitions`; both must accept any distribution ``mu`` (shape [O], entries >= 0,
    summing to 1) and be Lipschitz in it.
    """

    num_observations: int
    num_actions: int
    initial_distribution: np.ndarray

    def rewards(self, mu: np.ndarray) -> np.ndarray:
        """r(o, a, mu) as an [O, A] array."""
        raise NotImplementedError

    def transitions(self, mu: np.ndarray) -> np.ndarray:
        """P(o' | o, a, mu) as an [O, A, O] array (rows sum to 1)."""
        raise NotImplementedError

    def observation_labels(self) -> list[str]:
        """Human-readable names of the observations (for tables and plots)."""
        return [str(o) for o in range(self.num_observations)]


class TypedGame(MeanFieldGame):
    """The game seen by K agent types that may follow different policies.

    Extended observations are pairs (k, o) flattened to k * O + o; a type never changes.
    Rewards and transitions depend on the population only through the marginal over
    observations, mu(o) = sum_k mu_ext(k, o), so

        r_ext((k, o), a, mu_ext)              = r(o, a, mu)
        P_ext((k', o') | (k, o), a, mu_ext)   = 1[k' = k] P(o' | o, a, mu)
        mu_ext_0(k, o)                        = w_k mu_0(o)

    with w_k the fraction of agents of type k. With K = 1 this is the game itself.
    """

    def __init__(self, game: MeanFieldGame, type_weights: Sequence[float]):
        weights = np.asarray(type_weights, dtype=np.float64)
        if weights.ndim != 1 or len(weights) == 0 or np.any(weights < 0) \
                or not math.isclose(weights.sum(), 1.0, abs_tol=1e-9):
            raise ValueError(f"type_weights must be a non-empty probability vector, got "
                             f"{list(type_weights)}.")
        self.game = game
        self.type_weights = weights
        self.num_types = len(weights)
        self.num_observations = self.num_types * game.num_observations
        self.num_actions = game.num_actions
        self.initial_distribution = np.outer(weights, game.initial_distribution).ravel()

    def marginal(self, mu_ext: np.ndarray) -> np.ndarray:
        """mu(o) = sum_k mu_ext(k, o)."""
        return mu_ext.reshape(self.num_types, self.game.num_observations).sum(axis=0)

    def rewards(self, mu_ext: np.ndarray) -> np.ndarray:
        return np.tile(self.game.rewards(self.marginal(mu_ext)), (self.num_types, 1))

    def transitions(self, mu_ext: np.ndarray) -> np.ndarray:
        kernel = self.game.transitions(self.marginal(mu_ext))
        eye = np.eye(self.num_types)
        # [K, O, A, K, O]: block-diagonal over types.
        lifted = np.einsum("kl,oap->koalp", eye, kernel)
        n = self.num_observations
        return lifted.reshape(n, self.num_actions, n)


# ----------------------------------------------------------------------------- parameters


def check_int(key: str, value, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low \
            or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise config_error(key, f"got {value!r}", f"use an integer {bound}.")
    return int(value)


def check_float(key: str, value, *, low: float, high: float | None = None,
                low_open: bool = False) -> float:
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool) \
        and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        lo = f"> {low}" if low_open else f">= {low}"
        bound = lo if high is None else f"{lo} and <= {high}"
        raise config_error(key, f"got {value!r}", f"use a finite number {bound}.")
    return float(value)


def check_vector(key: str, value, *, length: int | None = None, positive: bool = False,
                 min_length: int = 1) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.ndim != 1 or len(array) < min_length \
            or not np.all(np.isfinite(array)):
        raise config_error(key, f"got {value!r}",
                           f"use a list of at least {min_length} finite numbers.")
    if length is not None and len(array) != length:
        raise config_error(key, f"has {len(array)} entries", f"give exactly {length}.")
    if positive and np.any(array <= 0):
        raise config_error(key, f"got {value!r}", "all entries must be > 0.")
    return array


def check_distribution(key: str, value, size: int) -> np.ndarray:
    array = check_vector(key, value, length=size)
    if np.any(array < 0) or not math.isclose(array.sum(), 1.0, abs_tol=1e-6):
        raise config_error(key, f"got {value!r}",
                           f"use {size} non-negative numbers that sum to 1.")
    return array / array.sum()


# ----------------------------------------------------------------------------- activation


@dataclass(frozen=True)
class Activation:
    """An activation schedule: which agents act at one env step."""

    kind: str  # "all", "k", "bernoulli", "sequential"
    num_agents: int
    k: int | None = None
    p: float | None = None

    @property
    def fraction(self) -> float:
        """alpha = E|S_t| / N, the probability that a given agent acts at a given step."""
        if self.kind == "all":
            return 1.0
        if self.kind == "k":
            return self.k / self.num_agents
        if self.kind == "bernoulli":
            return self.p
        return 1.0 / self.num_agents

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """Indices (sorted, int64) of the agents that act at one step."""
        n = self.num_agents
        if self.kind == "all":
            return np.arange(n)
        if self.kind == "k":
            return np.sort(rng.choice(n, size=self.k, replace=False))
        if self.kind == "bernoulli":
            return np.flatnonzero(rng.random(n) < self.p)
        return np.array([rng.integers(n)])

    def __str__(self) -> str:
        if self.kind == "k":
            return f"k={self.k}"
        if self.kind == "bernoulli":
            return f"bernoulli={self.p:g}"
        return self.kind


_ACTIVATION_PATTERN = re.compile(r"^\s*(all|sequential|k|bernoulli)\s*(?:=\s*(\S+))?\s*$")


def parse_activation(spec, num_agents: int) -> Activation:
    """Parse the ``activation`` env-config value ("all", "sequential", "k=<int>",
    "bernoulli=<p>") for a population of ``num_agents``."""
    fix = ('use "all", "sequential", "k=<int in [1, num_agents]>" or '
           '"bernoulli=<p in (0, 1]>", e.g. "k=10".')
    match = _ACTIVATION_PATTERN.match(spec) if isinstance(spec, str) else None
    if match is None:
        raise config_error("activation", f"got {spec!r}", fix)
    kind, arg = match.groups()
    if kind in ("all", "sequential"):
        if arg is not None:
            raise config_error("activation", f"'{kind}' takes no parameter (got {spec!r})", fix)
        return Activation(kind, num_agents)
    if arg is None:
        raise config_error("activation", f"'{kind}' needs a parameter (got {spec!r})", fix)
    if kind == "k":
        try:
            k = int(arg)
        except ValueError:
            k = None
        if k is None or not 1 <= k <= num_agents:
            raise config_error("activation", f"k must be an integer in [1, num_agents="
                                             f"{num_agents}], got {arg!r}", fix)
        return Activation("k", num_agents, k=k)
    try:
        p = float(arg)
    except ValueError:
        p = math.nan
    if not 0.0 < p <= 1.0:
        raise config_error("activation", f"p must be in (0, 1], got {arg!r}", fix)
    return Activation("bernoulli", num_agents, p=p)


def horizon_for(rounds: float, activation: Activation) -> int:
    """Env steps H of an episode in which each agent acts ``rounds`` times in expectation:
    H = round(rounds / alpha) (at least 1)."""
    return max(1, int(round(rounds / activation.fraction)))


# ----------------------------------------------------------------------------- simulation


def sample_categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of ``probs`` ([n, K], rows sum to 1) by inverting the row CDFs."""
    cdf = np.cumsum(probs, axis=1)
    u = rng.random((probs.shape[0], 1)) * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=1), probs.shape[1] - 1)


class PopulationSimulator:
    """The vectorised N-agent core of a mean-field game (no per-agent Python loop).

    State: ``observations`` (int array [N]) and ``counts`` (agents per observation). One
    :meth:`step` takes the acting agents' indices and actions as arrays, pays
    r(o_i, a_i, mu_t) and samples o_i' ~ P(. | o_i, a_i, mu_t) for all of them at once, with
    mu_t the distribution *before* the step. Idle agents are untouched. ``mu_history[t]`` is
    the empirical mu_t of the current episode.
    """

    def __init__(self, game: MeanFieldGame, num_agents: int, activation: Activation,
                 horizon: int, seed: int | None = None):
        self.game = game
        self.num_agents = num_agents
        self.activation = activation
        self.horizon = horizon
        self.rng = np.random.default_rng(seed)
        self.observations = np.zeros(num_agents, dtype=np.int64)
        self.counts = np.zeros(game.num_observations, dtype=np.int64)
        self.mu_history = np.zeros((horizon + 1, game.num_observations))
        self.t = 0

    def seed(self, seed: int | None) -> None:
        self.rng = np.random.default_rng(seed)

    @property
    def mu(self) -> np.ndarray:
        """The empirical distribution over observations, mu(o) = #{i : o_i = o} / N
        (= ``mu_history[t]``; do not modify)."""
        return self.mu_history[self.t]

    def reset(self) -> None:
        """Draw every agent's observation i.i.d. from mu_0 and restart the clock."""
        probs = np.broadcast_to(self.game.initial_distribution,
                                (self.num_agents, self.game.num_observations))
        self.observations = sample_categorical(self.rng, probs)
        self.counts = np.bincount(self.observations, minlength=self.game.num_observations)
        self.t = 0
        self.mu_history[0] = self.counts / self.num_agents

    def sample_active(self) -> np.ndarray:
        return self.activation.sample(self.rng)

    def sample_actions(self, policy: np.ndarray, agents: np.ndarray) -> np.ndarray:
        """Actions of ``agents`` drawn from a policy table pi(a | o) ([O, A])."""
        return sample_categorical(self.rng, policy[self.observations[agents]])

    def step(self, agents: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Advance one env step in which ``agents`` act with ``actions``; returns their
        rewards (float array aligned with ``agents``)."""
        if self.t >= self.horizon:
            raise RuntimeError("the episode is over (t == horizon); call reset() first.")
        mu = self.mu
        old = self.observations[agents]
        rewards = self.game.rewards(mu)[old, actions]
        new = sample_categorical(self.rng, self.game.transitions(mu)[old, actions])
        self.observations[agents] = new
        size = self.game.num_observations
        self.counts += np.bincount(new, minlength=size) - np.bincount(old, minlength=size)
        self.t += 1
        self.mu_history[self.t] = self.counts / self.num_agents
        return rewards

    def observation_matrix(self, agents: np.ndarray, with_mu: bool) -> np.ndarray:
        """The observations of ``agents`` as :func:`encode_observations` writes them."""
        return encode_observations(self.observations[agents], self.mu, with_mu)


@functools.cache
def _identity(size: int) -> np.ndarray:
    return np.eye(size, dtype=np.float32)


def encode_observations(observations: np.ndarray, mu: np.ndarray, with_mu: bool) -> np.ndarray:
    """float32 [n, O] one-hot rows of ``observations``, followed by mu (-> [n, 2 O]) when
    ``with_mu``: the vector an acting agent sees, [onehot(o_i), mu_t]."""
    size = len(mu)
    onehot = _identity(size)[observations]
    if not with_mu:
        return onehot
    return np.concatenate(
        [onehot, np.broadcast_to(mu.astype(np.float32), (len(observations), size))], axis=1)
