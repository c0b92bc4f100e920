"""Mean-field games and their exact model, checked against brute-force computations."""

import itertools

import numpy as np
import pytest

from envs.mean_field.core import (
    PopulationSimulator,
    TypedGame,
    parse_activation,
    sample_categorical,
)
from envs.mean_field.model import (
    MeanFieldModel,
    best_response,
    constant_policy,
    fixed_point_equilibrium,
    mean_field_flow,
    policy_values,
    time_indexed_policy,
)
from envs.mean_field.queueing import DynamicQueueingGame
from envs.mean_field.resource_selection import ResourceSelectionGame, wardrop_equilibrium

RNG = np.random.default_rng(0)


def random_distribution(size):
    x = RNG.random(size)
    return x / x.sum()


def random_policy_table(num_obs, num_actions):
    x = RNG.random((num_obs, num_actions))
    return x / x.sum(axis=1, keepdims=True)


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


def brute_force_queue_tables(game, mu):
    """Per (o, a): enumerate service and arrival outcomes one by one."""
    size, levels = game.num_observations, game.levels
    kernel = np.zeros((size, game.num_actions, size))
    rewards = np.zeros((size, game.num_actions))
    loads = [sum(mu[q * levels + b] for b in range(1, levels)) for q in range(game.num_queues)]
    for o in range(size):
        q, b = divmod(o, levels)
        for a in range(game.num_actions):
            sigma = game.service_rates[a] / (game.service_rates[a] + loads[a])
            rewards[o, a] = -(game.holding_cost * b
                              + (game.congestion_cost * loads[a] / game.service_rates[a]
                                 if b >= 1 else 0.0)
                              + (game.switching_cost if a != q else 0.0))
            for served, arrived in itertools.product((0, 1), (0, 1)):
                p_served = (sigma if served else 1 - sigma) if b >= 1 else (1.0 - served)
                p_arrived = game.arrival_prob if arrived else 1 - game.arrival_prob
                new_b = min(game.max_backlog, max(0, b - served) + arrived)
                kernel[o, a, a * levels + new_b] += p_served * p_arrived
    return rewards, kernel


@pytest.mark.parametrize("params", [
    {},
    {"service_rates": [0.2, 0.7], "arrival_prob": 0.9, "max_backlog": 1, "holding_cost": 2.0,
     "congestion_cost": 0.1, "switching_cost": 1.0},
])
def test_queueing_tables_match_brute_force(params):
    game = DynamicQueueingGame(**params)
    mu = random_distribution(game.num_observations)
    rewards, kernel = brute_force_queue_tables(game, mu)
    np.testing.assert_allclose(game.rewards(mu), rewards, atol=1e-12)
    np.testing.assert_allclose(game.transitions(mu), kernel, atol=1e-12)
    np.testing.assert_allclose(game.transitions(mu).sum(axis=2), 1.0, atol=1e-12)


def test_wardrop_equilibrium_equalises_payoffs_on_its_support():
    values = np.array([1.0, 0.8, 0.6, 0.4])
    mu, level = wardrop_equilibrium(values, congestion=1.0)
    assert mu.sum() == pytest.approx(1.0)
    payoff = values - mu
    support = mu > 0
    np.testing.assert_allclose(payoff[support], level)
    assert np.all(values[~support] <= level)
    np.testing.assert_allclose(mu, [8 / 15, 5 / 15, 2 / 15, 0.0])


# ----------------------------------------------------------------------------- exact model


def brute_force_flow(game, table, alpha, horizon):
    mu = game.initial_distribution.copy()
    flow = [mu]
    for _ in range(horizon):
        kernel = game.transitions(mu)
        moved = np.zeros_like(mu)
        for o, a, p in itertools.product(range(game.num_observations), range(game.num_actions),
                                         range(game.num_observations)):
            moved[p] += mu[o] * table[o, a] * kernel[o, a, p]
        mu = (1 - alpha) * mu + alpha * moved
        flow.append(mu)
    return np.array(flow)


