"""TMF-PG: the learner's gradient, exact-model convergence, config errors, and training
through RLlib (shared and per-type modules, asynchronous schedules, checkpoints, CLI)."""

import numpy as np
import pytest
import torch
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from envs.mean_field import DynamicQueueingEnv, ResourceSelectionEnv
from rllib_ext.algorithms.tmf_pg import TMFPGConfig
from rllib_ext.algorithms.tmf_pg.env_runner import MeanFieldEnvRunner, MeanFieldMetricsCallback
from rllib_ext.algorithms.tmf_pg.exact import (
    FixedFlow,
    exact_tmf_pg,
    network_policy,
    regularized_value,
)
from rllib_ext.algorithms.tmf_pg.population import AgentTypeMapping, PopulationView
from rllib_ext.algorithms.tmf_pg.torch.tmf_pg_torch_rl_module import TMFPGTorchRLModule

# Tiny networks: thread hand-offs cost more than the math on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build_module(env, seed=0):
    torch.manual_seed(seed)
    space = env.observation_spaces["agent_0"]
    return RLModuleSpec(module_class=TMFPGTorchRLModule, observation_space=space,
                        action_space=env.action_spaces["agent_0"],
                        model_config={"hidden": [32, 32]}).build()


@pytest.mark.parametrize("env_class,activation,gamma", [
    (ResourceSelectionEnv, "all", 1.0), (DynamicQueueingEnv, "k=250", 0.8)])
def test_learner_gradient_is_the_exact_policy_gradient(env_class, activation, gamma):
    """The sample gradient of the TMF-PG loss on RLlib episodes (N = 1000) matches the exact
    gradient of J_tau(pi_theta; mu^pi) with the flow frozen: -rounds * grad(loss) ~ grad J
    (queueing: idle customers served by P_0, discount gamma per own action)."""
    tau, rounds = 0.2, 3
    env_config = {"num_agents": 1000, "rounds": rounds, "activation": activation}
    config = TMFPGConfig().environment(env_class, env_config=env_config) \
        .training(entropy_coeff=tau, gamma=gamma).debugging(seed=0)
    config.validate()
    env = env_class(env_config)
    learner = config.build_learner(env=env)
    module = learner.module["shared"]
    torch.manual_seed(0)
    with torch.no_grad():  # a non-uniform policy, so that every term of the loss matters
        for parameter in module.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    runner = MeanFieldEnvRunner(config=config)
    runner.module["shared"].load_state_dict(module.state_dict())

    episodes = runner.sample(num_episodes=8)
    batch = learner._learner_connector(rl_module=learner.module, episodes=episodes, batch={})
    loss = learner.compute_loss_for_module(module_id="shared", config=config,
                                           batch=batch["shared"],
                                           fwd_out=module.forward_train(batch["shared"]))
    sample = torch.cat([g.flatten() for g in torch.autograd.grad(loss, module.parameters())])

    model = env.mean_field_model(gamma)
    mus, _ = model.flow(network_policy(module, env.policy_inputs))
    value = regularized_value(FixedFlow(model, mus, env.policy_inputs), module, tau)
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(value, module.parameters())])

    estimate = -rounds * sample.double()
    exact = exact.double()
    cosine = float(estimate @ exact / (estimate.norm() * exact.norm()))
    assert cosine > 0.98
    assert float(estimate.norm() / exact.norm()) == pytest.approx(1.0, abs=0.15)


def test_regularized_value_is_the_model_value():
    env = DynamicQueueingEnv({"num_agents": 10, "activation": "k=4", "rounds": 2})
    module = build_module(env, seed=1)
    model = env.mean_field_model(0.9)
    policy = network_policy(module, env.policy_inputs)
    mus, _ = model.flow(policy)
    for tau in (0.0, 0.3):
        value = regularized_value(FixedFlow(model, mus, env.policy_inputs), module, tau)
        assert value.item() == pytest.approx(model.evaluate(policy, tau).value, abs=1e-5)


