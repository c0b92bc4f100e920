"""An RLlib TorchRLModule around a Hugging Face causal LM, and the batch layout it reads.

Batch layout (built by :func:`pack_prompt_response` from token lists): every row is one
trajectory, prompt followed by response, right-padded to L tokens::

    input_ids       [B, L]  prompt + response + padding
    attention_mask  [B, L]  1 on prompt and response tokens
    response_index  [B, R]  position in input_ids of response token j (0 where j is padding)
    response_mask   [B, R]  1 on real response tokens

The forward pass returns ``response_logp`` [B, R]: log pi(response token j | prefix), from the
logits at position ``response_index - 1`` divided by the sampling temperature, so they are
directly comparable with the engine's behaviour log-probs. The LM head runs only on those
positions (the full [B, L, V] logits tensor is never built).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.rl_module.torch import TorchRLModule

RESPONSE_LOGP = "response_logp"
LM_BATCH_KEYS = ("input_ids", "attention_mask", "response_index", "response_mask")


def pack_prompt_response(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                         response_width: int | None = None) -> dict[str, torch.Tensor]:
    """Lay out (prompt, response) token lists as the batch documented in the module docstring.

    ``response_width`` fixes R (default: the longest response, at least 1).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    width = max([len(r) for r in responses] + [1]) if response_width is None else response_width
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    batch = len(prompts)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    response_index = torch.zeros((batch, width), dtype=torch.long)
    response_mask = torch.zeros((batch, width), dtype=torch.float32)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        if not prompt:
            raise ValueError(f"row {row}: empty prompt (a response needs at least one token "
                             "of context, e.g. <bos>)")
        tokens = list(prompt) + list(response)
        input_ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, :len(tokens)] = 1
        n = min(len(response), width)
        response_index[row, :n] = torch.arange(len(prompt), len(prompt) + n)
        response_mask[row, :n] = 1.0
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "response_index": response_index, "response_mask": response_mask}


def response_log_probs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0
                       ) -> torch.Tensor:
    """Per-token log-probs [B, R] of the response tokens under ``model`` (zero on padding)."""
    decoder = model.get_decoder()
    hidden = decoder(input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"]).last_hidden_state
    index = batch["response_index"]
    # Hidden state at position p predicts token p + 1.
    source = (index - 1).clamp(min=0)
    gathered = hidden.gather(1, source[..., None].expand(-1, -1, hidden.shape[-1]))
    logits = model.get_output_embeddings()(gathered).float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = batch["input_ids"].gather(1, index)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
    return logp * batch["response_mask"]


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
