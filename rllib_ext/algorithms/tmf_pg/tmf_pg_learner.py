"""Framework-agnostic part of the TMF-PG learner: the advantage connector."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import Learner
from ray.rllib.utils.annotations import override

from rllib_ext.algorithms.tmf_pg.returns import (
    activation_discounts,
    baseline_groups,
    leave_one_out_baseline,
    soft_returns_to_go,
)

ADVANTAGES = "advantages"
SOFT_RETURNS = "soft_returns"
DISCOUNTS = "activation_discounts"


class MeanFieldAdvantages(ConnectorV2):
    """Learner connector adding ``soft_returns``, ``advantages`` and
    ``activation_discounts`` columns.

    Works per agent episode (the agent's own activation steps, whatever the schedule) and
    then per module: G from :func:`soft_returns_to_go` with the behaviour log-probs the env
    runner stored, baseline from :func:`leave_one_out_baseline` over groups (activation
    index j, own observation o), weight gamma^j from :func:`activation_discounts`. The own
    observation is the argmax of the first O entries of the observation ``[onehot(o), mu]``
    (O = half the observation size), which is the layout of the mean-field envs.
    """

    def __init__(self, input_observation_space=None, input_action_space=None, *, gamma: float,
                 entropy_coeff: float):
        super().__init__(input_observation_space, input_action_space)
        self.gamma = gamma
        self.entropy_coeff = entropy_coeff

    def __call__(self, *, rl_module, episodes, batch: dict[str, Any], **kwargs):
        per_episode = []
        by_module = defaultdict(lambda: ([], []))  # module_id -> (returns, groups)
        for episode in self.single_agent_episode_iterator(episodes,
                                                          agents_that_stepped_only=False):
            length = len(episode)
            observations = np.asarray(episode.get_observations(slice(0, length)))
            size = observations.shape[1] // 2
            own = observations[:, :size].argmax(axis=1)
            returns = soft_returns_to_go(
                episode.get_rewards(),
                episode.get_extra_model_outputs(Columns.ACTION_LOGP),
                self.gamma, self.entropy_coeff)
            groups = baseline_groups(np.arange(length), own, size)
            module_returns, module_groups = by_module[episode.module_id]
            start = sum(map(len, module_returns))
            module_returns.append(returns)
            module_groups.append(groups)
            per_episode.append((episode, episode.module_id, start, length))
            self.add_n_batch_items(batch, DISCOUNTS,
                                   activation_discounts(length, self.gamma).astype(np.float32),
                                   num_items=length, single_agent_episode=episode)

        advantages = {}
        for module_id, (module_returns, module_groups) in by_module.items():
            returns = np.concatenate(module_returns)
            baseline = leave_one_out_baseline(returns, np.concatenate(module_groups))
            advantages[module_id] = (returns, returns - baseline)

        for episode, module_id, start, length in per_episode:
            returns, advantage = advantages[module_id]
            for column, values in ((SOFT_RETURNS, returns), (ADVANTAGES, advantage)):
                self.add_n_batch_items(batch, column,
                                       values[start:start + length].astype(np.float32),
                                       num_items=length, single_agent_episode=episode)
        return batch


class TMFPGLearner(Learner):
    """Prepends :class:`MeanFieldAdvantages` to the learner connector pipeline."""

    @override(Learner)
    def build(self) -> None:
        super().build()
        if self._learner_connector is not None \
                and self.config.add_default_connectors_to_learner_pipeline:
            self._learner_connector.prepend(MeanFieldAdvantages(
                gamma=self.config.gamma, entropy_coeff=self.config.entropy_coeff))
