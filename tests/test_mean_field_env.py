"""The mean-field MultiAgentEnvs: dict semantics with idle agents, errors, RLlib episodes."""

import numpy as np
import pytest

from envs.mean_field import DynamicQueueingEnv, ResourceSelectionEnv
from envs.mean_field.env import agent_index

SCHEDULES = ["all", "k=7", "bernoulli=0.3", "sequential"]


def run_episode(env, seed=0):
    """Play one episode with random actions; returns per-step (obs keys, reward keys, acting
    set drawn by the env) and the env's terminal flags."""
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    steps = []
    while True:
        acting = set(env.acting_agents)
        assert set(obs) == acting
        actions = {aid: int(rng.integers(env.game.num_actions)) for aid in obs}
        obs, rewards, terminateds, truncateds, infos = env.step(actions)
        steps.append((set(actions), set(rewards)))
        if terminateds["__all__"]:
            assert obs == {} and truncateds == {"__all__": False}
            return steps


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_only_acting_agents_observe_and_get_rewards(schedule):
    env = ResourceSelectionEnv({"num_agents": 20, "activation": schedule, "rounds": 3})
    steps = run_episode(env)
    assert len(steps) == env.horizon
    for acted, rewarded in steps:
        assert acted == rewarded
    sizes = [len(acted) for acted, _ in steps]
    if schedule == "all":
        assert sizes == [20] * env.horizon
    elif schedule == "k=7":
        assert set(sizes) == {7}
    elif schedule == "sequential":
        assert set(sizes) == {1} and env.horizon == 60


def test_observation_is_onehot_then_population_distribution():
    env = DynamicQueueingEnv({"num_agents": 50, "activation": "k=5"})
    obs, _ = env.reset(seed=1)
    size = env.num_observations
    for aid, vector in obs.items():
        assert vector.shape == (2 * size,) and vector.dtype == np.float32
        own = env.simulator.observations[agent_index(aid)]
        assert vector[:size].tolist() == np.eye(size)[own].tolist()
        np.testing.assert_allclose(vector[size:], env.mu, atol=1e-7)
    np.testing.assert_allclose(env.mu, np.bincount(env.simulator.observations,
                                                   minlength=size) / 50)
    assert env.observation_spaces["agent_3"].contains(next(iter(obs.values())))

    blind = DynamicQueueingEnv({"num_agents": 50, "observe_mu": False})
    obs, _ = blind.reset(seed=1)
    assert next(iter(obs.values())).shape == (size,)


def test_mu_scale_magnifies_mu_around_uniform():
    """mu_scale s: the mu part is 1/O + s (mu - 1/O), in the env's observations and in
    policy_inputs alike, inside the observation space; s = 1 is mu itself."""
    env = ResourceSelectionEnv({"num_agents": 4, "mu_scale": 10.0})
    mu = np.array([0.5, 0.25, 0.25, 0.0])
    inputs = env.policy_inputs(mu)
    # 0.25 + 10 * (0.5 - 0.25) = 2.75, 0.25 + 10 * (0 - 0.25) = -2.25
    np.testing.assert_allclose(inputs[2], [0, 0, 1, 0, 2.75, 0.25, 0.25, -2.25])
    space = env.observation_spaces["agent_0"]
    assert space.low[4:].tolist() == [-2.25] * 4 and space.high[4:].tolist() == [7.75] * 4
    assert all(space.contains(row) for row in inputs)
    obs, _ = env.reset(seed=0)
    own = env.simulator.observations[agent_index("agent_1")]
    expected = [*np.eye(4)[own], *(0.25 + 10.0 * (env.mu - 0.25))]
    np.testing.assert_allclose(obs["agent_1"], expected, atol=1e-6)
    plain = ResourceSelectionEnv({"num_agents": 4}).policy_inputs(mu)
    np.testing.assert_allclose(plain[2, 4:], mu)
    assert ResourceSelectionEnv({"num_agents": 4}).observation_spaces["agent_0"].high.max() == 1


def test_idle_agents_keep_their_observation_and_mu_history_is_recorded():
    env = ResourceSelectionEnv({"num_agents": 30, "activation": "k=3", "rounds": 1})
    env.reset(seed=4)
    before = env.simulator.observations.copy()
    acting = [agent_index(a) for a in env.acting_agents]
    env.step({aid: 2 for aid in env.acting_agents})
    after = env.simulator.observations
    idle = np.setdiff1d(np.arange(30), acting)
    assert np.array_equal(before[idle], after[idle])
    assert np.all(after[acting] == 2)          # resource game: o' = a
    assert env.mu_history.shape == (2, 4)
    np.testing.assert_allclose(env.mu_history[1], env.mu)


