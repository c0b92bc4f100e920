"""Mean-field games and their exact model, checked against brute-force computations."""

import itertools
import math

import numpy as np
import pytest

from envs.mean_field.core import (
    MeanFieldGame,
    PopulationSimulator,
    TypedGame,
    parse_activation,
    sample_categorical,
    sample_passive_moves,
)
from envs.mean_field.model import (
    MeanFieldModel,
    NotConverged,
    best_response,
    constant_policy,
    kernels_along,
    mean_field_flow,
    per_step,
    policy_values,
    solve_equilibrium,
    time_indexed_policy,
)
from envs.mean_field.queueing import (
    DynamicQueueingGame,
    backlog_generators,
    uniformized_expm,
)
from envs.mean_field.resource_selection import ResourceSelectionGame, wardrop_equilibrium

RNG = np.random.default_rng(0)


def random_distribution(size):
    x = RNG.random(size)
    return x / x.sum()


def random_policy_table(num_obs, num_actions):
    x = RNG.random((num_obs, num_actions))
    return x / x.sum(axis=1, keepdims=True)


class RandomGame(MeanFieldGame):
    """A small game with mu- and dt-dependent rewards, P and a non-trivial P_0."""

    has_passive_moves = True

    def __init__(self, num_obs=3, num_actions=2, seed=0):
        rng = np.random.default_rng(seed)
        self.num_observations, self.num_actions = num_obs, num_actions
        self.initial_distribution = rng.dirichlet(np.ones(num_obs))
        self._r = rng.normal(size=(num_obs, num_actions))
        self._c = rng.normal(size=(num_obs, num_obs))
        self._p = rng.random((2, num_obs, num_actions, num_obs))
        self._p0 = rng.random((2, num_obs, num_obs))

    def rewards(self, mu):
        return self._r + (self._c @ mu)[:, None]

    def transitions(self, mu, dt=1.0):
        kernel = self._p[0] + dt * mu[0] * self._p[1]
        return kernel / kernel.sum(axis=2, keepdims=True)

    def passive_transitions(self, mu, dt=1.0):
        kernel = self._p0[0] + dt * mu[-1] * self._p0[1]
        return kernel / kernel.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- games


def test_resource_selection_tables_match_formulas():
    game = ResourceSelectionGame(resource_values=[1.0, 0.5, 0.2], congestion=2.0,
                                 switching_cost=0.3)
    mu = np.array([0.5, 0.3, 0.2])
    rewards, kernel = game.rewards(mu), game.transitions(mu)
    for o, a in itertools.product(range(3), range(3)):
        expected = [1.0, 0.5, 0.2][o] - 2.0 * mu[o] - (0.3 if a != o else 0.0)
        assert rewards[o, a] == pytest.approx(expected)
        assert kernel[o, a].tolist() == [1.0 if p == a else 0.0 for p in range(3)]
    assert not game.has_passive_moves
    np.testing.assert_array_equal(game.passive_transitions(mu, 0.3), np.eye(3))


def taylor_expm(matrix, terms=30, squarings=8):
    """exp(M) = exp(M / 2^s)^(2^s) with the power series for the small factor (an
    independent reference)."""
    small = matrix / 2 ** squarings
    result = np.eye(len(matrix))
    term = np.eye(len(matrix))
    for k in range(1, terms):
        term = term @ small / k
        result = result + term
    for _ in range(squarings):
        result = result @ result
    return result


