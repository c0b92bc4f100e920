"""Shared pieces of the mean-field games: the game interface, activation schedules, the
vectorised N-agent simulator core, and parameter checking.

Model (TMF, "Mean-Field Reinforcement Learning without Synchrony", arXiv 2602.18026; the flow,
the active/passive split and the value are the paper author's, the time scale is ours; see
``docs/tmf_pg.md``). N exchangeable agents have observations o in {0..O-1} and actions
a in {0..A-1}. At env step t a set S_t of B_t agents acts. An acting agent at o draws
a ~ pi(. | o, mu_t), receives r(o, a, mu_t) and moves to o' ~ P(. | o, a, mu_t); every other
agent is passive: it gets no reward and moves to o' ~ P_0(. | o, mu_t) (P_0 = identity in
games where idle agents stay put; in the queueing game their queue keeps serving and work
keeps arriving). mu_t(o) = #{i : o_i = o} / N is the population distribution.

Time: one *round* is the time in which each agent acts once in expectation, so an env step
lasts dt_t = alpha_t = E[B_t] / N rounds (1 with all agents acting, 1/N with one). Games with
physical dynamics (queues) evolve at rates per round, so the same game is played under every
schedule; only who decides when changes. A game supplies ``rewards(mu) -> [O, A]``,
``transitions(mu, dt) -> [O, A, O]`` and ``passive_transitions(mu, dt) -> [O, O]``; the
simulator below, the RLlib env (``env.py``) and the exact model (``model.py``) read the game
only through them, so the N-agent env and the mean-field limit cannot drift apart.

Activation schedules (env config key ``activation``), with the activation fraction
alpha_t = E|S_t| / N of step t:

    "all"                every agent acts at every step                 alpha_t = 1
    "k=<int>"            k agents drawn uniformly without replacement  alpha_t = k / N
    "bernoulli=<p>"      each agent independently with probability p   alpha_t = p
    "sequential"         one agent drawn uniformly at random           alpha_t = 1 / N
    "cycle=<k0>,<k1>,.." B_t = k_{t mod L} agents, uniformly without   alpha_t = k_{t mod L} / N
                         replacement (time-varying batch sizes)

Under every schedule each agent acts with probability alpha_t at step t, which is what the
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
    :meth:`transitions` (and :meth:`passive_transitions` with ``has_passive_moves = True``
    when idle agents move); all must accept any distribution ``mu`` (shape [O], entries
    >= 0, summing to 1) and be Lipschitz in it. ``dt`` is the duration of the env step in
    rounds (see the module docstring).
    """

    num_observations: int
    num_actions: int
    initial_distribution: np.ndarray
    #: False: P_0 is the identity (idle agents keep their observation).
    has_passive_moves: bool = False

    def rewards(self, mu: np.ndarray) -> np.ndarray:
        """r(o, a, mu) as an [O, A] array: the reward of an agent that acts at o."""
        raise NotImplementedError

    def transitions(self, mu: np.ndarray, dt: float = 1.0) -> np.ndarray:
        """P(o' | o, a, mu) of an acting agent over a step of ``dt`` rounds, [O, A, O]."""
        raise NotImplementedError

    def passive_transitions(self, mu: np.ndarray, dt: float = 1.0) -> np.ndarray:
        """P_0(o' | o, mu) of an idle agent over a step of ``dt`` rounds, [O, O]
        (the identity unless the game overrides it)."""
        return np.eye(self.num_observations)

    def step_tables(self, mu: np.ndarray, dt: float = 1.0):
        """(rewards(mu), transitions(mu, dt), passive_transitions(mu, dt)) at once (a game
        whose two kernels share work overrides this)."""
        return self.rewards(mu), self.transitions(mu, dt), self.passive_transitions(mu, dt)

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
        P0_ext((k', o') | (k, o), mu_ext)     = 1[k' = k] P_0(o' | o, mu)
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
        self.has_passive_moves = game.has_passive_moves

    def marginal(self, mu_ext: np.ndarray) -> np.ndarray:
        """mu(o) = sum_k mu_ext(k, o)."""
        return mu_ext.reshape(self.num_types, self.game.num_observations).sum(axis=0)

    def rewards(self, mu_ext: np.ndarray) -> np.ndarray:
        return np.tile(self.game.rewards(self.marginal(mu_ext)), (self.num_types, 1))

    def transitions(self, mu_ext: np.ndarray, dt: float = 1.0) -> np.ndarray:
        kernel = self.game.transitions(self.marginal(mu_ext), dt)
        # [K, O, A, K, O]: block-diagonal over types.
        lifted = np.einsum("kl,oap->koalp", np.eye(self.num_types), kernel)
        n = self.num_observations
        return lifted.reshape(n, self.num_actions, n)

    def passive_transitions(self, mu_ext: np.ndarray, dt: float = 1.0) -> np.ndarray:
        return np.kron(np.eye(self.num_types),
                       self.game.passive_transitions(self.marginal(mu_ext), dt))


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
    """An activation schedule: which agents act at each env step."""

    kind: str  # "all", "k", "bernoulli", "sequential", "cycle"
    num_agents: int
    k: int | None = None
    p: float | None = None
    cycle: tuple[int, ...] = ()

    def fraction_at(self, t: int) -> float:
        """alpha_t = E|S_t| / N, the probability that a given agent acts at step t."""
        if self.kind == "all":
            return 1.0
        if self.kind == "k":
            return self.k / self.num_agents
        if self.kind == "bernoulli":
            return self.p
        if self.kind == "cycle":
            return self.cycle[t % len(self.cycle)] / self.num_agents
        return 1.0 / self.num_agents

    @property
    def fraction(self) -> float:
        """The mean activation fraction (over one cycle for ``cycle``)."""
        if self.kind == "cycle":
            return sum(self.cycle) / (len(self.cycle) * self.num_agents)
        return self.fraction_at(0)

    def fractions(self, horizon: int) -> np.ndarray:
        """alpha_0 .. alpha_{H-1} ([H])."""
        return np.array([self.fraction_at(t) for t in range(horizon)])

    def sample(self, rng: np.random.Generator, t: int = 0) -> np.ndarray:
        """Indices (sorted, int64) of the agents that act at step t."""
        n = self.num_agents
        if self.kind == "all":
            return np.arange(n)
        if self.kind in ("k", "cycle"):
            size = self.k if self.kind == "k" else self.cycle[t % len(self.cycle)]
            return np.sort(rng.choice(n, size=size, replace=False))
        if self.kind == "bernoulli":
            return np.flatnonzero(rng.random(n) < self.p)
        return np.array([rng.integers(n)])

    def __str__(self) -> str:
        if self.kind == "k":
            return f"k={self.k}"
        if self.kind == "bernoulli":
            return f"bernoulli={self.p:g}"
        if self.kind == "cycle":
            return "cycle=" + ",".join(map(str, self.cycle))
        return self.kind