def test_idle_customers_keep_being_served():
    """Queueing: customers that never act stay in their queue, and their backlogs change
    (service and arrivals continue) while they wait; resource holders stay put."""
    env = DynamicQueueingEnv({"num_agents": 2000, "activation": "k=20", "rounds": 0.2,
                              "arrival_rate": 0.5})
    obs, _ = env.reset(seed=0)
    before = env.simulator.observations.copy()
    acted = set()
    while obs:
        acted |= {agent_index(aid) for aid in obs}
        obs, *_ = env.step({aid: 0 for aid in obs})
    never = np.setdiff1d(np.arange(2000), sorted(acted))
    after = env.simulator.observations
    game = env.game
    assert len(never) > 1000
    np.testing.assert_array_equal(game.queue_of[before[never]], game.queue_of[after[never]])
    changed = np.mean(game.backlog_of[before[never]] != game.backlog_of[after[never]])
    assert 0.03 < changed < 0.5


def test_cycle_schedule_and_frozen_mean_field_through_the_env():
    env = DynamicQueueingEnv({"num_agents": 40, "activation": "cycle=2,10", "rounds": 2})
    assert env.horizon == 13                                 # round(2 / (6 / 40))
    np.testing.assert_allclose(env.mean_field_model().alphas[:3], [0.05, 0.25, 0.05])
    flow = np.random.default_rng(0).dirichlet(np.ones(12), size=env.horizon + 1)
    env.freeze_mean_field(flow)
    obs, _ = env.reset(seed=2)
    sizes = []
    for t in range(env.horizon):
        sizes.append(len(obs))
        for vector in obs.values():
            np.testing.assert_allclose(vector[12:], flow[t], atol=1e-7)
        obs, *_ = env.step({aid: 1 for aid in obs})
    assert sizes[:4] == [2, 10, 2, 10]
    assert env.frozen
    env.freeze_mean_field(None)
    obs, _ = env.reset(seed=2)
    np.testing.assert_allclose(next(iter(obs.values()))[12:], env.mu, atol=1e-7)


def test_actions_from_idle_agents_are_rejected_with_a_clear_error():
    env = ResourceSelectionEnv({"num_agents": 10, "activation": "sequential"})
    obs, _ = env.reset(seed=0)
    acting = next(iter(obs))
    idle = next(a for a in env.possible_agents if a != acting)
    with pytest.raises(ValueError, match=f"idle agents that sent actions: \\['{idle}'\\]"):
        env.step({acting: 0, idle: 1})
    with pytest.raises(ValueError, match=f"acting agents without an action: \\['{acting}'\\]"):
        env.step({})
    with pytest.raises(ValueError, match="unknown agent 'bob'"):
        env.step({"bob": 0})
    with pytest.raises(ValueError, match=r"actions must be integers in \[0, 4\)"):
        env.step({acting: 9})


@pytest.mark.parametrize("config,match", [
    ({"num_agents": 1}, r"env_config\['num_agents'\]: got 1; use an integer >= 2"),
    ({"num_agents": 10.5}, r"env_config\['num_agents'\]"),
    ({"activation": "some"}, r"env_config\['activation'\]: got 'some'; use \"all\""),
    ({"activation": "k=0"}, r"k must be an integer in \[1, num_agents=100\]"),
    ({"activation": "k=101"}, r"k must be an integer in \[1, num_agents=100\]"),
    ({"activation": "bernoulli=1.5"}, r"p must be in \(0, 1\]"),
    ({"activation": "sequential=3"}, r"'sequential' takes no parameter"),
    ({"rounds": 0}, r"env_config\['rounds'\]: got 0; use a finite number > 0"),
    ({"observe_mu": "yes"}, r"env_config\['observe_mu'\]: got 'yes'; use true or false"),
    ({"mu_scale": 0}, r"env_config\['mu_scale'\]: got 0; use a finite number > 0"),
    ({"congestion": -1}, r"env_config\['congestion'\]: got -1; use a finite number > 0"),
    ({"resource_values": [1.0]}, r"env_config\['resource_values'\]: got \[1.0\]; use a list"),
    ({"switching_cost": float("nan")}, r"env_config\['switching_cost'\]"),
    ({"initial_distribution": [0.5, 0.5, 0.5, 0.5]},
     r"env_config\['initial_distribution'\]: .* sum to 1"),
    ({"initial_distribution": [0.5, 0.5]}, r"has 2 entries; give exactly 4"),
    ({"num_agent": 10}, r"unknown env_config key\(s\) 'num_agent' \(did you mean 'num_agents'\?\)"),
])
def test_resource_selection_rejects_bad_parameters(config, match):
    with pytest.raises(ValueError, match=match):
        ResourceSelectionEnv(config)


