"""A generation-heavy benchmark model, built locally from a config (nothing downloaded).

A Llama of about 22M parameters (hidden 512, 4 layers, 8 heads of 64, MLP 1536) over an
8,192-token vocabulary: the embedded model's 100 character tokens (so the math prompts encode
as usual) plus 8,092 word tokens. Weights are random (seeded) except for one principled setting
that makes responses end on their own: every token embedding carries a constant component
along hidden direction 0, which survives the layers and the final RMSNorm as a roughly
constant feature, and the output row of the end-of-sequence token reads that direction with a
weight calibrated (on random token sequences) so that EOS has probability ``eos_hazard`` at
every step. At temperature 1 response lengths are then geometric, mean ~1 / eos_hazard, with
a long tail that the response limit cuts, as RL's long-tailed lengths are. No warm start: the
other tokens are near uniform, which costs a generation step exactly what a real one costs.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

VOCAB_SIZE = 8192


@dataclass(frozen=True)
class GenerationModelSpec:
    hidden_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    intermediate_size: int = 1536
    eos_hazard: float = 1 / 48
    max_positions: int = 1024
    seed: int = 0

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def build_tokenizer():
    """The embedded character tokenizer's vocabulary plus word tokens up to VOCAB_SIZE."""
    from rllib_ext.llm.tiny import build_char_tokenizer

    return build_char_tokenizer(VOCAB_SIZE)


def calibrate_eos(model, hazard: float, steps: int = 4) -> float:
    """Set the EOS output row's weight on hidden direction 0 so that the mean EOS probability
    over random sequences is ``hazard``; returns that probability."""
    import torch

    from rllib_ext.llm.tiny import BOS_ID, EOS_ID

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, model.config.vocab_size, (16, 256), generator=generator)
    ids[:, 0] = BOS_ID
    head = model.lm_head.weight
    with torch.no_grad():
        feature = model.model.norm(model.model(input_ids=ids).last_hidden_state)[..., 0].mean()
        for _ in range(steps):
            probability = torch.softmax(model(input_ids=ids).logits, -1)[..., EOS_ID].mean()
            log_odds = math.log(hazard / (1 - hazard)) - math.log(probability / (1 - probability))
            head[EOS_ID, 0] += log_odds / feature
    return float(probability)


def build_generation_model(root: Path, spec: GenerationModelSpec = GenerationModelSpec()) -> Path:
    """Build (or reuse) the model under ``root``; returns its directory."""
    import torch
    from filelock import FileLock
    from transformers import LlamaConfig, LlamaForCausalLM

    from rllib_ext.llm.tiny import BOS_ID, EOS_ID, PAD_ID

    target = root / f"bench-llama-{spec.digest()}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "build.json").exists():
            return target
        torch.manual_seed(spec.seed)
        config = LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
            head_dim=spec.hidden_size // spec.num_heads,
            max_position_embeddings=spec.max_positions, bos_token_id=BOS_ID,
            eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False,
            dtype="float32")
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            embedding = model.model.embed_tokens.weight
            embedding[:, 0] = embedding[:, 1:].std() * math.sqrt(spec.hidden_size - 1)
            model.lm_head.weight[:, 0] = 0
        eos_probability = calibrate_eos(model, spec.eos_hazard)
        model.save_pretrained(target)
        build_tokenizer().save_pretrained(target)
        info = {"spec": asdict(spec), "eos_probability": eos_probability,
                "num_parameters": sum(p.numel() for p in model.parameters())}
        (target / "build.json").write_text(json.dumps(info, indent=1))
    return target
