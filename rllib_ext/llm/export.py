"""Export the policy of an RLlib checkpoint as a Hugging Face model folder.

An LLM algorithm's checkpoint (VCPO) holds the learner's ``CausalLMRLModule``; its weights are
the trained model. :func:`export_model` writes them with the base model's config, generation
config and tokenizer into a folder that ``AutoModelForCausalLM.from_pretrained``, vLLM and
``python -m rllib_ext.llm.evaluation --model DIR`` load. No Ray, no engine.

    rllib export runs/EXP/TRIAL/checkpoint_000005 --to exported/
"""

from __future__ import annotations

import json
from pathlib import Path

from ray.rllib.core import (
    COMPONENT_LEARNER,
    COMPONENT_LEARNER_GROUP,
    COMPONENT_RL_MODULE,
    DEFAULT_MODULE_ID,
)

# Written beside the model: where it came from.
EXPORT_INFO_FILE = "rllib_ext_export.json"
_ALGORITHM_MARKER = "rllib_checkpoint.json"


def is_rllib_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is an RLlib checkpoint directory (of an algorithm or an RLModule)."""
    return (Path(path).expanduser() / _ALGORITHM_MARKER).is_file()


def module_checkpoint_dir(checkpoint: str | Path, module_id: str = DEFAULT_MODULE_ID) -> Path:
    """The RLModule inside an algorithm checkpoint (or ``checkpoint`` itself if it is one)."""
    root = Path(checkpoint).expanduser()
    inside = root / COMPONENT_LEARNER_GROUP / COMPONENT_LEARNER / COMPONENT_RL_MODULE / module_id
    if inside.is_dir():
        return inside
    if (root / "module_state.pkl").exists() or (root / "module_state.msgpack").exists():
        return root
    raise FileNotFoundError(
        f"{root} holds no RLModule '{module_id}' (looked for {inside}). Fix: pass a checkpoint "
        "directory of an LLM algorithm run (checkpoint_* in the trial directory).")


def export_model(checkpoint: str | Path, target: str | Path,
                 module_id: str = DEFAULT_MODULE_ID) -> Path:
    """Write the checkpoint's model (weights, config, generation config) and its tokenizer
    into ``target``; returns ``target``."""
    from ray.rllib.core.rl_module.rl_module import RLModule
    from transformers import AutoTokenizer

    module_dir = module_checkpoint_dir(checkpoint, module_id)
    module = RLModule.from_checkpoint(str(module_dir))
    model = getattr(module, "model", None)
    if model is None or not hasattr(model, "save_pretrained"):
        raise TypeError(f"the RLModule in {module_dir} is a {type(module).__name__}, not a "
                        "causal-LM module. Fix: export checkpoints of LLM algorithms (VCPO).")
    target = Path(target).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(module.model_path).save_pretrained(target)
    (target / EXPORT_INFO_FILE).write_text(json.dumps(
        {"checkpoint": str(Path(checkpoint).expanduser().resolve()), "module_id": module_id,
         "base_model": module.model_path}, indent=2))
    return target