@pytest.mark.parametrize("activation,bound", [("all", 0.01), ("k=25", 0.1)])
def test_exact_tmf_pg_converges_to_the_equilibrium(activation, bound):
    """Unregularised (the game is monotone): exploitability from 2.7 to below 0.01 in 150
    iterations with all acting (below 0.1 with a quarter acting: 40 steps of transient)."""
    env = ResourceSelectionEnv({"num_agents": 100, "activation": activation, "rounds": 10})
    history = exact_tmf_pg(env.mean_field_model(), build_module(env), env.policy_inputs,
                           iterations=150, lr=0.01, evaluate_every=150)
    first, last = history[0], history[-1]
    assert first["exploitability"] == pytest.approx(2.7, abs=0.05)   # uniform from uniform
    assert last["exploitability"] < bound
    assert last["value"] > first["value"]


def test_exact_inner_steps_leave_the_fixed_flow_untouched():
    """Each outer iteration propagates one mu-hat; its inner steps all see that same flow,
    bit for bit, while the policy changes; the next outer iteration propagates a new one."""
    env = DynamicQueueingEnv({"num_agents": 10, "activation": "k=5", "rounds": 2})
    module = build_module(env)
    seen = []
    policy = network_policy(module, env.policy_inputs)

    def record(flow):
        seen.append((flow, flow.mus.copy(), flow.inputs.clone(), policy(flow.mus[1], 1)))

    exact_tmf_pg(env.mean_field_model(), module, env.policy_inputs, iterations=2, lr=0.05,
                 inner_updates=3, evaluate_every=10, on_inner_step=record)
    assert len(seen) == 6
    for outer in (0, 3):
        flow, mus, inputs, _ = seen[outer]
        for inner in range(outer + 1, outer + 3):
            assert seen[inner][0] is flow
            np.testing.assert_array_equal(seen[inner][1], mus)
            assert torch.equal(seen[inner][2], inputs)
            assert not np.allclose(seen[inner][3], seen[inner - 1][3])   # the policy moved
        np.testing.assert_array_equal(flow.mus, mus)
    assert not np.allclose(seen[0][1], seen[3][1])


@pytest.mark.parametrize("settings,match", [
    ({"entropy_coeff": -0.1}, r"TMFPGConfig.entropy_coeff: got -0.1; use a number >= 0"),
    ({"entropy_coeff": [[0, 0.1], [100, -0.1]]}, r"TMFPGConfig.entropy_coeff: got .*schedule"),
    ({"entropy_coeff": [[10, 0.1], [100, 0.0]]}, r"TMFPGConfig.entropy_coeff: got .*schedule"),
    ({"entropy_coeff": [[0, 0.1]]}, r"TMFPGConfig.entropy_coeff"),
    ({"inner_updates": 0}, r"TMFPGConfig.inner_updates: got 0; use an integer >= 1"),
    ({"num_episodes_per_iteration": 0},
     r"TMFPGConfig.num_episodes_per_iteration: got 0; use an integer >= 1"),
    ({"num_agent_types": 1.5}, r"TMFPGConfig.num_agent_types: got 1.5; use an integer >= 1"),
    ({"gamma": 1.5}, r"TMFPGConfig.gamma: got 1.5; use a number in \(0, 1\]"),
    ({"batch_mode": "truncate_episodes"}, r"TMFPGConfig.batch_mode: .*complete_episodes"),
    ({"env_config": {"observe_mu": False}},
     r"TMFPGConfig.env_config.observe_mu: got False; TMF-PG's policy is pi\(a \| o, mu\)"),
])
def test_config_rejects_bad_settings(settings, match):
    config = TMFPGConfig().environment(ResourceSelectionEnv).update_from_dict(settings)
    with pytest.raises(ValueError, match=match):
        config.validate()


class RecordingCallback(MeanFieldMetricsCallback):
    """Records, per finished episode: frozen?, the flow it was frozen at, its mu history,
    the mu part of every observation, and its return (local runner: same process)."""

    records = []

    def on_episode_end(self, *, episode, env=None, env_index=0, **kwargs):
        super().on_episode_end(episode=episode, env=env, env_index=env_index, **kwargs)
        sub_env = env.envs[env_index].unwrapped
        size = sub_env.num_observations
        observed = np.concatenate([np.asarray(sa.get_observations())[:, size:]
                                   for sa in episode.agent_episodes.values()])
        flow = sub_env.simulator.frozen_flow
        self.records.append((sub_env.frozen, None if flow is None else flow.copy(),
                             episode.custom_data["mu_history"], observed,
                             episode.get_return()))