@pytest.mark.parametrize("config,match", [
    ({"service_rates": [0.5, 0.0]}, r"env_config\['service_rates'\].*all entries must be > 0"),
    ({"arrival_rate": -0.2}, r"env_config\['arrival_rate'\]: got -0.2; use a finite number >= 0.0"),
    ({"arrival_prob": 0.3}, r"unknown env_config key\(s\) 'arrival_prob' \(did you mean "
                            r"'arrival_rate'\?\)"),
    ({"initial_distribution": "steady"}, r"env_config\['initial_distribution'\]: got 'steady'; "
                                         r"use one of uniform_queues_steady, uniform_queues"),
    ({"activation": "cycle=1,x"}, r"cycle must be integers in \[1, num_agents=100\]"),
    ({"max_backlog": 0}, r"env_config\['max_backlog'\]: got 0; use an integer >= 1"),
    ({"holding_cost": -0.1}, r"env_config\['holding_cost'\]"),
    ({"service_rate": [1, 2]}, r"did you mean 'service_rates'"),
])
def test_queueing_rejects_bad_parameters(config, match):
    with pytest.raises(ValueError, match=match):
        DynamicQueueingEnv(config)


@pytest.mark.parametrize("schedule", ["sequential", "bernoulli=0.2", "k=3", "all"])
def test_rllib_env_runner_builds_valid_asynchronous_episodes(schedule):
    """Real MultiAgentEnvRunner episodes (TMF-PG's 4 envs side by side): every agent's
    single-agent episode has exactly its own activations; the population return equals what
    its env paid."""
    from rllib_ext.algorithms.tmf_pg import TMFPGConfig
    from rllib_ext.algorithms.tmf_pg.env_runner import MeanFieldEnvRunner

    class CountingEnv(ResourceSelectionEnv):
        def reset(self, *, seed=None, options=None):
            self.paid, self.acts, self.observed = 0.0, {}, 0
            return super().reset(seed=seed, options=options)

        def step(self, action_dict):
            for aid in action_dict:
                self.acts[aid] = self.acts.get(aid, 0) + 1
            result = super().step(action_dict)
            self.paid += sum(result[1].values())
            self.observed += len(result[0])
            return result

    config = TMFPGConfig().environment(
        CountingEnv, env_config={"num_agents": 12, "activation": schedule, "rounds": 4})
    config.validate()
    runner = MeanFieldEnvRunner(config=config)
    episodes = runner.sample(num_episodes=4)
    envs = [sub_env.unwrapped for sub_env in runner.env.envs]
    assert len(episodes) == len(envs) == 4
    for episode, env in zip(episodes, envs, strict=True):  # all end at the same step
        assert episode.is_terminated and episode.env_steps() == env.horizon
        assert {aid: len(sa) for aid, sa in episode.agent_episodes.items()} == env.acts
        for sa in episode.agent_episodes.values():
            assert sa.module_id == "shared" and sa.is_terminated
            assert len(sa.get_rewards()) == len(sa)
        assert episode.get_return() == pytest.approx(env.paid)

    metrics = runner.get_metrics()
    assert set(metrics["num_agent_steps_sampled"]) == {"all_agents"}
    assert set(metrics["num_module_steps_sampled"]) == {"shared"}
    # Counted per sample() call, the totals of RLlib's per-step rule (one agent step per
    # observation an env step returns).
    observed = sum(env.observed for env in envs)
    assert metrics["num_agent_steps_sampled"]["all_agents"] == observed
    assert metrics["num_module_steps_sampled"]["shared"] == observed
    assert metrics["num_env_steps_sampled"] == sum(env.horizon for env in envs)
    assert metrics["num_episodes"] == 4
    assert "agent_episode_returns_mean" not in metrics
    mean_field = metrics["mean_field"]
    assert float(mean_field["return_per_agent"]) == pytest.approx(
        np.mean([e.get_return() for e in episodes]) / 12)
    assert 0.0 < float(mean_field["mu_l1_distance"]) < 2.0


@pytest.mark.parametrize("schedule", ["all", "bernoulli=0.5"])
def test_env_empirical_mu_approaches_the_exact_flow_as_n_grows(schedule):
    """Through the dict interface, with a fixed policy table: the mean L1 distance between
    the env's mu_t and the exact flow shrinks ~5x for 25x agents."""
    from envs.mean_field.core import sample_categorical
    from envs.mean_field.model import constant_policy

    table = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]] * 6)
    errors = {}
    for n in (80, 2000):
        env = DynamicQueueingEnv({"num_agents": n, "activation": schedule, "rounds": 3})
        flow, _ = env.mean_field_model().flow(constant_policy(table))
        rng = np.random.default_rng(n)
        runs = []
        for episode in range(12):
            obs, _ = env.reset(seed=episode)
            while obs:
                own = np.array([vector[:12] for vector in obs.values()]).argmax(axis=1)
                actions = sample_categorical(rng, table[own])
                obs, *_ = env.step(dict(zip(obs, actions.tolist())))
            runs.append(np.abs(env.mu_history - flow).sum(axis=1).mean())
        errors[n] = np.mean(runs)
    assert errors[80] / errors[2000] == pytest.approx(5.0, rel=0.4)
