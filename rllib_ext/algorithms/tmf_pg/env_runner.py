"""Env-runner side of TMF-PG: population-scale metrics, the episodes' mu history, and
freezing the mean field of a runner's envs.

RLlib's ``MultiAgentEnvRunner`` logs four counters per agent per env step and one return per
agent per episode; with thousands of agents that is most of the sampling time and thousands
of result keys per iteration. :class:`MeanFieldEnvRunner` keeps everything else and logs
those per module instead. Its episodes (:class:`PopulationEpisode`) check, at each env step,
only the agents that stepped: RLlib's episode re-checks all N agents at every step, O(N) per
step, which with one agent acting per step (``sequential``) was O(N^2) per round.
:class:`MeanFieldMetricsCallback` adds the mean-field metrics of every finished population
episode under ``env_runners/mean_field/`` and stores the episode's empirical flow mu_0..mu_H
in ``episode.custom_data["mu_history"]`` (TMF-PG's mu-hat is estimated from it).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.env.multi_agent_env_runner import MultiAgentEnvRunner
from ray.rllib.env.multi_agent_episode import MultiAgentEpisode
from ray.rllib.utils.metrics import (
    EPISODE_MODULE_RETURN_MEAN,
    NUM_AGENT_STEPS_SAMPLED,
    NUM_AGENT_STEPS_SAMPLED_LIFETIME,
    NUM_ENV_STEPS_SAMPLED,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    NUM_EPISODES,
    NUM_EPISODES_LIFETIME,
    NUM_MODULE_STEPS_SAMPLED,
    NUM_MODULE_STEPS_SAMPLED_LIFETIME,
)

from envs.mean_field.env import MeanFieldEnv
from rllib_ext.algorithms.tmf_pg.population import PopulationView, mu_distance

# Key under which agent-step counts are summed over the whole population (RLlib sums the
# values of the per-agent dict wherever it needs a total).
ALL_AGENTS = "all_agents"
MEAN_FIELD = "mean_field"
MU_HISTORY = "mu_history"


def policy_key(multi_module) -> tuple:
    """Changes whenever the weights of a MultiRLModule's torch modules are replaced or
    modified in place (torch bumps a tensor's version counter at every in-place write,
    ``load_state_dict`` included)."""
    return tuple((module_id, id(p), p._version) for module_id in multi_module.keys()
                 for p in multi_module[module_id].parameters())


def mean_field_envs(env_runner) -> list[MeanFieldEnv]:
    """The mean-field sub-envs of an env runner."""
    env = env_runner.env
    sub_envs = env.envs if hasattr(env, "envs") else [env]
    return [sub.unwrapped for sub in sub_envs if isinstance(sub.unwrapped, MeanFieldEnv)]


def freeze_mean_field(env_runner, flow) -> None:
    """Make every mean-field env of ``env_runner`` play against the fixed flow ``flow``
    ([H+1, O]; None: against its own population again). Takes effect from the next reset,
    which every ``sample(num_episodes=...)`` call starts with."""
    for env in mean_field_envs(env_runner):
        env.freeze_mean_field(flow)


class PopulationEpisode(MultiAgentEpisode):
    """A ``MultiAgentEpisode`` that costs O(acting agents) per env step, not O(N):

    - ``add_env_step`` validates the single-agent episodes of the agents that stepped (got an
      observation or took an action), not those of all N agents;
    - the agents that stepped / are to act are the keys of the latest observations, kept
      as they arrive instead of searched for among all N agents' histories.
    """

    _stepped: frozenset | None = None  # set only while add_env_step runs
    _last_observed: frozenset | None = None  # keys of the latest observations

    def add_env_reset(self, *, observations, **kwargs) -> None:
        super().add_env_reset(observations=observations, **kwargs)
        self._last_observed = frozenset(observations)

    def add_env_step(self, observations, actions, rewards, infos=None, *, terminateds=None,
                     truncateds=None, **kwargs) -> None:
        self._stepped = frozenset(observations) | frozenset(actions)
        try:
            super().add_env_step(observations, actions, rewards, infos,
                                 terminateds=terminateds, truncateds=truncateds, **kwargs)
        finally:
            self._stepped = None
        # Agents with an observation at this env step: those that got one, and those done
        # now, which RLlib gives their last observation again. Others got a skip tag.
        touched = set(observations) | set(rewards) | set(terminateds or {}) \
            | set(truncateds or {})
        if self.is_done:
            touched |= set(self.agent_episodes)
        self._last_observed = frozenset(
            agent_id for agent_id in touched - {"__all__"}
            if agent_id in self.env_t_to_agent_t
            and self.env_t_to_agent_t[agent_id].get(-1) != self.SKIP_ENV_TS_TAG)

    def validate(self) -> None:
        if self._stepped is None:
            super().validate()
            return
        for agent_id in self._stepped:
            if agent_id in self.agent_episodes:
                self.agent_episodes[agent_id].validate()

    def get_agents_that_stepped(self) -> set:
        if self._last_observed is None:
            return super().get_agents_that_stepped()
        return set(self._last_observed)

    def get_agents_to_act(self) -> set:
        if self._last_observed is None:
            return super().get_agents_to_act()
        return {agent_id for agent_id in self._last_observed
                if not self.agent_episodes[agent_id].is_done}


class SampledCounts:
    """The step counters of one ``sample()`` call, summed as the env steps come and logged
    once at its end: RLlib logs six counters per env step, which with one agent acting per
    step was ~12% of the sampling time."""

    def __init__(self):
        self.env_steps = 0
        self.episodes = 0
        self.module_steps = Counter()

    def add(self, env_steps: int, module_ids, episode_done: bool) -> None:
        self.env_steps += env_steps
        self.episodes += int(episode_done)
        self.module_steps.update(module_ids)

    def log_to(self, metrics) -> None:
        """The totals under RLlib's keys and reductions (agent steps summed over the whole
        population, under ``ALL_AGENTS``)."""
        metrics.log_value(NUM_ENV_STEPS_SAMPLED, self.env_steps, reduce="sum")
        metrics.log_value(NUM_ENV_STEPS_SAMPLED_LIFETIME, self.env_steps,
                          reduce="lifetime_sum", with_throughput=True)
        if self.episodes:
            metrics.log_value(NUM_EPISODES, self.episodes, reduce="sum")
            metrics.log_value(NUM_EPISODES_LIFETIME, self.episodes, reduce="lifetime_sum")
        agent_steps = sum(self.module_steps.values())
        if agent_steps:
            for key, reduce in ((NUM_AGENT_STEPS_SAMPLED, "sum"),
                                (NUM_AGENT_STEPS_SAMPLED_LIFETIME, "lifetime_sum")):
                metrics.log_value((key, ALL_AGENTS), agent_steps, reduce=reduce)
        for module_id, count in self.module_steps.items():
            for key, reduce in ((NUM_MODULE_STEPS_SAMPLED, "sum"),
                                (NUM_MODULE_STEPS_SAMPLED_LIFETIME, "lifetime_sum")):
                metrics.log_value((key, module_id), count, reduce=reduce)


class MeanFieldEnvRunner(MultiAgentEnvRunner):
    """A ``MultiAgentEnvRunner`` whose step and episode metrics are per module, not per
    agent (O(#modules) result keys for any population size), counted per ``sample()`` call
    rather than per env step, and whose episodes are :class:`PopulationEpisode` s."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._run_seed, self._seeded_calls = self._seed, 0
        # Filled by _increase_sampled_metrics, which RLlib calls deep inside _sample.
        self._counts = SampledCounts()

    def sample(self, *args, **kwargs):
        # RLlib resets the envs with the run's seed at the start of every
        # sample(num_episodes=...) call, so with a seed every iteration replayed the same
        # activations and moves (all of them with several envs side by side). Each call gets
        # a seed of its own, derived from the run's: still reproducible, no longer repeated.
        if self._run_seed is not None:
            self._seed = int(np.random.SeedSequence(
                [self._run_seed, self._seeded_calls]).generate_state(1)[0] >> 1)
            self._seeded_calls += 1
        return super().sample(*args, **kwargs)

    def _sample(self, **kwargs):
        self._counts = SampledCounts()
        try:
            return super()._sample(**kwargs)
        finally:  # before on_sample_end and get_metrics read them
            self._counts.log_to(self.metrics)

    def _new_episode(self, env_index, episodes=None):
        episodes = episodes if episodes is not None else self._ongoing_episodes
        env = self.env.envs[env_index].unwrapped
        episodes[env_index] = PopulationEpisode(
            observation_space={aid: env.get_observation_space(aid) for aid in env.possible_agents},
            action_space={aid: env.get_action_space(aid) for aid in env.possible_agents},
            agent_to_module_mapping_fn=self.config.policy_mapping_fn)
        self._make_on_episode_callback("on_episode_created", env_index, episodes)

    def _increase_sampled_metrics(self, num_steps, next_obs, episode):
        self._counts.add(num_steps, map(episode.module_for, next_obs), episode.is_done)
        return num_steps

    def _log_episode_metrics(self, length, ret, sec, agents=None, modules=None,
                             agent_steps=None):
        super()._log_episode_metrics(length, ret, sec)
        if modules:
            window = max(1, math.ceil(self.config.metrics_num_episodes_for_smoothing
                                      / (self.config.num_env_runners or 1)))
            self.metrics.log_dict({EPISODE_MODULE_RETURN_MEAN: dict(modules)}, window=window)


class MeanFieldMetricsCallback(RLlibCallback):
    """Per finished episode of a mean-field env, stores ``custom_data["mu_history"]``
    (mu_0..mu_H, [H+1, O]) and, for population episodes (not frozen ones), logs under
    ``env_runners/mean_field/``:

    - ``return_per_agent``: total return / N, the N-agent counterpart of J (idle agents
      and agents that never acted count with what they got);
    - ``reward_per_action``: total return / number of agent actions;
    - ``mu_l1_distance``: mean_t || mu_N(t) - mu(t) ||_1 between the episode's empirical
      distribution and the exact flow of the policy that generated it.

    Each is the mean over the last ``num_episodes_per_iteration`` episodes (TMF-PG) or
    ``metrics_num_episodes_for_smoothing`` (other algorithms).
    """

    def __init__(self):
        super().__init__()
        self._flows = {}  # env runner -> (its PopulationView, policy_key(module), the flow)

    def _exact_flow(self, env_runner, sub_env, rl_module) -> np.ndarray:
        """The exact flow of ``rl_module``'s policy, computed once per runner and policy:
        the sub-envs of a runner share one config, and their episodes (run side by side)
        end under the same weights."""
        key, owner = policy_key(rl_module), id(env_runner)
        view, cached_key, flow = self._flows.get(owner) or (
            PopulationView(sub_env, env_runner.config.policy_mapping_fn), None, None)
        if cached_key != key:
            flow = view.flow(rl_module)
            self._flows[owner] = (view, key, flow)
        return flow

    def on_episode_end(self, *, episode, env_runner=None, metrics_logger=None, env=None,
                       env_index=0, rl_module=None, **kwargs):
        sub_env = env.envs[env_index].unwrapped if hasattr(env, "envs") else env.unwrapped
        if not isinstance(sub_env, MeanFieldEnv):
            return
        episode.custom_data[MU_HISTORY] = sub_env.mu_history.copy()
        if sub_env.frozen or metrics_logger is None:
            return
        total = episode.get_return(include_hanging_rewards=True)
        values = {
            "return_per_agent": total / sub_env.num_agents,
            "reward_per_action": total / max(1, episode.agent_steps()),
        }
        if rl_module is not None:
            values["mu_l1_distance"] = mu_distance(sub_env.mu_history,
                                                   self._exact_flow(env_runner, sub_env,
                                                                    rl_module))
        # Average over the latest iteration's episodes (RLlib's default window is 100).
        config = env_runner.config
        window = getattr(config, "num_episodes_per_iteration",
                         config.metrics_num_episodes_for_smoothing)
        window = max(1, math.ceil(window / (config.num_env_runners or 1)))
        for key, value in values.items():
            metrics_logger.log_value((MEAN_FIELD, key), value, window=window)
