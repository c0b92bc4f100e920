"""The seam between LLM rollouts and what is learned: a :class:`Task`.

An LLM env runner asks its task for prompts (token ids, and the dataset row each came from),
generates completions, and asks the task to score them; it knows nothing else about the task.
``envs.math.env.MathEnv`` is the project's task (math datasets, user files with a prompt
column or chat messages, reward functions). Any class with these methods works as
``config.env``: RLlib's env creator builds it with an ``EnvContext`` holding the user's
``env_config`` plus :data:`RUNNER_KEYS`, set by the runner.

Rewards follow TRL's convention (:mod:`rllib_ext.llm.rewards`): functions
``f(prompts, completions, **columns) -> list[float]``, weighted and summed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

# env_config keys the env runner sets when it builds a task (the user does not):
#   tokenizer          model directory whose tokenizer encodes the prompts (the engine's)
#   max_prompt_tokens  longest prompt in tokens; longer ones are skipped (and counted)
#   split              dataset split: "train", or the evaluation split
#   shuffle            a seeded permutation per epoch (training) or dataset order (evaluation)
RUNNER_KEYS = ("tokenizer", "max_prompt_tokens", "split", "shuffle")


@dataclass(frozen=True)
class TaskPrompt:
    """One prompt: what the model sees (``token_ids``) and the dataset ``row`` it came from
    (``uid``, ``prompt`` and the other columns; see :mod:`rllib_ext.llm.columns`)."""

    token_ids: list[int]
    row: Mapping[str, Any]


@dataclass
class Scores:
    """The task's verdict on a batch of completions (one entry per completion).

    ``rewards``: the weighted sum of the reward functions. ``per_function``: each function's
    own values by name (None where a function does not apply). ``correct``: whether the answer
    is right, for tasks that know (accuracy metrics; None otherwise). ``counts``: events to
    add up in the metrics (e.g. ``no_answer``). ``infos``: per-completion details for the
    episode's info dict.
    """

    rewards: list[float]
    per_function: dict[str, list[float | None]]
    correct: list[bool] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    infos: list[dict] | None = None


@runtime_checkable
class Task(Protocol):
    """What an LLM env runner needs from its environment (see the module docstring)."""

    # This task's prompts (its shard of the split), in dataset order; evaluation reads these.
    prompts: Sequence[TaskPrompt]

    def next_prompts(self, count: int) -> list[TaskPrompt]:
        """The next ``count`` prompts in training order (a new epoch reshuffles)."""

    def decode(self, token_ids: list[int]) -> str:
        """The text of a completion (stops at end-of-sequence, no padding)."""

    def score(self, prompts: Sequence[TaskPrompt], completions: Sequence[str]) -> Scores:
        """Rewards of ``completions[i]``, generated for ``prompts[i]``."""

    def get_state(self) -> dict:
        """The position in the data, so that a resumed run neither replays nor skips."""

    def set_state(self, state: dict) -> None: ...

    def close(self) -> None: ...