def test_inner_steps_play_against_the_fixed_mu_hat(ray_session):
    """inner_updates = 3: per iteration, the population episodes give mu-hat (their mean
    flow); the two further batches are sampled frozen at exactly that mu-hat (every observed
    mu is a row of it), there are three learner updates, and the runner ends unfrozen.
    Runner metrics count the population episodes only."""
    RecordingCallback.records = []
    config = TMFPGConfig().environment(
        DynamicQueueingEnv, env_config={"num_agents": 20, "activation": "k=5", "rounds": 2}) \
        .training(inner_updates=3, num_episodes_per_iteration=2).callbacks(RecordingCallback) \
        .debugging(seed=0)
    algo = config.build_algo()
    try:
        results = [algo.train() for _ in range(2)]
        optimizer = algo.learner_group.get_state()["learner"]["optimizer"]
        steps = [float(s["step"]) for opt in optimizer.values()
                 for s in opt["state"]["state"].values()]
        assert not algo.env_runner.env.envs[0].unwrapped.frozen
    finally:
        algo.stop()
    records = RecordingCallback.records
    assert len(records) == 2 * (2 + 2 + 2)
    assert steps and steps[0] == 6
    for iteration in range(2):
        population = records[6 * iteration:6 * iteration + 2]
        frozen = records[6 * iteration + 2:6 * iteration + 6]
        assert not any(r[0] for r in population) and all(r[0] for r in frozen)
        mu_hat = np.mean([r[2] for r in population], axis=0)
        for _, flow, history, observed, _ in frozen:
            np.testing.assert_array_equal(flow, mu_hat)
            distance = np.abs(observed[:, None, :] - mu_hat[None, :, :].astype(np.float32))
            assert distance.sum(axis=2).min(axis=1).max() < 1e-6
            assert not np.allclose(history, mu_hat)     # the agents' own distribution
        expected = np.mean([r[4] for r in population]) / 20
        assert float(results[iteration]["env_runners"]["mean_field"]["return_per_agent"]) \
            == pytest.approx(expected)


def test_per_type_mapping_and_population_view():
    config = TMFPGConfig().environment(ResourceSelectionEnv, env_config={"num_agents": 10}) \
        .training(num_agent_types=2)
    config.validate()
    assert set(config.policies) == {"type_0", "type_1"}
    assert isinstance(config.policy_mapping_fn, AgentTypeMapping)
    assert config.policy_mapping_fn("agent_7", None) == "type_1"
    view = PopulationView(ResourceSelectionEnv({"num_agents": 10}), config.policy_mapping_fn)
    assert view.module_ids == ["type_0", "type_1"]
    assert view.model.game.type_weights.tolist() == [0.5, 0.5]


def test_tmf_pg_trains_and_checkpoints(ray_session, tmp_path):
    """Trains with an annealed tau (0.1 -> 0 over 60000 agent actions: 0.05 after the 30000
    of 15 iterations), checkpoints and restores the exact metrics, the regularised
    exploitability at the restored tau included."""
    config = TMFPGConfig().environment(
        ResourceSelectionEnv, env_config={"num_agents": 50, "activation": "all"}) \
        .training(num_episodes_per_iteration=4, entropy_coeff=[[0, 0.1], [60000, 0.0]]) \
        .debugging(seed=1)
    algo = config.build_algo()
    try:
        results = [algo.train() for _ in range(15)]
        exploitability = [r["mean_field"]["exploitability"] for r in results]
        assert exploitability[0] > 1.5
        assert np.mean(exploitability[-3:]) < 0.5 * exploitability[0]
        last = results[-1]
        assert last["num_agent_actions_lifetime"] == 15 * 4 * 50 * 10
        assert last["learners"]["shared"]["entropy"] < np.log(4)
        assert last["learners"]["shared"]["entropy_coeff"] == pytest.approx(0.05)
        assert algo.current_entropy_coeff() == pytest.approx(0.05)
        assert last["mean_field"]["exploitability_regularized"] \
            != last["mean_field"]["exploitability"]
        runner_metrics = last["env_runners"]["mean_field"]
        assert 4.0 < runner_metrics["return_per_agent"] < 5.0
        assert 0.0 < runner_metrics["mu_l1_distance"] < 0.5
        checkpoint = algo.save(str(tmp_path)).checkpoint.path
        expected = algo.exact_metrics()
    finally:
        algo.stop()
    restored = type(algo).from_checkpoint(checkpoint)
    try:
        assert restored.current_entropy_coeff() == pytest.approx(0.05)
        assert restored.exact_metrics() == pytest.approx(expected)
        assert "exploitability_regularized" in expected
    finally:
        restored.stop()