_ACTIVATION_PATTERN = re.compile(
    r"^\s*(all|sequential|k|bernoulli|cycle)\s*(?:=\s*(\S+))?\s*$")


def parse_activation(spec, num_agents: int) -> Activation:
    """Parse the ``activation`` env-config value ("all", "sequential", "k=<int>",
    "bernoulli=<p>", "cycle=<k0>,<k1>,...") for a population of ``num_agents``."""
    fix = ('use "all", "sequential", "k=<int in [1, num_agents]>", '
           '"bernoulli=<p in (0, 1]>" or "cycle=<k0>,<k1>,..." (ints in [1, num_agents]), '
           'e.g. "k=10".')
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
    if kind in ("k", "cycle"):
        try:
            sizes = tuple(int(part) for part in arg.split(","))
        except ValueError:
            sizes = ()
        if not sizes or (kind == "k" and len(sizes) != 1) \
                or not all(1 <= size <= num_agents for size in sizes):
            what = "k must be an integer" if kind == "k" else "cycle must be integers"
            raise config_error("activation", f"{what} in [1, num_agents={num_agents}], got "
                                             f"{arg!r}", fix)
        if kind == "k":
            return Activation("k", num_agents, k=sizes[0])
        return Activation("cycle", num_agents, cycle=sizes)
    try:
        p = float(arg)
    except ValueError:
        p = math.nan
    if not 0.0 < p <= 1.0:
        raise config_error("activation", f"p must be in (0, 1], got {arg!r}", fix)
    return Activation("bernoulli", num_agents, p=p)