@pytest.mark.parametrize("alpha", [1.0, 0.3, 0.01])
def test_flow_matches_brute_force(alpha):
    game = DynamicQueueingGame(max_backlog=2)
    table = random_policy_table(game.num_observations, game.num_actions)
    mus, pis = mean_field_flow(game, constant_policy(table), alpha, 6)
    np.testing.assert_allclose(mus, brute_force_flow(game, table, alpha, 6), atol=1e-12)
    np.testing.assert_allclose(mus.sum(axis=1), 1.0)
    assert pis.shape == (6, game.num_observations, game.num_actions)


def forward_value(game, mus, tables, alpha, entropy_coeff=0.0):
    """J by forward induction: the deviating agent's own distribution d_t starts at mu_0,
    d_{t+1} = (1 - alpha) d_t + alpha d_t P^{pi_t}; J = alpha sum_t d_t . (r + tau H)."""
    d = mus[0].copy()
    total = 0.0
    for t, table in enumerate(tables):
        rewards, kernel = game.rewards(mus[t]), game.transitions(mus[t])
        safe = np.where(table > 0, table, 1.0)
        per_obs = (table * rewards).sum(axis=1) - entropy_coeff * (table * np.log(safe)).sum(1)
        total += alpha * d @ per_obs
        d = (1 - alpha) * d + alpha * np.einsum("o,oa,oap->p", d, table, kernel)
    return total


@pytest.mark.parametrize("alpha,tau", [(1.0, 0.0), (0.4, 0.0), (0.4, 0.2)])
def test_policy_values_match_forward_induction(alpha, tau):
    game = DynamicQueueingGame(max_backlog=2)
    horizon = 5
    tables = np.stack([random_policy_table(game.num_observations, game.num_actions)
                       for _ in range(horizon)])
    mus, _ = mean_field_flow(game, time_indexed_policy(tables), alpha, horizon)
    value = mus[0] @ policy_values(game, mus, tables, alpha, tau)[0]
    assert value == pytest.approx(forward_value(game, mus, tables, alpha, tau), abs=1e-10)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_best_response_beats_every_deterministic_policy(alpha):
    """Enumerate all 2^(O*H) deterministic time-dependent policies of a 2x2 game."""
    game = ResourceSelectionGame(resource_values=[1.0, 0.7], congestion=1.5, switching_cost=0.2,
                                 initial_distribution=[0.8, 0.2])
    horizon = 3
    mus, _ = mean_field_flow(game, constant_policy(np.full((2, 2), 0.5)), alpha, horizon)
    best = mus[0] @ best_response(game, mus, alpha)[0][0]
    values = []
    for choice in itertools.product(range(2), repeat=2 * horizon):
        tables = np.eye(2)[np.array(choice).reshape(horizon, 2)]
        values.append(forward_value(game, mus, tables, alpha))
    assert best == pytest.approx(max(values), abs=1e-12)


def test_soft_best_response_is_optimal_for_the_regularised_objective():
    game = DynamicQueueingGame(max_backlog=2)
    model = MeanFieldModel(game, alpha=0.5, horizon=4)
    mus, _ = model.flow(constant_policy(np.full((game.num_observations, 3), 1 / 3)))
    values, response = best_response(game, mus, 0.5, entropy_coeff=0.3)
    optimum = mus[0] @ values[0]
    assert forward_value(game, mus, response, 0.5, 0.3) == pytest.approx(optimum, abs=1e-10)
    for _ in range(20):
        tables = np.stack([random_policy_table(game.num_observations, 3) for _ in range(4)])
        assert forward_value(game, mus, tables, 0.5, 0.3) <= optimum + 1e-12


@pytest.mark.parametrize("alpha,horizon", [(1.0, 10), (0.1, 100), (0.01, 400)])
def test_exploitability_of_the_wardrop_equilibrium_is_zero_and_of_bad_policies_positive(
        alpha, horizon):
    values = [1.0, 0.8, 0.6, 0.4]
    mu_star, _ = wardrop_equilibrium(values, 1.0)
    game = ResourceSelectionGame(resource_values=values, initial_distribution=mu_star)
    model = MeanFieldModel(game, alpha, horizon)
    assert model.exploitability(constant_policy(np.tile(mu_star, (4, 1)))) == pytest.approx(
        0.0, abs=1e-9)
    everyone_on_best = np.tile([1.0, 0.0, 0.0, 0.0], (4, 1))
    assert model.exploitability(constant_policy(everyone_on_best)) > 1.0
    assert model.exploitability(constant_policy(np.full((4, 4), 0.25))) > 0.5