@pytest.mark.parametrize("env_class,activation", [
    (ResourceSelectionEnv, "sequential"), (DynamicQueueingEnv, "bernoulli=0.3")])
def test_tmf_pg_with_per_type_modules_and_asynchronous_agents(ray_session, env_class,
                                                              activation):
    config = TMFPGConfig().environment(
        env_class, env_config={"num_agents": 10, "activation": activation, "rounds": 3}) \
        .training(num_agent_types=2, num_episodes_per_iteration=2, exploitability_interval=2)
    algo = config.build_algo()
    try:
        before = algo.exact_metrics()
        evaluations = []
        exact_metrics = algo.exact_metrics
        algo.exact_metrics = lambda: evaluations.append(algo.iteration) or exact_metrics()
        results = [algo.train() for _ in range(3)]
    finally:
        algo.stop()
    # Exact metrics at the first and every 2nd iteration; the third repeats the second's.
    assert evaluations == [0, 1]
    assert results[2]["mean_field"] == results[1]["mean_field"] != results[0]["mean_field"]
    result = results[1]
    assert {"type_0", "type_1"} <= set(result["learners"])
    for module_id in ("type_0", "type_1"):
        assert result["learners"][module_id]["num_samples"] > 0
    assert set(result["env_runners"]["num_module_steps_sampled"]) == {"type_0", "type_1"}
    assert np.isfinite(result["mean_field"]["exploitability"])
    assert result["mean_field"]["exploitability"] != pytest.approx(before["exploitability"])


@pytest.mark.slow
def test_cli_trains_the_tuned_example(cli, tmp_path):
    run = cli("train", "file", "tuned_examples/tmf_pg_resource_selection.yaml", "--stop",
              '{"training_iteration": 2}', "--storage-path", str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if "iter 2 |" in line]
    assert lines and "exploitability" in lines[0] and "return/agent" in lines[0]


def test_tuned_examples_validate():
    from rllib_ext.cli.experiment import experiments_from_file

    for path in ("tuned_examples/tmf_pg_resource_selection.yaml",
                 "tuned_examples/tmf_pg_queueing.yaml", "tuned_examples/tmf_pg_sweep.yaml"):
        experiments = experiments_from_file(path)
        assert [e.algo_name for e in experiments] == ["TMFPG"]
    sweep = experiments_from_file("tuned_examples/tmf_pg_sweep.yaml")[0]
    env_config = sweep.param_space["env_config"]
    assert len(env_config["num_agents"]["grid_search"]) == 3
    assert len(env_config["activation"]["grid_search"]) == 4


def hand_batch(env):
    from ray.rllib.core.columns import Columns

    from rllib_ext.algorithms.tmf_pg.tmf_pg_learner import (
        DISCOUNTS,
        LOGP_ADVANTAGES,
        REWARD_ADVANTAGES,
        REWARD_RETURNS,
    )

    observations = torch.as_tensor(np.stack([env.policy_inputs(np.full(4, 0.25))[o]
                                             for o in (0, 1, 2)]))
    return {Columns.OBS: observations, Columns.ACTIONS: torch.tensor([1, 0, 3]),
            REWARD_ADVANTAGES: torch.tensor([1.0, -2.0, 0.5]),
            LOGP_ADVANTAGES: torch.tensor([-0.5, 1.0, 2.0]), REWARD_RETURNS: torch.zeros(3),
            DISCOUNTS: torch.tensor([1.0, 0.5, 0.25])}


def expected_loss(fwd, batch, tau):
    """-mean[gamma^j log pi(a|o) ((R - b(R)) - tau (L - b(L)))] - tau mean[gamma^j H]."""
    from ray.rllib.core.columns import Columns

    from rllib_ext.algorithms.tmf_pg.tmf_pg_learner import (
        DISCOUNTS,
        LOGP_ADVANTAGES,
        REWARD_ADVANTAGES,
    )

    log_pi = torch.log_softmax(fwd[Columns.ACTION_DIST_INPUTS], dim=-1)
    entropy = -(log_pi.exp() * log_pi).sum(dim=-1)
    chosen = log_pi[torch.arange(3), batch[Columns.ACTIONS]]
    weights = batch[DISCOUNTS]
    advantages = batch[REWARD_ADVANTAGES] - tau * batch[LOGP_ADVANTAGES]
    return (-(weights * chosen * advantages).mean() - tau * (weights * entropy).mean()).item()


