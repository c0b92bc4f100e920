"""TMF-PG: policy gradient for mean-field games with asynchronous agents.

The method ("Mean-Field Reinforcement Learning without Synchrony", arXiv 2602.18026; the
nested loop as the paper's author describes it, details ours, see ``docs/tmf_pg.md``): all
agents share one policy pi(a | o, mu) that sees the agent's own observation and the population
distribution mu over observations. Each outer iteration estimates the population flow
mu-hat_0..mu-hat_H of the current policy, then takes ``inner_updates`` policy-gradient steps
on the representative agent's return J(pi; mu-hat) against that *fixed* mu-hat; mu-hat is then
re-estimated. Here mu-hat is the mean empirical flow of ``num_episodes_per_iteration``
N-agent episodes of the current policy (``population.population_flow``), gradients are
estimated from RLlib multi-agent episodes in which only the acting agents step (any
activation schedule, from all N per step to one), and the return and baseline math is in
``returns.py``.

Outer iteration: sample population episodes -> mu-hat -> inner step 1 on those episodes (they
are samples of the current policy at mu-hat) -> for steps 2..K: freeze every runner's envs at
mu-hat (``MeanFieldEnv.freeze_mean_field``: rewards, moves and observed mu follow mu-hat, so
the N agents are N copies of the representative agent against the fixed flow), sample, step
-> unfreeze -> exact-model metrics. ``inner_updates: 1`` is one gradient step per flow
estimate (the round-1 algorithm).

Result keys (besides RLlib's):
    mean_field/exploitability              sum_o mu_0(o) (W* - W^pi)_0(o), exact model
    mean_field/max_gap                     max_{t,o'} V*_t(o') - V^pi_t(o') (per-state form)
    mean_field/exploitability_regularized  the same for J_tau at the current tau (when > 0)
    mean_field/value                       J(pi; mu^pi) of the current policy, exact model
    env_runners/mean_field/return_per_agent, reward_per_action, mu_l1_distance
        (per population episode; see ``env_runner.MeanFieldMetricsCallback``)

Policy mapping: by default every agent maps to the one module ``"shared"``;
``num_agent_types: K`` (> 1) maps agent_i to module ``type_{i mod K}``; any other mapping can
be set with ``config.multi_agent(policies=..., policy_mapping_fn=...)`` (the exact model
then treats each module's agents as a type).
"""

from __future__ import annotations

import math

from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.env.env_context import EnvContext
from ray.rllib.policy.policy import PolicySpec
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
)

from envs.mean_field.env import MeanFieldEnv
from rllib_ext import registry
from rllib_ext.algorithms.tmf_pg.env_runner import (
    MEAN_FIELD,
    MU_HISTORY,
    MeanFieldEnvRunner,
    MeanFieldMetricsCallback,
    freeze_mean_field,
)
from rllib_ext.algorithms.tmf_pg.population import (
    SHARED_MODULE_ID,
    AgentTypeMapping,
    PopulationView,
    population_flow,
    shared_policy_mapping,
)
from rllib_ext.algorithms.tmf_pg.tmf_pg_learner import schedule_value

# Lifetime number of actions taken by all agents (the clock of TMF-PG's schedules).
NUM_AGENT_ACTIONS_LIFETIME = "num_agent_actions_lifetime"