def brute_force_queue_tables(game, mu, dt):
    """Per (o, a): the backlog generator written out entry by entry, exponentiated by the
    power series; the cost formula term by term."""
    size, levels = game.num_observations, game.levels
    loads = [sum(mu[q * levels + b] for b in range(1, levels)) for q in range(game.num_queues)]
    backlog = []
    for q in range(game.num_queues):
        rate = game.service_rates[q] / (game.service_rates[q] + loads[q])
        generator = np.zeros((levels, levels))
        for b in range(levels):
            if b >= 1:
                generator[b, b - 1] = rate
            if b < game.max_backlog:
                generator[b, b + 1] = game.arrival_rate
            generator[b, b] = -generator[b].sum()
        backlog.append(taylor_expm(generator * dt))
    kernel = np.zeros((size, game.num_actions, size))
    passive = np.zeros((size, size))
    rewards = np.zeros((size, game.num_actions))
    for o in range(size):
        q, b = divmod(o, levels)
        for new_b in range(levels):
            passive[o, q * levels + new_b] = backlog[q][b, new_b]
        for a in range(game.num_actions):
            rewards[o, a] = -(game.holding_cost * b
                              + (game.congestion_cost * loads[q] / game.service_rates[q]
                                 if b >= 1 else 0.0)
                              + (game.switching_cost if a != q else 0.0))
            for new_b in range(levels):
                kernel[o, a, a * levels + new_b] = backlog[a][b, new_b]
    return rewards, kernel, passive


@pytest.mark.parametrize("params,dt", [
    ({}, 1.0),
    ({}, 0.02),
    ({"service_rates": [0.2, 0.7], "arrival_rate": 0.9, "max_backlog": 1, "holding_cost": 2.0,
      "congestion_cost": 0.1, "switching_cost": 1.0}, 0.5),
])
def test_queueing_tables_match_brute_force(params, dt):
    game = DynamicQueueingGame(**params)
    mu = random_distribution(game.num_observations)
    rewards, kernel, passive = brute_force_queue_tables(game, mu, dt)
    np.testing.assert_allclose(game.rewards(mu), rewards, atol=1e-12)
    np.testing.assert_allclose(game.transitions(mu, dt), kernel, atol=1e-12)
    np.testing.assert_allclose(game.passive_transitions(mu, dt), passive, atol=1e-12)
    tables = game.step_tables(mu, dt)
    for got, expected in zip(tables, (rewards, kernel, passive)):
        np.testing.assert_allclose(got, expected, atol=1e-12)
    np.testing.assert_allclose(kernel.sum(axis=2), 1.0, atol=1e-12)
    assert game.has_passive_moves


def test_uniformized_expm_matches_the_power_series_and_stays_stochastic():
    generators = backlog_generators(np.array([0.7, 0.05, 3.0]), 0.4, 4)
    for dt in (1e-4, 0.3, 1.0, 4.0):
        result = uniformized_expm(generators, dt)
        for q in range(3):
            np.testing.assert_allclose(result[q], taylor_expm(generators[q] * dt), atol=1e-13)
        assert result.min() >= 0.0
        np.testing.assert_allclose(result.sum(axis=2), 1.0, atol=1e-14)


def test_queueing_costs_and_service_are_monotone_in_the_own_queue():
    """Monotonicity (checked on random pairs of distributions):
    sum_o (mu(o) - mu'(o)) (r(o, a, mu) - r(o, a, mu')) <= 0 for every a, with equality only
    when no queue's load changed; a customer's service probability falls as its own queue
    fills and does not depend on the other queues."""
    game = DynamicQueueingGame()
    for _ in range(200):
        mu, other = random_distribution(12), random_distribution(12)
        change = (mu - other) @ (game.rewards(mu) - game.rewards(other))
        assert np.all(change <= 1e-15)
        assert np.all(change < -1e-6)
    def served(mu, q, b):
        return game.passive_transitions(mu, 1.0)[q * 4 + b, q * 4 + b - 1]

    mu = random_distribution(12)
    for q in range(3):
        heavier = mu.copy()
        heavier[q * 4 + 2] += 0.2
        heavier /= heavier.sum()          # a larger share of the population waits in q
        assert game.loads(heavier)[q] > game.loads(mu)[q]
        for b in (1, 2, 3):
            assert served(heavier, q, b) < served(mu, q, b)
        elsewhere = mu.copy()             # another queue's load changes, q's does not
        other = (q + 1) % 3
        elsewhere[other * 4] += elsewhere[other * 4 + 3]
        elsewhere[other * 4 + 3] = 0.0
        assert game.loads(elsewhere)[other] < game.loads(mu)[other]
        for b in (1, 2, 3):
            assert served(elsewhere, q, b) == pytest.approx(served(mu, q, b), abs=1e-15)