def test_loss_weights_each_step_by_its_discount():
    """loss = -mean[gamma^j log pi(a|o) A] - tau mean[gamma^j H(pi(.|o))] on a hand batch,
    with the soft advantage A = (R - b(R)) - tau (L - b(L))."""
    env = ResourceSelectionEnv({"num_agents": 10})
    config = TMFPGConfig().environment(ResourceSelectionEnv, env_config={"num_agents": 10}) \
        .training(entropy_coeff=0.3, gamma=0.5)
    config.validate()
    learner = config.build_learner(env=env)
    module = learner.module["shared"]
    batch = hand_batch(env)
    fwd = module.forward_train(batch)
    loss = learner.compute_loss_for_module(module_id="shared", config=config, batch=batch,
                                           fwd_out=fwd)
    assert loss.item() == pytest.approx(expected_loss(fwd, batch, 0.3), rel=1e-6)


def test_entropy_coeff_schedule_is_applied_in_agent_actions():
    """entropy_coeff [[0, 0.4], [1000, 0.0]]: the loss uses 0.4 before any update, and after
    an update at 500 agent actions the scheduler's 0.2 (logged as learners/shared/
    entropy_coeff); at and past 1000 actions tau is 0 (the plain objective)."""
    from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

    env = ResourceSelectionEnv({"num_agents": 10})
    config = TMFPGConfig().environment(ResourceSelectionEnv, env_config={"num_agents": 10}) \
        .training(entropy_coeff=[[0, 0.4], [1000, 0.0]])
    config.validate()
    learner = config.build_learner(env=env)
    module = learner.module["shared"]
    batch = hand_batch(env)
    for actions, tau in ((None, 0.4), (500, 0.2), (1000, 0.0), (5000, 0.0)):
        if actions is not None:
            learner.after_gradient_based_update(
                timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: actions})
            assert learner.metrics.peek(("shared", "entropy_coeff")) == pytest.approx(tau)
        fwd = module.forward_train(batch)
        loss = learner.compute_loss_for_module(module_id="shared", config=config,
                                               batch=batch, fwd_out=fwd)
        assert loss.item() == pytest.approx(expected_loss(fwd, batch, tau), rel=1e-6)


@pytest.mark.slow
def test_exact_tmf_pg_with_annealed_entropy_reaches_the_queueing_equilibrium():
    """Queueing, all acting: plain softmax policy gradient with the network stalls near a
    deterministic policy (exploitability ~0.04 after 400 steps); tau 0.3 annealed to 0 at
    70% of 2000 steps (lr 0.01 -> 0.001) ends below 1e-2, unregularised (1000 steps did on one
    machine, and stalled at 0.028 on another: bench/tmf_sequential_vs_synchronous.py). The
    history reports the schedules' values."""
    env = DynamicQueueingEnv({"num_agents": 50, "activation": "all", "rounds": 10})
    model = env.mean_field_model()
    plain = exact_tmf_pg(model, build_module(env), env.policy_inputs, iterations=400,
                         lr=0.01, evaluate_every=400)
    annealed = exact_tmf_pg(model, build_module(env), env.policy_inputs, iterations=2000,
                            lr=[[0, 0.01], [2000, 0.001]],
                            entropy_coeff=[[0, 0.3], [1400, 0.0]], evaluate_every=700)
    assert plain[-1]["exploitability"] > 0.03
    assert [row["iteration"] for row in annealed] == [0, 700, 1400, 2000]
    assert annealed[1]["entropy_coeff"] == pytest.approx(0.15)
    assert annealed[1]["lr"] == pytest.approx(0.01 - 0.009 * 0.35)
    assert annealed[1]["exploitability_regularized"] != annealed[1]["exploitability"]
    assert annealed[-1]["entropy_coeff"] == 0.0
    assert annealed[-1]["exploitability"] < 0.01


