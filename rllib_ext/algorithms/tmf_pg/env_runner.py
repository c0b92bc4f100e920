"""Env-runner side of TMF-PG: population-scale metrics, the episodes' mu history, and
freezing the mean field of a runner's envs.

RLlib's ``MultiAgentEnvRunner`` logs four counters per agent per env step and one return per
agent per episode; with thousands of agents that is most of the sampling time and thousands
of result keys per iteration. :class:`MeanFieldEnvRunner` keeps everything else and logs
those per module instead. :class:`MeanFieldMetricsCallback` adds the mean-field metrics of
every finished population episode under ``env_runners/mean_field/`` and stores the episode's
empirical flow mu_0..mu_H in ``episode.custom_data["mu_history"]`` (TMF-PG's mu-hat is
estimated from it).
"""

from __future__ import annotations

import math
from collections import Counter

from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.env.multi_agent_env_runner import MultiAgentEnvRunner
from ray.rllib.utils.metrics import (
    EPISODE_MODULE_RETURN_MEAN,
    NUM_AGENT_STEPS_SAMPLED,
    NUM_AGENT_STEPS_SAMPLED_LIFETIME,
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


class MeanFieldEnvRunner(MultiAgentEnvRunner):
    """A ``MultiAgentEnvRunner`` whose step and episode metrics are per module, not per
    agent (O(#modules) result keys for any population size)."""

    def _increase_sampled_metrics(self, num_steps, next_obs, episode):
        super()._increase_sampled_metrics(num_steps, {}, episode)
        if not next_obs:
            return num_steps
        for key, reduce in ((NUM_AGENT_STEPS_SAMPLED, "sum"),
                            (NUM_AGENT_STEPS_SAMPLED_LIFETIME, "lifetime_sum")):
            self.metrics.log_value((key, ALL_AGENTS), len(next_obs), reduce=reduce)
        for module_id, count in Counter(map(episode.module_for, next_obs)).items():
            for key, reduce in ((NUM_MODULE_STEPS_SAMPLED, "sum"),
                                (NUM_MODULE_STEPS_SAMPLED_LIFETIME, "lifetime_sum")):
                self.metrics.log_value((key, module_id), count, reduce=reduce)
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
        self._views = {}

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
            view = self._views.get(id(sub_env))
            if view is None:
                view = self._views[id(sub_env)] = PopulationView(
                    sub_env, env_runner.config.policy_mapping_fn)
            values["mu_l1_distance"] = mu_distance(sub_env.mu_history, view.flow(rl_module))
        # Average over the latest iteration's episodes (RLlib's default window is 100).
        config = env_runner.config
        window = getattr(config, "num_episodes_per_iteration",
                         config.metrics_num_episodes_for_smoothing)
        window = max(1, math.ceil(window / (config.num_env_runners or 1)))
        for key, value in values.items():
            metrics_logger.log_value((MEAN_FIELD, key), value, window=window)