def test_resource_selection_is_monotone():
    game = ResourceSelectionGame(congestion=1.5)
    for _ in range(50):
        mu, other = random_distribution(4), random_distribution(4)
        change = (mu - other) @ (game.rewards(mu) - game.rewards(other))
        np.testing.assert_allclose(change, -1.5 * np.sum((mu - other) ** 2))


def test_wardrop_equilibrium_equalises_payoffs_on_its_support():
    values = np.array([1.0, 0.8, 0.6, 0.4])
    mu, level = wardrop_equilibrium(values, congestion=1.0)
    assert mu.sum() == pytest.approx(1.0)
    payoff = values - mu
    support = mu > 0
    np.testing.assert_allclose(payoff[support], level)
    assert np.all(values[~support] <= level)
    np.testing.assert_allclose(mu, [8 / 15, 5 / 15, 2 / 15, 0.0])


# ----------------------------------------------------------------------------- flow


def brute_force_flow(game, table, alphas, passive_moves=True):
    """mu_{t+1}(o) = sum_o' mu_t(o') [alpha_t sum_a pi(a|o') P(o|o',a) + (1-alpha_t) P_0(o|o')]
    written as loops; ``passive_moves=False`` freezes idle agents (P_0 = identity)."""
    mu = game.initial_distribution.copy()
    flow = [mu]
    size = game.num_observations
    for alpha in alphas:
        kernel = game.transitions(mu, alpha)
        passive = game.passive_transitions(mu, alpha) if passive_moves else np.eye(size)
        new = np.zeros_like(mu)
        for source, target in itertools.product(range(size), range(size)):
            active = sum(table[source, a] * kernel[source, a, target]
                         for a in range(game.num_actions))
            new[target] += mu[source] * (alpha * active + (1 - alpha) * passive[source, target])
        mu = new
        flow.append(mu)
    return np.array(flow)


class FrozenIdle(RandomGame):
    """The random game with P_0 = identity."""

    has_passive_moves = False

    def passive_transitions(self, mu, dt=1.0):
        return np.eye(self.num_observations)


@pytest.mark.parametrize("game_class,passive_moves", [(RandomGame, True), (FrozenIdle, False)])
@pytest.mark.parametrize("alphas", [[1.0] * 4, [0.3] * 5, [0.01, 0.5, 1.0, 0.2]])
def test_flow_matches_brute_force_with_and_without_passive_moves(game_class, passive_moves,
                                                                 alphas):
    game = game_class()
    table = random_policy_table(game.num_observations, game.num_actions)
    mus, pis = mean_field_flow(game, constant_policy(table), np.array(alphas), len(alphas))
    np.testing.assert_allclose(mus, brute_force_flow(game, table, alphas, passive_moves),
                               atol=1e-12)
    np.testing.assert_allclose(mus.sum(axis=1), 1.0)
    assert pis.shape == (len(alphas), game.num_observations, game.num_actions)


def test_passive_moves_change_the_flow_of_the_queueing_game():
    """Idle customers are served: with one agent in ten acting, the flow differs from the
    one with frozen idle agents, and its total load (everyone starts with backlog 1) falls
    faster."""
    game = DynamicQueueingGame(initial_distribution="uniform_queues")
    table = np.tile([1.0, 0.0, 0.0], (12, 1))
    alphas = [0.1] * 10
    moving = mean_field_flow(game, constant_policy(table), np.array(alphas), 10)[0]
    frozen = brute_force_flow(game, table, alphas, passive_moves=False)
    np.testing.assert_allclose(moving, brute_force_flow(game, table, alphas), atol=1e-12)
    assert game.loads(moving[-1]).sum() < game.loads(frozen[-1]).sum() - 0.05


def test_passive_move_sampling_has_the_law_of_p0():
    rng = np.random.default_rng(5)
    passive = RandomGame(num_obs=4).passive_transitions(random_distribution(4), 0.7)
    observations = np.repeat(np.arange(4), 50_000)
    new = sample_passive_moves(rng, passive, observations)
    for o in range(4):
        freq = np.bincount(new[observations == o], minlength=4) / 50_000
        np.testing.assert_allclose(freq, passive[o], atol=0.01)