class TMFPGConfig(AlgorithmConfig):
    """Config of :class:`TMFPG`. TMF-PG settings (``.training(...)``):

    - ``inner_updates`` (>= 1, default 1): policy-gradient steps against each fixed flow
      estimate mu-hat (each on ``num_episodes_per_iteration`` fresh episodes).
    - ``entropy_coeff`` (tau >= 0, default 0, or a schedule ``[[t, tau], ...]`` in agent
      actions like ``lr``'s): entropy regularisation, optional; the games here are
      monotone, which makes their equilibrium unique without it. Annealed to 0 it keeps
      plain softmax policy gradient off the plateaus near deterministic policies (the
      benches' setting, ``docs/tmf_pg.md``). exploitability_regularized uses its current
      value.
    - ``num_episodes_per_iteration`` (>= 1, default 4): complete episodes per gradient step
      (one episode has about N * rounds agent actions under every schedule).
    - ``num_agent_types`` (>= 1, default 1): 1 = one shared module for all agents; K > 1 =
      agent_i uses module ``type_{i mod K}``.
    - ``exploitability_interval`` (>= 0, default 1): compute the exact-model metrics every
      that many iterations and at the first (0 = never); the results of the iterations in
      between repeat the latest ones.

    Defaults otherwise: lr 0.01, gamma 1.0 (finite horizon; gamma < 1 discounts per own
    action, in the learner and the exact model alike), complete episodes, sampling on
    the local env runner with 4 envs side by side (``num_envs_per_env_runner``; best equal to
    the episodes each runner samples per iteration), the :class:`MeanFieldEnvRunner` and
    :class:`MeanFieldMetricsCallback`.
    An ``lr`` schedule ``[[t, value], ...]`` counts t in agent actions (result key
    ``num_agent_actions_lifetime``), which mean the same experience under every activation
    schedule (env steps do not: an env step is N actions with ``all``, 1 with ``sequential``).
    """

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or TMFPG)
        self.lr = 0.01
        self.gamma = 1.0
        self.entropy_coeff = 0.0
        self.inner_updates = 1
        self.num_episodes_per_iteration = 4
        self.num_agent_types = 1
        self.exploitability_interval = 1
        self.batch_mode = "complete_episodes"
        self.num_env_runners = 0
        # An iteration's episodes run side by side: one env-to-module pass and one module
        # forward per env step serve them all (with PopulationEpisode 3.5-5x faster sampling
        # when one agent acts per step; bench/results/tmf_sampling_throughput.md).
        self.num_envs_per_env_runner = 4
        self.env_runner_cls = MeanFieldEnvRunner
        self.callbacks_class = MeanFieldMetricsCallback
        self.policies = {SHARED_MODULE_ID: PolicySpec()}
        self.policy_mapping_fn = shared_policy_mapping

    @override(AlgorithmConfig)
    def training(self, *, entropy_coeff=NotProvided, inner_updates=NotProvided,
                 num_episodes_per_iteration=NotProvided, num_agent_types=NotProvided,
                 exploitability_interval=NotProvided, **kwargs):
        super().training(**kwargs)
        if inner_updates is not NotProvided:
            self.inner_updates = inner_updates
        if entropy_coeff is not NotProvided:
            self.entropy_coeff = entropy_coeff
        if num_episodes_per_iteration is not NotProvided:
            self.num_episodes_per_iteration = num_episodes_per_iteration
        if num_agent_types is not NotProvided:
            self.num_agent_types = num_agent_types
        if exploitability_interval is not NotProvided:
            self.exploitability_interval = exploitability_interval
        return self

    @override(AlgorithmConfig)
    def validate(self) -> None:
        self._validate_tmf_pg_settings()
        types = self.num_agent_types
        if types > 1 and set(self.policies) == {SHARED_MODULE_ID}:
            mapping = AgentTypeMapping(types)
            self.policies = {mid: PolicySpec() for mid in mapping.module_ids()}
            self.policy_mapping_fn = mapping
        super().validate()

    def _validate_tmf_pg_settings(self) -> None:
        def require(ok: bool, key: str, problem: str, fix: str) -> None:
            if not ok:
                raise ValueError(f"TMFPGConfig.{key}: {problem}; {fix}")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value)

        def is_schedule(value, allowed) -> bool:
            """A number, or [[0, v_0], [t_1, v_1], ...] with increasing t; every v allowed."""
            if is_number(value):
                return allowed(value)
            pairs = value if isinstance(value, (list, tuple)) else ()
            if len(pairs) < 2 or not all(isinstance(pair, (list, tuple)) and len(pair) == 2
                                         and is_number(pair[0]) and is_number(pair[1])
                                         for pair in pairs):
                return False
            times = [pair[0] for pair in pairs]
            return times[0] == 0 and all(b > a for a, b in zip(times, times[1:])) \
                and all(allowed(pair[1]) for pair in pairs)

        tau = self.entropy_coeff
        require(is_schedule(tau, lambda value: value >= 0), "entropy_coeff", f"got {tau!r}",
                "use a number >= 0 (0: the plain game) or a schedule [[0, tau_0], "
                "[t_1, tau_1], ...] of such numbers, t in agent actions (e.g. tau annealed "
                "to 0).")
        require(isinstance(self.gamma, (int, float)) and 0 < self.gamma <= 1, "gamma",
                f"got {self.gamma!r}", "use a number in (0, 1] (1 for the finite-horizon game).")
        for key, low in (("inner_updates", 1), ("num_episodes_per_iteration", 1),
                         ("num_agent_types", 1), ("exploitability_interval", 0)):
            value = getattr(self, key)
            require(is_int(value) and value >= low, key, f"got {value!r}",
                    f"use an integer >= {low}.")
        require(self.batch_mode == "complete_episodes", "batch_mode",
                f"got {self.batch_mode!r}",
                "TMF-PG needs whole episodes (returns to the horizon); use complete_episodes.")
        observe_mu = (self.env_config or {}).get("observe_mu", True)
        require(observe_mu is True, "env_config.observe_mu", f"got {observe_mu!r}",
                "TMF-PG's policy is pi(a | o, mu): the observation must contain mu (true).")

    @override(AlgorithmConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from rllib_ext.algorithms.tmf_pg.torch.tmf_pg_torch_rl_module import TMFPGTorchRLModule

        # No model_config here: RLlib merges a spec's model_config *over* the user's.
        return RLModuleSpec(module_class=TMFPGTorchRLModule)

    @override(AlgorithmConfig)
    def get_default_learner_class(self):
        from rllib_ext.algorithms.tmf_pg.torch.tmf_pg_torch_learner import TMFPGTorchLearner

        return TMFPGTorchLearner


class TMFPG(Algorithm):
    """See the module docstring."""

    # Shown by the `rllib` CLI on every iteration line.
    progress_metrics = (
        ("return/agent", f"{ENV_RUNNER_RESULTS}/{MEAN_FIELD}/return_per_agent", "{:.4g}"),
        ("exploitability", f"{MEAN_FIELD}/exploitability", "{:.3g}"),
        ("mu-dist", f"{ENV_RUNNER_RESULTS}/{MEAN_FIELD}/mu_l1_distance", "{:.3g}"),
    )

    @classmethod
    @override(Algorithm)
    def get_default_config(cls) -> TMFPGConfig:
        return TMFPGConfig()

    # Project env names ("DynamicQueueing", ...) resolve also when built from Python.
    _get_env_id_and_creator = staticmethod(registry.env_id_and_creator)

    @override(Algorithm)
    def setup(self, config: AlgorithmConfig) -> None:
        super().setup(config)
        env = self.env_creator(EnvContext(self.config.env_config, worker_index=0))
        env = getattr(env, "unwrapped", env)
        if not isinstance(env, MeanFieldEnv):
            raise ValueError(f"TMFPG: env {self.config.env!r} is a {type(env).__name__}, not a "
                             "mean-field env; use ResourceSelection, DynamicQueueing or another "
                             "envs.mean_field.env.MeanFieldEnv.")
        self.population = PopulationView(env, self.config.policy_mapping_fn, self.config.gamma)
        spec = self.config.get_multi_rl_module_spec(
            spaces={mid: (env.observation_spaces[env.possible_agents[0]],
                          env.action_spaces[env.possible_agents[0]])
                    for mid in self.config.policies},
            inference_only=True)
        self._evaluation_module = spec.build()
        self._latest_exact_metrics: dict[str, float] | None = None

    @override(Algorithm)
    def training_step(self) -> None:
        # Outer: the current policy's population -> mu-hat (and the first inner step's batch).
        episodes = self._sample_and_count()
        mu_hat = population_flow([episode.custom_data[MU_HISTORY] for episode in episodes])
        self._update(episodes)
        if self.config.inner_updates > 1:
            # Inner steps 2..K against the fixed mu-hat.
            self._freeze_runners(mu_hat)
            try:
                for _ in range(self.config.inner_updates - 1):
                    self._update(self._sample_and_count())
            finally:
                self._freeze_runners(None)

        # Exact metrics at iterations n, 2n, ... (n = exploitability_interval) and the first
        # after a (re)start; in between the results repeat the latest ones, as Tune's stop
        # criteria, schedulers and searchers need the key in every result.
        interval = self.config.exploitability_interval
        if interval:
            if self._latest_exact_metrics is None or (self.iteration + 1) % interval == 0:
                self._latest_exact_metrics = self.exact_metrics()
            for key, value in self._latest_exact_metrics.items():
                self.metrics.log_value((MEAN_FIELD, key), value, window=1)

    def _sample_and_count(self) -> list:
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            episodes, runner_metrics = self._sample_episodes()
        self.metrics.aggregate(runner_metrics, key=ENV_RUNNER_RESULTS)
        self.metrics.log_value(NUM_AGENT_ACTIONS_LIFETIME,
                               sum(episode.agent_steps() for episode in episodes),
                               reduce="lifetime_sum")
        if any(MU_HISTORY not in episode.custom_data for episode in episodes):
            raise ValueError("TMFPG: sampled episodes carry no custom_data['mu_history']; "
                             "keep MeanFieldMetricsCallback among the config's callbacks.")
        return episodes

    def _update(self, episodes: list) -> None:
        with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
            # Schedules (lr: [[t, value], ...]) count agent actions, not env steps: one env
            # step is N actions when all act and 1 when one acts, so only actions mean the
            # same amount of experience under every activation schedule.
            learner_results = self.learner_group.update(
                episodes=episodes,
                timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: self.metrics.peek(
                    NUM_AGENT_ACTIONS_LIFETIME, default=0)})
        self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)
        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group,
                                               inference_only=True)

    def _freeze_runners(self, flow) -> None:
        self.env_runner_group.foreach_env_runner(
            lambda runner: freeze_mean_field(runner, flow),
            local_env_runner=self.env_runner_group.num_remote_workers() <= 0)

    def exact_metrics(self) -> dict[str, float]:
        """Exploitability (summary, per-state maximum, regularised when entropy_coeff > 0)
        and exact value of the current policy."""
        self._evaluation_module.set_state(self.learner_group.get_weights())
        plain = self.population.evaluate(self._evaluation_module)
        metrics = {
            "exploitability": plain.exploitability,
            "max_gap": plain.max_gap,
            "value": plain.value,
        }
        tau = self.current_entropy_coeff()
        if tau > 0:
            metrics["exploitability_regularized"] = self.population.evaluate(
                self._evaluation_module, tau).exploitability
        return metrics

    def current_entropy_coeff(self) -> float:
        """tau as the learners use it next: the ``entropy_coeff`` schedule at the lifetime
        number of agent actions, the count each learner's scheduler was last updated with
        (the largest over modules)."""
        actions = self.metrics.peek(NUM_AGENT_ACTIONS_LIFETIME, default=0)
        return max(schedule_value(self.config.get_config_for_module(module_id).entropy_coeff,
                                  actions) for module_id in self.population.module_ids)

    def _sample_episodes(self):
        runners = self.env_runner_group
        per_runner = math.ceil(self.config.num_episodes_per_iteration
                               / max(1, runners.num_remote_workers()))
        results = runners.foreach_env_runner(
            lambda runner: (runner.sample(num_episodes=per_runner), runner.get_metrics()),
            local_env_runner=runners.num_remote_workers() <= 0)
        episodes = [episode for result in results for episode in result[0]]
        return episodes, [result[1] for result in results]
