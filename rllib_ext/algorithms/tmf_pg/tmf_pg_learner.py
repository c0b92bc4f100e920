"""Framework-agnostic part of the TMF-PG learner: the advantage connector and the entropy
coefficient's schedule."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import Learner
from ray.rllib.utils.annotations import override
from ray.rllib.utils.lambda_defaultdict import LambdaDefaultDict
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME
from ray.rllib.utils.schedules.scheduler import Scheduler

from rllib_ext.algorithms.tmf_pg.returns import (
    activation_discounts,
    baseline_groups,
    leave_one_out_baseline,
    returns_to_go,
)

REWARD_RETURNS = "reward_returns"
REWARD_ADVANTAGES = "reward_advantages"
LOGP_ADVANTAGES = "logp_advantages"
DISCOUNTS = "activation_discounts"
ENTROPY_COEFF = "entropy_coeff"


def schedule_value(value_or_schedule, timestep: float) -> float:
    """A fixed value, or a ``[[t, v], ...]`` schedule's piecewise-linear value at ``timestep``
    (its last value past the end): what RLlib's ``Scheduler`` holds after ``update``."""
    return float(Scheduler(value_or_schedule).update(timestep))


class MeanFieldAdvantages(ConnectorV2):
    """Learner connector adding the columns ``reward_returns`` R, ``reward_advantages``
    R - b(R), ``logp_advantages`` L - b(L) and ``activation_discounts`` gamma^j; the loss
    forms the soft advantage G - b(G) = (R - b(R)) - tau (L - b(L)) with the current tau.

    Works per agent episode (the agent's own activation steps, whatever the schedule) and
    then per module: R and L from :func:`returns_to_go` with the behaviour log-probs the env
    runner stored, baselines from :func:`leave_one_out_baseline` over groups (activation
    index j, own observation o), weight gamma^j from :func:`activation_discounts`. The own
    observation is the argmax of the first O entries of the observation ``[onehot(o), mu]``
    (O = half the observation size), which is the layout of the mean-field envs.
    """

    def __init__(self, input_observation_space=None, input_action_space=None, *,
                 gamma: float):
        super().__init__(input_observation_space, input_action_space)
        self.gamma = gamma

    def __call__(self, *, rl_module, episodes, batch: dict[str, Any], **kwargs):
        per_episode = []
        by_module = defaultdict(lambda: ([], [], []))  # module_id -> (R, L, groups)
        for episode in self.single_agent_episode_iterator(episodes,
                                                          agents_that_stepped_only=False):
            length = len(episode)
            observations = np.asarray(episode.get_observations(slice(0, length)))
            size = observations.shape[1] // 2
            own = observations[:, :size].argmax(axis=1)
            reward_to_go, logp_to_go = returns_to_go(
                episode.get_rewards(), episode.get_extra_model_outputs(Columns.ACTION_LOGP),
                self.gamma)
            module_rewards, module_logps, module_groups = by_module[episode.module_id]
            start = sum(map(len, module_rewards))
            module_rewards.append(reward_to_go)
            module_logps.append(logp_to_go)
            module_groups.append(baseline_groups(np.arange(length), own, size))
            per_episode.append((episode, episode.module_id, start, length))
            self.add_n_batch_items(batch, DISCOUNTS,
                                   activation_discounts(length, self.gamma).astype(np.float32),
                                   num_items=length, single_agent_episode=episode)

        columns = {}
        for module_id, (module_rewards, module_logps, module_groups) in by_module.items():
            groups = np.concatenate(module_groups)
            rewards, logps = np.concatenate(module_rewards), np.concatenate(module_logps)
            columns[module_id] = {
                REWARD_RETURNS: rewards,
                REWARD_ADVANTAGES: rewards - leave_one_out_baseline(rewards, groups),
                LOGP_ADVANTAGES: logps - leave_one_out_baseline(logps, groups),
            }

        for episode, module_id, start, length in per_episode:
            for column, values in columns[module_id].items():
                self.add_n_batch_items(batch, column,
                                       values[start:start + length].astype(np.float32),
                                       num_items=length, single_agent_episode=episode)
        return batch


class TMFPGLearner(Learner):
    """Prepends :class:`MeanFieldAdvantages` to the learner connector pipeline and keeps one
    entropy-coefficient :class:`Scheduler` per module (a fixed tau or a ``[[t, tau], ...]``
    schedule, t counted like the lr schedule's), as RLlib's PPO learner does."""

    @override(Learner)
    def build(self) -> None:
        super().build()
        self.entropy_coeff_schedulers_per_module = LambdaDefaultDict(
            lambda module_id: Scheduler(
                fixed_value_or_schedule=self.config.get_config_for_module(
                    module_id).entropy_coeff,
                framework=self.framework, device=self._device))
        if self._learner_connector is not None \
                and self.config.add_default_connectors_to_learner_pipeline:
            self._learner_connector.prepend(MeanFieldAdvantages(gamma=self.config.gamma))

    @override(Learner)
    def remove_module(self, module_id, **kwargs):
        spec = super().remove_module(module_id, **kwargs)
        self.entropy_coeff_schedulers_per_module.pop(module_id, None)
        return spec

    @override(Learner)
    def after_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        super().after_gradient_based_update(timesteps=timesteps)
        for module_id in self.module.keys():
            value = self.entropy_coeff_schedulers_per_module[module_id].update(
                timestep=timesteps.get(NUM_ENV_STEPS_SAMPLED_LIFETIME, 0))
            self.metrics.log_value((module_id, ENTROPY_COEFF), value, window=1)