def test_simulator_step_moves_idle_agents_by_p0():
    """E[mu_{t+1} | mu_t] of the N-agent simulator is the flow step from mu_t (N = 200k)."""
    game = RandomGame()
    n = 200_000
    activation = parse_activation("k=60000", n)
    sim = PopulationSimulator(game, n, activation, horizon=1, seed=2)
    sim.reset()
    table = random_policy_table(3, 2)
    agents = sim.sample_active()
    sim.step(agents, sim.sample_actions(table, agents))
    # The start is a sample of mu_0: compare with the flow step from the sampled mu_0.
    game.initial_distribution = sim.mu_history[0]
    np.testing.assert_allclose(sim.mu_history[1], brute_force_flow(game, table, [0.3])[1],
                               atol=0.006)


# ----------------------------------------------------------------------------- values


def forward_value(game, mus, tables, alphas, gamma=1.0, entropy_coeff=0.0):
    """J by forward induction over (observation, number of own actions so far): the
    agent's distribution d_t(o, k) starts at mu_0 with k = 0; acting moves (o, k) to
    (o', k + 1) by P, idling to (o', k) by P_0; J = sum_t sum_{o,k} d_t(o, k) alpha_t
    gamma^k sum_a pi(a|o) (r(o, a) - tau log pi(a|o))."""
    horizon, size = len(tables), game.num_observations
    d = np.zeros((size, horizon + 1))
    d[:, 0] = mus[0]
    total = 0.0
    for t, table in enumerate(tables):
        rewards = game.rewards(mus[t])
        kernel = game.transitions(mus[t], alphas[t])
        passive = game.passive_transitions(mus[t], alphas[t])
        safe = np.where(table > 0, table, 1.0)
        per_obs = (table * rewards).sum(axis=1) \
            - entropy_coeff * (table * np.log(safe)).sum(axis=1)
        total += alphas[t] * sum(gamma ** k * d[:, k] @ per_obs for k in range(horizon + 1))
        new = np.zeros_like(d)
        for k in range(horizon):
            new[:, k + 1] += alphas[t] * np.einsum("o,oa,oap->p", d[:, k], table, kernel)
            new[:, k] += (1 - alphas[t]) * d[:, k] @ passive
        d = new
    return total


@pytest.mark.parametrize("alphas,gamma,tau", [
    ([1.0] * 4, 1.0, 0.0), ([0.4] * 5, 1.0, 0.0), ([0.4] * 5, 0.7, 0.2),
    ([0.1, 1.0, 0.5, 0.3, 0.9], 0.9, 0.0)])
@pytest.mark.parametrize("game_class", [RandomGame, DynamicQueueingGame])
def test_policy_values_match_forward_induction(game_class, alphas, gamma, tau):
    game = game_class() if game_class is RandomGame else game_class(max_backlog=2)
    alphas = np.array(alphas)
    horizon = len(alphas)
    tables = np.stack([random_policy_table(game.num_observations, game.num_actions)
                       for _ in range(horizon)])
    mus, _ = mean_field_flow(game, time_indexed_policy(tables), alphas, horizon)
    values = policy_values(kernels_along(game, mus, alphas), tables, alphas, gamma, tau)
    assert mus[0] @ values.agent[0] == pytest.approx(
        forward_value(game, mus, tables, alphas, gamma, tau), abs=1e-10)
    model = MeanFieldModel(game, alphas, horizon, gamma)
    assert model.evaluate(time_indexed_policy(tables), tau).value == pytest.approx(
        mus[0] @ values.agent[0])


def deterministic_policies(size, horizon):
    for choice in itertools.product(range(2), repeat=size * horizon):
        yield np.eye(2)[np.array(choice).reshape(horizon, size)]