@pytest.mark.parametrize("activation", ["sequential", "bernoulli=0.3", "all"])
def test_population_episode_answers_as_rllibs_episode(activation):
    """PopulationEpisode (O(acting agents) per step) gives the same agents to act and that
    stepped as RLlib's MultiAgentEpisode, step by step, under every schedule; its per-step
    check still catches a broken episode of an agent that stepped."""
    from ray.rllib.env.multi_agent_episode import MultiAgentEpisode

    from rllib_ext.algorithms.tmf_pg.env_runner import PopulationEpisode

    env = DynamicQueueingEnv({"num_agents": 6, "activation": activation, "rounds": 3})
    fast, plain = PopulationEpisode(), MultiAgentEpisode()
    observations, infos = env.reset(seed=0)
    for episode in (fast, plain):
        episode.add_env_reset(observations=observations, infos=infos)
    rng = np.random.default_rng(0)
    steps = 0
    while not plain.is_done:
        assert fast.get_agents_to_act() == plain.get_agents_to_act()
        assert fast.get_agents_that_stepped() == plain.get_agents_that_stepped()
        actions = {aid: int(rng.integers(3)) for aid in plain.get_agents_to_act()}
        observations, rewards, terminateds, truncateds, infos = env.step(actions)
        for episode in (fast, plain):
            episode.add_env_step(observations, actions, rewards, infos,
                                 terminateds=terminateds, truncateds=truncateds)
        steps += 1
    assert fast.is_done and steps == env.horizon
    assert fast.get_agents_that_stepped() == plain.get_agents_that_stepped()
    assert fast.get_return(include_hanging_rewards=True) == pytest.approx(
        plain.get_return(include_hanging_rewards=True))

    broken = PopulationEpisode()
    observations, infos = env.reset(seed=1)
    broken.add_env_reset(observations=observations, infos=infos)
    actor = next(iter(broken.get_agents_to_act()))
    broken.agent_episodes[actor].infos.append({})  # one info too many
    actions = {aid: 0 for aid in broken.get_agents_to_act()}
    observations, rewards, *_ = env.step(actions)
    with pytest.raises(AssertionError):
        broken.add_env_step(observations, actions, rewards)


def test_exact_flow_metric_is_computed_once_per_policy():
    """The runner metric's exact flow is shared by the episodes of one policy and computed
    anew when the weights change (in place, as a weight sync or an optimiser step does)."""
    from rllib_ext.algorithms.tmf_pg.env_runner import policy_key

    env = ResourceSelectionEnv({"num_agents": 10})
    config = TMFPGConfig().environment(ResourceSelectionEnv, env_config={"num_agents": 10})
    config.validate()
    multi = config.get_multi_rl_module_spec(
        spaces={"shared": (env.observation_spaces["agent_0"], env.action_spaces["agent_0"])},
        inference_only=True).build()
    callback = MeanFieldMetricsCallback()
    runner = type("Runner", (), {"config": config})()
    calls = []
    original = PopulationView.flow
    try:
        PopulationView.flow = lambda self, module: calls.append(1) or original(self, module)
        first = callback._exact_flow(runner, env, multi)
        assert callback._exact_flow(runner, env, multi) is first and len(calls) == 1
        key = policy_key(multi)
        torch.manual_seed(0)
        with torch.no_grad():
            for parameter in multi["shared"].parameters():
                parameter.add_(torch.randn_like(parameter))
        assert policy_key(multi) != key
        second = callback._exact_flow(runner, env, multi)
        assert len(calls) == 2 and not np.allclose(second, first)
        multi["shared"].load_state_dict(multi["shared"].state_dict())
        callback._exact_flow(runner, env, multi)
        assert len(calls) == 3
    finally:
        PopulationView.flow = original


def test_seeded_runner_draws_new_env_randomness_at_every_call():
    """RLlib resets the envs with the run's seed at every sample(num_episodes=...) call; the
    runner derives a new seed per call, so a seeded run does not replay the same activations
    every iteration, and stays reproducible."""
    config = TMFPGConfig().environment(
        ResourceSelectionEnv, env_config={"num_agents": 10, "activation": "sequential",
                                          "rounds": 3}).debugging(seed=5)
    config.validate()

    def activation_counts(runner):
        return [tuple(sorted((aid, len(sa)) for aid, sa in episode.agent_episodes.items()))
                for episode in runner.sample(num_episodes=4)]

    first, second = MeanFieldEnvRunner(config=config), MeanFieldEnvRunner(config=config)
    calls = [activation_counts(first) for _ in range(3)]
    assert len(set(calls[0])) == 4  # the 4 envs side by side differ
    assert calls[0] != calls[1] and calls[1] != calls[2] and calls[0] != calls[2]
    assert [activation_counts(second) for _ in range(3)] == calls
