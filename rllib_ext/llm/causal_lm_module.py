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
    for row, prompt in enumerate(prompts):
        if not len(prompt):
            raise ValueError(f"row {row}: empty prompt (a response needs at least one token "
                             "of context, e.g. <bos>)")
    width = max([len(r) for r in responses] + [1]) if response_width is None else response_width
    prompt_lengths = np.array([len(p) for p in prompts])
    response_lengths = np.minimum([len(r) for r in responses], width)
    total = prompt_lengths + np.array([len(r) for r in responses])
    input_ids = np.full((len(prompts), total.max()), pad_id, dtype=np.int64)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        input_ids[row, :total[row]] = np.concatenate([prompt, response])
    columns = np.arange(input_ids.shape[1])
    attention_mask = (columns[None, :] < total[:, None]).astype(np.int64)
    response_mask = np.arange(width)[None, :] < response_lengths[:, None]
    response_index = np.where(response_mask, prompt_lengths[:, None] + np.arange(width), 0)
    return {"input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "response_index": torch.from_numpy(response_index.astype(np.int64)),
            "response_mask": torch.from_numpy(response_mask.astype(np.float32))}


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