@pytest.mark.parametrize("alphas,gamma", [([1.0] * 3, 1.0), ([0.5, 0.2, 0.9], 0.8)])
def test_best_response_and_gaps_beat_every_deterministic_policy(alphas, gamma):
    """Enumerate all 2^(O*H) deterministic time-dependent policies of a 2-observation game
    with passive moves: the best response's J is their maximum, and the per-(t, o') gap
    e_t(o') = V*_t(o') - V^pi_t(o') is the best active value at (t, o') over all of them
    minus pi's."""
    game = RandomGame(num_obs=2, num_actions=2, seed=3)
    alphas = np.array(alphas)
    horizon = len(alphas)
    mus, _ = mean_field_flow(game, constant_policy(np.full((2, 2), 0.5)), alphas, horizon)
    kernels = kernels_along(game, mus, alphas)
    best, response = best_response(kernels, alphas, gamma)
    values, active = [], []
    for tables in deterministic_policies(2, horizon):
        values.append(forward_value(game, mus, tables, alphas, gamma))
        active.append(policy_values(kernels, tables, alphas, gamma).active)
    assert mus[0] @ best.agent[0] == pytest.approx(max(values), abs=1e-12)
    np.testing.assert_allclose(best.active, np.max(active, axis=0), atol=1e-12)
    assert forward_value(game, mus, response, alphas, gamma) == pytest.approx(max(values))

    model = MeanFieldModel(game, alphas, horizon, gamma)
    table = random_policy_table(2, 2)
    evaluation = model.evaluate(constant_policy(table))
    own = policy_values(kernels_along(game, evaluation.mus, alphas), evaluation.pis, alphas,
                        gamma)
    best_own, _ = best_response(kernels_along(game, evaluation.mus, alphas), alphas, gamma)
    np.testing.assert_allclose(evaluation.gaps, best_own.active - own.active)
    assert evaluation.gaps.min() >= -1e-12
    assert evaluation.exploitability == pytest.approx(
        evaluation.mus[0] @ (best_own.agent[0] - own.agent[0]))


def test_soft_best_response_is_optimal_for_the_regularised_objective():
    game = DynamicQueueingGame(max_backlog=2)
    alphas = np.full(4, 0.5)
    mus, _ = mean_field_flow(game, constant_policy(np.full((9, 3), 1 / 3)), alphas, 4)
    kernels = kernels_along(game, mus, alphas)
    values, response = best_response(kernels, alphas, 0.9, entropy_coeff=0.3)
    optimum = mus[0] @ values.agent[0]
    assert forward_value(game, mus, response, alphas, 0.9, 0.3) == pytest.approx(optimum,
                                                                                  abs=1e-10)
    for _ in range(20):
        tables = np.stack([random_policy_table(9, 3) for _ in range(4)])
        assert forward_value(game, mus, tables, alphas, 0.9, 0.3) <= optimum + 1e-12


@pytest.mark.parametrize("alpha,horizon", [(1.0, 10), (0.1, 100), (0.01, 400)])
def test_exploitability_of_the_wardrop_equilibrium_is_zero_and_of_bad_policies_positive(
        alpha, horizon):
    values = [1.0, 0.8, 0.6, 0.4]
    mu_star, _ = wardrop_equilibrium(values, 1.0)
    game = ResourceSelectionGame(resource_values=values, initial_distribution=mu_star)
    model = MeanFieldModel(game, alpha, horizon)
    evaluation = model.evaluate(constant_policy(np.tile(mu_star, (4, 1))))
    assert evaluation.exploitability == pytest.approx(0.0, abs=1e-9)
    # Off the support (resource 3) the best action differs: positive gaps there only.
    assert evaluation.gaps[:, :3].max() == pytest.approx(0.0, abs=1e-9)
    everyone_on_best = np.tile([1.0, 0.0, 0.0, 0.0], (4, 1))
    assert model.exploitability(constant_policy(everyone_on_best)) > 1.0
    assert model.exploitability(constant_policy(np.full((4, 4), 0.25))) > 0.5


