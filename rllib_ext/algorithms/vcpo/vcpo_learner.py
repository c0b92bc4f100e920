"""Framework-agnostic part of the VCPO learner: its batch pipeline and how a train batch is
shared among several learners (metric names: ``learner_metrics``)."""

from __future__ import annotations

from ray.rllib.connectors.common import NumpyToTensor
from ray.rllib.core.learner.learner import Learner

from rllib_ext.llm.env_runner import GROUP_ID
from rllib_ext.llm.learner_connector import LLMEpisodesToBatch


class VCPOLearner(Learner):
    """Replaces RLlib's default learner pipeline with the causal-LM batch builder."""

    def build(self) -> None:
        super().build()
        self._learner_connector.append(LLMEpisodesToBatch())
        self._learner_connector.append(NumpyToTensor(as_learner_connector=True,
                                                     device=self._device))


def group_shards(episodes: list, num_shards: int) -> list[list]:
    """The episodes as ``num_shards`` lists of whole groups (in order, contiguous groups per
    shard, group counts differing by at most one).

    RLlib's ``LearnerGroup.update(episodes=...)`` splits a list by length without knowing
    groups; VCPO's baselines need each group on one learner. Pass the shards as
    ``episodes_refs=[ray.put(shard) for shard in shards]`` (one reference per learner)."""
    groups: dict[int, list] = {}
    for episode in episodes:
        groups.setdefault(int(episode.get_extra_model_outputs(GROUP_ID, 0)), []).append(episode)
    if len(groups) < num_shards:
        raise ValueError(f"{len(groups)} groups cannot be shared among {num_shards} learners "
                         "(each needs at least one whole group). Fix: raise "
                         "train_batch_size_per_learner or lower num_learners.")
    ordered = list(groups.values())
    shards, start = [], 0
    for shard in range(num_shards):
        count = len(ordered) // num_shards + (shard < len(ordered) % num_shards)
        shards.append([e for group in ordered[start:start + count] for e in group])
        start += count
    return shards