def horizon_for(rounds: float, activation: Activation) -> int:
    """Env steps H of an episode in which each agent acts ``rounds`` times in expectation:
    H = round(rounds / alpha) with alpha the mean activation fraction (at least 1)."""
    return max(1, int(round(rounds / activation.fraction)))


# ----------------------------------------------------------------------------- simulation


def sample_categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of ``probs`` ([n, K], rows sum to 1) by inverting the row CDFs."""
    cdf = np.cumsum(probs, axis=1)
    u = rng.random((probs.shape[0], 1)) * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=1), probs.shape[1] - 1)


def sample_passive_moves(rng: np.random.Generator, passive: np.ndarray,
                         observations: np.ndarray) -> np.ndarray:
    """New observations of idle agents at ``observations`` under P_0 (``passive``, [O, O]).

    Same law as one categorical draw per agent from P_0(. | o), drawn in two stages because
    P_0 is close to the identity over short steps: an agent moves with probability
    1 - P_0(o | o), and a mover draws its destination from P_0(. | o) without the diagonal,
    renormalised. Only the movers pay for a categorical draw."""
    stay = np.diagonal(passive)
    moving = np.flatnonzero(rng.random(len(observations)) >= stay[observations])
    if len(moving) == 0:
        return observations
    off_diagonal = passive - np.diag(stay)
    new = observations.copy()
    new[moving] = sample_categorical(rng, off_diagonal[observations[moving]])
    return new


class PopulationSimulator:
    """The vectorised N-agent core of a mean-field game (no per-agent Python loop).

    State: ``observations`` (int array [N]) and ``counts`` (agents per observation). One
    :meth:`step` at env step t takes the acting agents' indices and actions as arrays, pays
    r(o_i, a_i, mu_t), samples o_i' ~ P(. | o_i, a_i, mu_t) for them and o_j' ~ P_0(. | o_j,
    mu_t) for every idle agent j, all at once; mu_t is the distribution *before* the step and
    the step lasts dt_t = alpha_t rounds. ``mu_history[t]`` is the empirical mu_t of the
    current episode.

    Frozen mean field (:meth:`freeze`): given a flow mu-hat_0..mu-hat_H, rewards, transitions
    and the mu in observations use mu-hat_t instead of the empirical mu_t. The N agents are
    then N independent copies of the representative agent against the fixed flow (the inner
    problem of TMF-PG); ``mu_history`` still records where they actually are.
    """

    def __init__(self, game: MeanFieldGame, num_agents: int, activation: Activation,
                 horizon: int, seed: int | None = None):
        self.game = game
        self.num_agents = num_agents
        self.activation = activation
        self.horizon = horizon
        self.step_durations = activation.fractions(horizon)
        self.rng = np.random.default_rng(seed)
        self.observations = np.zeros(num_agents, dtype=np.int64)
        self.counts = np.zeros(game.num_observations, dtype=np.int64)
        self.mu_history = np.zeros((horizon + 1, game.num_observations))
        self.frozen_flow: np.ndarray | None = None
        self.t = 0

    def seed(self, seed: int | None) -> None:
        self.rng = np.random.default_rng(seed)

    def freeze(self, flow: np.ndarray | None) -> None:
        """Play against the fixed flow ``flow`` ([H+1, O]) from now on; None: against the
        population's own empirical mu again."""
        if flow is not None:
            flow = np.asarray(flow, dtype=np.float64)
            expected = (self.horizon + 1, self.game.num_observations)
            if flow.shape != expected:
                raise ValueError(f"frozen flow: shape {flow.shape}, expected {expected} "
                                 "(horizon + 1 steps, one column per observation).")
        self.frozen_flow = flow

    @property
    def mu(self) -> np.ndarray:
        """The empirical distribution over observations, mu(o) = #{i : o_i = o} / N
        (= ``mu_history[t]``; do not modify)."""
        return self.mu_history[self.t]

    @property
    def mean_field(self) -> np.ndarray:
        """The distribution the agents interact with at this step: the empirical mu_t, or
        mu-hat_t when frozen (do not modify)."""
        return self.mu if self.frozen_flow is None else self.frozen_flow[self.t]

    def reset(self) -> None:
        """Draw every agent's observation i.i.d. from mu_0 and restart the clock."""
        probs = np.broadcast_to(self.game.initial_distribution,
                                (self.num_agents, self.game.num_observations))
        self.observations = sample_categorical(self.rng, probs)
        self.counts = np.bincount(self.observations, minlength=self.game.num_observations)
        self.t = 0
        self.mu_history[0] = self.counts / self.num_agents

    def sample_active(self) -> np.ndarray:
        return self.activation.sample(self.rng, self.t)

    def sample_actions(self, policy: np.ndarray, agents: np.ndarray) -> np.ndarray:
        """Actions of ``agents`` drawn from a policy table pi(a | o) ([O, A])."""
        return sample_categorical(self.rng, policy[self.observations[agents]])

    def step(self, agents: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Advance one env step in which ``agents`` act with ``actions`` and every other agent
        moves by P_0; returns the acting agents' rewards (aligned with ``agents``)."""
        if self.t >= self.horizon:
            raise RuntimeError("the episode is over (t == horizon); call reset() first.")
        game = self.game
        reward_table, active, passive = game.step_tables(self.mean_field,
                                                         self.step_durations[self.t])
        size = game.num_observations
        old = self.observations[agents]
        rewards = reward_table[old, actions]
        new = sample_categorical(self.rng, active[old, actions])
        if game.has_passive_moves:
            idle = np.ones(self.num_agents, dtype=bool)
            idle[agents] = False
            idle = np.flatnonzero(idle)
            self.observations[idle] = sample_passive_moves(self.rng, passive,
                                                           self.observations[idle])
            self.observations[agents] = new
            self.counts = np.bincount(self.observations, minlength=size)
        else:  # only the acting agents move: O(|S_t|) bookkeeping
            self.observations[agents] = new
            self.counts += np.bincount(new, minlength=size) - np.bincount(old, minlength=size)
        self.t += 1
        self.mu_history[self.t] = self.counts / self.num_agents
        return rewards

    def observation_matrix(self, agents: np.ndarray, mu_scale: float | None) -> np.ndarray:
        """The observations of ``agents`` as :func:`encode_observations` writes them."""
        return encode_observations(self.observations[agents], self.mean_field, mu_scale)


@functools.cache
def _identity(size: int) -> np.ndarray:
    return np.eye(size, dtype=np.float32)


def encode_observations(observations: np.ndarray, mu: np.ndarray,
                        mu_scale: float | None) -> np.ndarray:
    """float32 [n, O] one-hot rows of ``observations``, followed (-> [n, 2 O]) unless
    ``mu_scale`` is None by mu's deviation from the uniform distribution magnified
    ``mu_scale`` times around it: [onehot(o_i), 1/O + mu_scale (mu_t - 1/O)], the vector an
    acting agent sees (``mu_scale`` 1: mu_t itself)."""
    size = len(mu)
    onehot = _identity(size)[observations]
    if mu_scale is None:
        return onehot
    features = mu if mu_scale == 1.0 else 1.0 / size + mu_scale * (mu - 1.0 / size)
    return np.concatenate(
        [onehot, np.broadcast_to(features.astype(np.float32), (len(observations), size))],
        axis=1)