def test_typed_game_with_equal_policies_reduces_to_the_game():
    game = DynamicQueueingGame(max_backlog=2)
    table = random_policy_table(game.num_observations, game.num_actions)
    typed = TypedGame(game, [0.3, 0.7])
    assert typed.has_passive_moves
    plain = MeanFieldModel(game, 0.5, 6, gamma=0.9)
    lifted = MeanFieldModel(typed, 0.5, 6, gamma=0.9)
    plain_eval = plain.evaluate(constant_policy(table))
    lifted_eval = lifted.evaluate(constant_policy(np.tile(table, (2, 1))))
    np.testing.assert_allclose(typed.marginal(lifted_eval.mus[-1]), plain_eval.mus[-1])
    assert lifted_eval.value == pytest.approx(plain_eval.value)
    assert lifted_eval.exploitability == pytest.approx(plain_eval.exploitability)


# ----------------------------------------------------------------------------- solver


@pytest.mark.parametrize("alpha,horizon", [(1.0, 5), (0.25, 20)])
def test_solver_converges_and_reports_it(alpha, horizon):
    game = ResourceSelectionGame()
    model = MeanFieldModel(game, alpha, horizon, gamma=0.95)
    result = solve_equilibrium(model, tol=1e-6, max_iterations=5000)
    assert result.converged and result.exploitability <= 1e-6
    assert 1 < result.iterations < 5000
    evaluation = model.evaluate(result.policy())
    assert evaluation.exploitability == pytest.approx(result.exploitability)
    assert evaluation.max_gap < 1e-4
    if alpha == 1.0:  # everyone moves at once: the flow is at the Wardrop split from t = 1
        mu_star, _ = wardrop_equilibrium(game.values, game.congestion)  # (to t = H - 1: the
        np.testing.assert_allclose(evaluation.mus[1:horizon],           # last move is free)
                                   np.tile(mu_star, (horizon - 1, 1)), atol=1e-3)


def test_solver_refuses_to_call_a_non_converged_point_an_equilibrium():
    model = MeanFieldModel(DynamicQueueingGame(), 0.5, 8)
    result = solve_equilibrium(model, tol=1e-6, max_iterations=3)
    assert not result.converged and result.iterations == 3
    assert result.exploitability > 1e-6
    with pytest.raises(NotConverged, match=r"stopped after 3 iterations with exploitability "
                                           r"[0-9.e-]+ > tol 1e-06"):
        result.policy()


def test_regularised_solver_reaches_the_soft_fixed_point():
    model = MeanFieldModel(DynamicQueueingGame(), 1.0, 6, gamma=0.9)
    result = solve_equilibrium(model, entropy_coeff=0.2, tol=1e-8, max_iterations=3000)
    assert result.converged
    mus, pis = model.flow(result.policy())
    _, response = best_response(kernels_along(model.game, mus, model.alphas), model.alphas,
                                0.9, 0.2)
    np.testing.assert_allclose(pis, response, atol=1e-3)


def test_per_step_checks_the_fractions():
    np.testing.assert_array_equal(per_step(0.5, 3), [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="activation fractions must be in"):
        per_step(0.0, 3)


# ----------------------------------------------------------------------------- simulator


def test_sample_categorical_frequencies():
    rng = np.random.default_rng(1)
    probs = np.array([0.1, 0.0, 0.6, 0.3])
    draws = sample_categorical(rng, np.tile(probs, (200_000, 1)))
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, probs, atol=0.005)
    assert freq[1] == 0.0


@pytest.mark.parametrize("spec,alpha", [("all", 1.0), ("k=25", 0.25), ("bernoulli=0.2", 0.2),
                                        ("sequential", 0.01), ("cycle=10,30,5", 0.15)])
def test_activation_schedules_have_their_activation_fraction(spec, alpha):
    activation = parse_activation(spec, 100)
    assert activation.fraction == pytest.approx(alpha)
    rng = np.random.default_rng(2)
    sizes = [len(activation.sample(rng, t)) for t in range(3000)]
    assert np.mean(sizes) / 100 == pytest.approx(alpha, rel=0.05)
    drawn = activation.sample(rng, 1)
    assert len(np.unique(drawn)) == len(drawn) and np.all(np.diff(drawn) > 0)


