"""Learner connector: LLM episodes (one response each) -> the causal-LM training batch.

Output columns per module (numpy, one row per trajectory, rows ordered as the episodes come,
i.e. group by group — minibatches of whole groups stay contiguous):

    input_ids, attention_mask, response_index, response_mask   (see llm.log_probs)
    behaviour_logp  [B, R]   the engine's per-token log-probs (0 on padding)
    rewards         [B]      group_id [B]      weights_seq_no [B] (policy version of the sample)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

from rllib_ext.llm.columns import BEHAVIOUR_LOGP, GROUP_ID, PROMPT_LENGTH, RESPONSE_LENGTH
from rllib_ext.llm.log_probs import pack_prompt_response


def episodes_to_lm_batch(episodes: list, pad_id: int = 0) -> dict[str, np.ndarray]:
    """The columns listed in the module docstring, from finished single-step LLM episodes."""
    prompts, responses, behaviour, rewards, groups, versions = [], [], [], [], [], []
    for episode in episodes:
        outputs = {key: episode.get_extra_model_outputs(key, 0) for key in
                   (BEHAVIOUR_LOGP, RESPONSE_LENGTH, PROMPT_LENGTH, GROUP_ID, WEIGHTS_SEQ_NO)}
        length = int(outputs[RESPONSE_LENGTH])
        prompts.append(episode.get_observations(0)[:int(outputs[PROMPT_LENGTH])].tolist())
        responses.append(episode.get_actions(0)[:length].tolist())
        behaviour.append(np.asarray(outputs[BEHAVIOUR_LOGP], dtype=np.float32))
        rewards.append(float(episode.get_rewards(0)))
        groups.append(int(outputs[GROUP_ID]))
        versions.append(int(outputs[WEIGHTS_SEQ_NO]))
    width = behaviour[0].shape[0]
    batch = {k: v.numpy() for k, v in pack_prompt_response(prompts, responses, pad_id,
                                                           response_width=width).items()}
    batch.update({
        BEHAVIOUR_LOGP: np.stack(behaviour) * batch["response_mask"],
        Columns.REWARDS: np.asarray(rewards, dtype=np.float32),
        GROUP_ID: np.asarray(groups, dtype=np.int64),
        WEIGHTS_SEQ_NO: np.asarray(versions, dtype=np.int64),
    })
    return batch


class LLMEpisodesToBatch(ConnectorV2):
    """Builds the single-module LM batch; replaces RLlib's default learner pipeline."""

    def __call__(self, *, rl_module, batch: dict[str, Any], episodes, explore=None,
                 shared_data=None, metrics=None, **kwargs):
        module_id = next(iter(rl_module.keys())) if hasattr(rl_module, "keys") \
            else DEFAULT_MODULE_ID
        batch[module_id] = episodes_to_lm_batch(list(episodes))
        return batch