def test_fixed_point_equilibrium_of_the_queueing_game_is_unexploitable():
    model = MeanFieldModel(DynamicQueueingGame(), alpha=1.0, horizon=10)
    tables, gap = fixed_point_equilibrium(model, entropy_coeff=0.1, iterations=400,
                                          damping=0.1)
    assert gap == pytest.approx(0.0, abs=1e-6)
    uniform = constant_policy(np.full((12, 3), 1 / 3))
    assert model.exploitability(uniform, 0.1) > 1.0


def test_typed_game_with_equal_policies_reduces_to_the_game():
    game = DynamicQueueingGame(max_backlog=2)
    table = random_policy_table(game.num_observations, game.num_actions)
    typed = TypedGame(game, [0.3, 0.7])
    plain = MeanFieldModel(game, 0.5, 6)
    lifted = MeanFieldModel(typed, 0.5, 6)
    plain_eval = plain.evaluate(constant_policy(table))
    lifted_eval = lifted.evaluate(constant_policy(np.tile(table, (2, 1))))
    np.testing.assert_allclose(typed.marginal(lifted_eval.mus[-1]), plain_eval.mus[-1])
    assert lifted_eval.value == pytest.approx(plain_eval.value)
    assert lifted_eval.exploitability == pytest.approx(plain_eval.exploitability)


# ----------------------------------------------------------------------------- simulator


def test_sample_categorical_frequencies():
    rng = np.random.default_rng(1)
    probs = np.array([0.1, 0.0, 0.6, 0.3])
    draws = sample_categorical(rng, np.tile(probs, (200_000, 1)))
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, probs, atol=0.005)
    assert freq[1] == 0.0


@pytest.mark.parametrize("spec,alpha", [("all", 1.0), ("k=25", 0.25), ("bernoulli=0.2", 0.2),
                                        ("sequential", 0.01)])
def test_activation_schedules_have_their_activation_fraction(spec, alpha):
    activation = parse_activation(spec, 100)
    assert activation.fraction == pytest.approx(alpha)
    rng = np.random.default_rng(2)
    sizes = [len(activation.sample(rng)) for _ in range(2000)]
    assert np.mean(sizes) / 100 == pytest.approx(alpha, rel=0.05)
    drawn = activation.sample(rng)
    assert len(np.unique(drawn)) == len(drawn) and np.all(np.diff(drawn) > 0)


@pytest.mark.parametrize("spec,small,large", [
    ("all", 100, 10_000), ("k", 100, 10_000), ("bernoulli=0.3", 100, 10_000),
    ("sequential", 40, 1_000)])
def test_empirical_mu_converges_to_the_flow_as_n_grows(spec, small, large):
    """E mean_t ||mu_N(t) - mu(t)||_1 shrinks like 1/sqrt(N): by 10x (5x) for 100x (25x) N."""
    game = DynamicQueueingGame()
    table = random_policy_table(game.num_observations, game.num_actions)
    errors = {}
    for n in (small, large):
        activation = parse_activation(f"k={n // 10}" if spec == "k" else spec, n)
        horizon = int(round(3 / activation.fraction))
        mus, _ = mean_field_flow(game, constant_policy(table), activation.fraction, horizon)
        sim = PopulationSimulator(game, n, activation, horizon, seed=3)
        runs = []
        for _ in range(10):
            sim.reset()
            for _ in range(horizon):
                agents = sim.sample_active()
                sim.step(agents, sim.sample_actions(table, agents))
            runs.append(np.abs(sim.mu_history - mus).sum(axis=1).mean())
        errors[n] = np.mean(runs)
    expected_ratio = np.sqrt(large / small)
    assert errors[small] / errors[large] == pytest.approx(expected_ratio, rel=0.35)