def test_cycle_schedule_varies_the_batch_size_over_time():
    activation = parse_activation("cycle=1,10,50", 100)
    rng = np.random.default_rng(0)
    assert [len(activation.sample(rng, t)) for t in range(6)] == [1, 10, 50, 1, 10, 50]
    np.testing.assert_allclose(activation.fractions(4), [0.01, 0.1, 0.5, 0.01])
    assert str(activation) == "cycle=1,10,50"


@pytest.mark.parametrize("spec,small,large", [
    ("all", 100, 10_000), ("k", 100, 10_000), ("bernoulli=0.3", 100, 10_000),
    ("sequential", 40, 1_000), ("cycle", 100, 10_000)])
def test_empirical_mu_converges_to_the_flow_as_n_grows(spec, small, large):
    """E mean_t ||mu_N(t) - mu(t)||_1 shrinks like 1/sqrt(N), idle customers being served:
    by 10x (5x) for 100x (25x) N."""
    game = DynamicQueueingGame()
    table = random_policy_table(game.num_observations, game.num_actions)
    errors = {}
    for n in (small, large):
        text = {"k": f"k={n // 10}", "cycle": f"cycle={n // 20},{n // 4}"}.get(spec, spec)
        activation = parse_activation(text, n)
        horizon = int(round(3 / activation.fraction))
        alphas = activation.fractions(horizon)
        mus, _ = mean_field_flow(game, constant_policy(table), alphas, horizon)
        sim = PopulationSimulator(game, n, activation, horizon, seed=3)
        runs = []
        for _ in range(10):
            sim.reset()
            for _ in range(horizon):
                agents = sim.sample_active()
                sim.step(agents, sim.sample_actions(table, agents))
            runs.append(np.abs(sim.mu_history - mus).sum(axis=1).mean())
        errors[n] = np.mean(runs)
    expected_ratio = math.sqrt(large / small)
    assert errors[small] / errors[large] == pytest.approx(expected_ratio, rel=0.35)


def test_frozen_simulator_plays_against_the_given_flow():
    """Frozen: rewards and moves use mu-hat_t whatever the agents do; the agents' own
    distribution still follows the flow of (policy, mu-hat)."""
    game = DynamicQueueingGame()
    activation = parse_activation("all", 50_000)
    sim = PopulationSimulator(game, 50_000, activation, horizon=3, seed=1)
    frozen = np.stack([random_distribution(12) for _ in range(4)])
    sim.freeze(frozen)
    sim.reset()
    table = random_policy_table(12, 3)
    for t in range(3):
        np.testing.assert_array_equal(sim.mean_field, frozen[t])
        agents = sim.sample_active()
        actions = sim.sample_actions(table, agents)
        old = sim.observations[agents].copy()
        rewards = sim.step(agents, actions)
        np.testing.assert_allclose(rewards, game.rewards(frozen[t])[old, actions])
    with pytest.raises(ValueError, match=r"frozen flow: shape \(2, 12\), expected \(4, 12\)"):
        sim.freeze(frozen[:2])
    sim.freeze(None)
    assert sim.frozen_flow is None
    np.testing.assert_array_equal(sim.mean_field, sim.mu)


@pytest.mark.parametrize("alphas", [[1.0] * 3, [0.02] * 50, [0.1, 0.9, 0.5]])
def test_steady_start_is_stationary_for_customers_who_stay(alphas):
    """``uniform_queues_steady``: each queue's backlogs in the steady state of its own chain,
    so if nobody switches the flow does not move, under every schedule."""
    game = DynamicQueueingGame()
    np.testing.assert_allclose(game.loads(game.initial_distribution) > 0, True)
    stay = np.eye(3)[game.queue_of]
    mus, _ = mean_field_flow(game, constant_policy(stay), np.array(alphas), len(alphas))
    np.testing.assert_allclose(mus, np.tile(game.initial_distribution, (len(alphas) + 1, 1)),
                               atol=1e-12)
    split = game.initial_distribution.reshape(3, 4).sum(axis=1)
    np.testing.assert_allclose(split, 1 / 3)
