"""vLLM messages that this project's way of using the engine makes on purpose, dropped.

Every in-place weight load logs three lines (about 550 times in the demo), one of them a
warning that reads like a failed sync; the engine is built without a tokenizer (prompts and
responses travel as token ids), which vLLM reports once with a traceback. None of them says
anything is wrong:

- ``RotaryEmbedding: Failed to load weights``: the rotary embedding holds only a computed
  cos/sin buffer, which no checkpoint contains; vLLM puts the existing buffer back.
- ``Reloading weights inplace...``, ``Reloading and processing weights took ...``,
  ``Successfully reset prefix cache``: the weight load and the prefix-cache reset after it
  (the env runner measures the sync itself: ``env_runners/weight_sync_time_s``).
- ``Chat template warmup failed`` (with a traceback) and ``Using None for BOS/EOS token id``:
  ``skip_tokenizer_init=True``; the end-of-sequence token comes from the model's
  generation config instead.
"""

from __future__ import annotations

import logging

# logger -> messages (format strings, matched by their start) dropped from it.
EXPECTED_MESSAGES = {
    "vllm.model_executor.model_loader.reload.layerwise": ("%s: Failed to load weights",),
    "vllm.model_executor.model_loader.reload.inplace": (
        "Reloading weights inplace", "Reloading and processing weights took"),
    "vllm.v1.core.block_pool": ("Successfully reset prefix cache",),
    "vllm.renderers.base": (
        "Chat template warmup failed",
        "Using None for BOS token id because tokenizer is not initialized",
        "Using None for EOS token id because tokenizer is not initialized"),
}
# The only layer whose "failed to load" is expected (see the module docstring).
EXPECTED_LOAD_FAILURES = ("RotaryEmbedding",)


class ExpectedVLLMMessages(logging.Filter):
    """Drops the records of one logger whose message starts with one of ``messages``."""

    def __init__(self, messages: tuple[str, ...]):
        super().__init__()
        self.messages = messages

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if not message.startswith(self.messages):
            return True
        if message == "%s: Failed to load weights":
            return not (record.args and record.args[0] in EXPECTED_LOAD_FAILURES)
        return False


def drop_expected_vllm_messages() -> None:
    """Install :class:`ExpectedVLLMMessages` on the vLLM loggers that emit them (this process;
    idempotent). On the loggers, not on vLLM's handlers: vLLM may configure its handlers again
    when an engine starts."""
    for name, messages in EXPECTED_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, ExpectedVLLMMessages) for f in logger.filters):
            logger.addFilter(ExpectedVLLMMessages(messages))
