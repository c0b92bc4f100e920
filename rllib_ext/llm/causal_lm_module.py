"""An RLlib TorchRLModule around a Hugging Face causal LM.

It reads the batch layout of :mod:`rllib_ext.llm.log_probs` (built by
:func:`pack_prompt_response`) and its forward pass returns ``response_logp`` [B, R]:
log pi(response token j | prefix) with the logits divided by the sampling temperature, so they
are directly comparable with the engine's behaviour log-probs (:func:`response_log_probs`:
only real response tokens reach the LM head, in chunks).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.rl_module.torch import TorchRLModule

# The batch layout and the log-prob computation are Ray-free (the learner core uses them too).
from rllib_ext.llm.log_probs import LM_BATCH_KEYS, pack_prompt_response, response_log_probs

__all__ = ["LM_BATCH_KEYS", "RESPONSE_LOGP", "CausalLMRLModule", "pack_prompt_response",
           "response_log_probs", "token_spaces"]

RESPONSE_LOGP = "response_logp"


def token_spaces(vocab_size: int, max_prompt_tokens: int, max_response_tokens: int
                 ) -> tuple[gym.Space, gym.Space]:
    """Observation (padded prompt ids) and action (padded response ids) spaces."""
    observation = gym.spaces.Box(0, vocab_size - 1, (max_prompt_tokens,), np.int64)
    action = gym.spaces.Box(0, vocab_size - 1, (max_response_tokens,), np.int64)
    return observation, action


class CausalLMRLModule(TorchRLModule):
    """TorchRLModule whose network is a transformers ``AutoModelForCausalLM``.

    ``model_config``: ``model`` (a path, hub id or "tiny"), ``temperature`` (default 1.0; the
    sampling temperature, so log-probs match the engine's), ``gradient_checkpointing``
    (default False). Generation happens in the env runners' engines, not here: this module only
    scores (prompt, response) batches, for the learner and for tests.
    """

    def setup(self):
        from transformers import AutoModelForCausalLM

        from rllib_ext.llm.tiny import resolve_model

        config = dict(self.model_config or {})
        if "model" not in config:
            raise ValueError("CausalLMRLModule needs model_config['model'] (a local path, a "
                             "Hugging Face hub id, or 'tiny').")
        self.model_path = resolve_model(config["model"])
        self.temperature = float(config.get("temperature", 1.0))
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        if config.get("gradient_checkpointing"):
            self.model.gradient_checkpointing_enable()

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {RESPONSE_LOGP: response_log_probs(self.model, batch, self.temperature)}

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The wrapped model's own state dict (Hugging Face parameter names)."""
        return self.model.state_dict()
