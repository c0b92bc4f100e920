"""MathEnv: the project's LLM task (:class:`rllib_ext.llm.task.Task`) over a prompt dataset.

A dataset of rows (:mod:`envs.math.datasets`: the embedded arithmetic task, GSM8K, MATH, or any
JSONL/JSON/Parquet file or Hugging Face dataset with a prompt column or chat ``messages``) and
reward functions in TRL's convention (:mod:`rllib_ext.llm.rewards`); the default reward is the
built-in math answer check (:mod:`envs.math.rewards`), so with no settings it is a math task.

env_config keys (defaults in brackets):
    dataset            the dataset, see envs.math.datasets.load_rows [{"name": "arithmetic"}]
    reward_funcs       "package.module:function" names [["envs.math.rewards:math_answer"]]
    reward_weights     one weight per reward function [all 1.0]
    prompt_template    text prompts: a format string over the row's columns ["{prompt}"]
    system_prompt      a system message before the conversation (chat template needed) [None]
    use_chat_template  wrap text prompts as a user message in the tokenizer's chat template;
                       chat rows (a list of messages) always use it [False]
    answer_style       math reward: how the final answer is extracted (see AnswerChecker);
                       default by dataset: arithmetic "plain", gsm8k "gsm8k", math "boxed",
                       else "auto"
    checker_timeout_s  math reward: per-answer math-verify timeout [5.0]
    answer_verifier    math reward: "module:function" (predicted, gold) -> bool replacing
                       math-verify, e.g. for custom answer types [None]
    seed               seed of the per-epoch shuffle [0]
The env runner adds ``tokenizer``, ``max_prompt_tokens``, ``split`` and ``shuffle``
(:data:`rllib_ext.llm.task.RUNNER_KEYS`). Prompts are sharded across env runners by
``worker_index``; :meth:`get_state`/:meth:`set_state` carry the position in the data (epoch,
index), so a resumed run neither replays nor skips prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from envs.math.datasets import dataset_name, load_rows, unreachable_hub_note
from envs.math.grading import STYLES, AnswerChecker, Grade
from envs.math.rewards import MATH_ANSWER
from envs.validation import ConfigError, check_known_keys
from rllib_ext.llm.columns import ANSWER, PROMPT
from rllib_ext.llm.rewards import (
    RewardFunctionError,
    check_columns,
    load_reward_functions,
    weighted_rewards,
)
from rllib_ext.llm.task import RUNNER_KEYS, Scores, TaskPrompt

DEFAULT_ANSWER_STYLE = {"arithmetic": "plain", "gsm8k": "gsm8k", "math": "boxed"}
REPLACEMENT_CHARACTER = "\ufffd"
USER_KEYS = ("dataset", "reward_funcs", "reward_weights", "prompt_template", "system_prompt",
             "use_chat_template", "answer_style", "checker_timeout_s", "answer_verifier", "seed")


@dataclass(frozen=True)
class MathEnvSettings:
    """The validated env_config (see the module docstring)."""

    dataset: dict
    reward_funcs: tuple[str, ...]
    reward_weights: tuple[float, ...] | None
    prompt_template: str
    system_prompt: str | None
    use_chat_template: bool
    answer_style: str
    checker_timeout_s: float
    answer_verifier: str | None
    seed: int

    @classmethod
    def from_config(cls, config: Mapping) -> MathEnvSettings:
        """Validate the user's keys (and the runner's, when present); ConfigError otherwise."""
        check_known_keys(config, (*USER_KEYS, *RUNNER_KEYS), "MathEnv", listed=USER_KEYS)
        dataset = config.get("dataset") or {"name": "arithmetic"}
        if not isinstance(dataset, Mapping):
            raise ConfigError("dataset", f"got {dataset!r}",
                              "write a mapping such as {name: arithmetic} or {path: data.jsonl}")
        funcs = config.get("reward_funcs", [MATH_ANSWER])
        if isinstance(funcs, str):
            funcs = [funcs]
        style = config.get("answer_style") or DEFAULT_ANSWER_STYLE.get(dataset_name(dataset),
                                                                       "auto")
        if style not in STYLES:
            raise ConfigError("answer_style", f"got {style!r}", f"use one of {', '.join(STYLES)}")
        timeout = config.get("checker_timeout_s", 5.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigError("checker_timeout_s", f"got {timeout!r}",
                              "use a positive number of seconds")
        verifier = config.get("answer_verifier")
        if verifier is not None and (not isinstance(verifier, str) or ":" not in verifier):
            raise ConfigError("answer_verifier", f"got {verifier!r}",
                              "write 'package.module:function' of a (predicted, gold) -> bool")
        texts = {key: config.get(key, default) for key, default in
                 (("prompt_template", "{prompt}"), ("system_prompt", None))}
        for key, value in texts.items():
            if value is not None and not isinstance(value, str):
                raise ConfigError(key, f"got {value!r}", "use a string")
        for key in ("use_chat_template",):
            if not isinstance(config.get(key, False), bool):
                raise ConfigError(key, f"got {config[key]!r}", "use true or false")
        seed = config.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError("seed", f"got {seed!r}", "use an integer")
        weights = config.get("reward_weights")
        return cls(dict(dataset), tuple(funcs), None if weights is None else tuple(weights),
                   texts["prompt_template"], texts["system_prompt"],
                   bool(config.get("use_chat_template", False)), style, float(timeout), verifier,
                   seed)

    def reward_functions(self):
        try:
            return load_reward_functions(list(self.reward_funcs), self.reward_weights)
        except RewardFunctionError as e:
            raise ConfigError("reward_funcs", e.problem, e.fix) from None


class MathEnv:
    """A :class:`~rllib_ext.llm.task.Task`: prompts from a dataset, rewards from reward
    functions (see the module docstring)."""

    def __init__(self, config: Mapping | None = None):
        from transformers import AutoTokenizer

        from rllib_ext.llm.tiny import resolve_model

        # RLlib passes an EnvContext: a dict that also carries the env runner's index.
        worker_index = int(getattr(config, "worker_index", 0) or 0)
        num_workers = int(getattr(config, "num_workers", 0) or 0)
        config = dict(config or {})
        self.settings = settings = MathEnvSettings.from_config(config)
        self.split = config.get("split", "train")
        self.shuffle = bool(config.get("shuffle", True))
        self.max_prompt_tokens = int(config.get("max_prompt_tokens", 64))
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.get("tokenizer",
                                                                                "tiny")))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        self.reward_functions = settings.reward_functions()
        self.math_reward = next((f.name for f in self.reward_functions if f.path == MATH_ANSWER),
                                None)
        self.checker = AnswerChecker(style=settings.answer_style,
                                     timeout_s=settings.checker_timeout_s,
                                     verifier=settings.answer_verifier) \
            if self.math_reward else None

        loaded = load_rows(settings.dataset, self.split)
        self.notes = list(loaded.notes)
        self.skipped_rows = loaded.skipped_rows
        rows = loaded.rows
        if num_workers > 1 and worker_index >= 1:
            rows = rows[worker_index - 1::num_workers]
        check_rows(settings, rows, self.reward_functions)
        self.prompts: list[TaskPrompt] = []
        self.prompts_too_long = 0
        for row in rows:
            ids = self.encode_prompt(row)
            if len(ids) > self.max_prompt_tokens:
                self.prompts_too_long += 1
                continue
            self.prompts.append(TaskPrompt(ids, row))
        if not self.prompts:
            raise ConfigError(
                "dataset", f"no usable prompts in split '{self.split}' of {loaded.source} "
                f"({len(rows)} rows, {self.prompts_too_long} longer than max_prompt_tokens="
                f"{self.max_prompt_tokens})", "raise max_prompt_tokens or check the dataset")
        if self.prompts_too_long:
            self.notes.append(f"{self.prompts_too_long} of {len(rows)} prompts of split "
                              f"'{self.split}' are longer than max_prompt_tokens="
                              f"{self.max_prompt_tokens} and are skipped")
        self.epoch, self.position = 0, 0
        self.order = self._permutation(0)

    # ------------------------------------------------------------------ prompts and data order

    def encode_prompt(self, row: Mapping[str, Any]) -> list[int]:
        """Token ids of a row's prompt: the template applied to text prompts, the tokenizer's
        chat template to conversations (and to text with use_chat_template / a system prompt)."""
        prompt = row[PROMPT]
        settings = self.settings
        if isinstance(prompt, str):
            text = settings.prompt_template.format_map(row)
            if not (settings.use_chat_template or settings.system_prompt):
                return self.tokenizer(text).input_ids
            messages = [{"role": "user", "content": text}]
        else:
            messages = list(prompt)
        if settings.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": settings.system_prompt}, *messages]
        if not self.tokenizer.chat_template:
            raise ConfigError(
                "use_chat_template", "the model's tokenizer has no chat template, which chat "
                "rows, use_chat_template and system_prompt need",
                "use a chat model (llm_model), or text prompts without system_prompt")
        return list(self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.prompts))
        return np.random.default_rng([self.settings.seed, epoch]).permutation(len(self.prompts))

    def next_prompts(self, count: int) -> list[TaskPrompt]:
        """The next ``count`` prompts in this epoch's order (a new epoch reshuffles)."""
        chosen = []
        for _ in range(count):
            if self.position >= len(self.order):
                self.epoch += 1
                self.position = 0
                self.order = self._permutation(self.epoch)
            chosen.append(self.prompts[int(self.order[self.position])])
            self.position += 1
        return chosen

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.order = self._permutation(self.epoch)
        self.position = int(state["position"])

    # ------------------------------------------------------------------ scoring

    def decode(self, token_ids: list[int]) -> str:
        """Text of a completion: stops at the end-of-sequence token, drops padding."""
        ids = list(token_ids)
        eos = self.tokenizer.eos_token_id
        if eos in ids:
            ids = ids[:ids.index(eos)]
        while ids and ids[-1] == self.pad_id:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def score(self, prompts: Sequence[TaskPrompt], completions: Sequence[str]) -> Scores:
        rows = [p.row for p in prompts]
        grades: list[Grade] | None = None
        given = {}
        if self.math_reward:
            grades = self.checker.grade_many(list(completions),
                                             [str(row.get(ANSWER, "")) for row in rows])
            given[self.math_reward] = [grade.reward for grade in grades]
        rewards, per_function = weighted_rewards(self.reward_functions, rows, completions, given)
        infos = [{"empty": not text.strip(), "non_utf8": REPLACEMENT_CHARACTER in text}
                 for text in completions]
        if grades is None:
            return Scores(rewards, per_function, infos=infos)
        for info, grade in zip(infos, grades, strict=True):
            info.update(correct=grade.correct, extracted=grade.extracted,
                        checker_failure=grade.failure)
        counts = {"no_answer": sum(g.no_answer for g in grades),
                  "checker_timeouts": sum(g.failure == "timeout" for g in grades),
                  "checker_errors": sum(g.failure == "error" for g in grades)}
        return Scores(rewards, per_function, correct=[g.correct for g in grades], counts=counts,
                      infos=infos)

    def close(self):
        if self.checker is not None:
            self.checker.close()

    # ------------------------------------------------------------------ checks before a run

    @classmethod
    def check_config(cls, config: Mapping, eval_split: str | None = None) -> list[str]:
        """Everything that can be checked before a run starts, for the user's ``config``
        (with the runner's keys where they are known: a ``tokenizer`` that is a local model
        lets the prompts be encoded and measured too). Raises ConfigError (a ValueError);
        returns notes for the user (held-out rows, skipped prompts)."""
        splits = ["train", *([eval_split] if eval_split else [])]
        settings = MathEnvSettings.from_config(config)
        unreachable = unreachable_hub_note(settings.dataset)
        if unreachable:
            return [unreachable]
        if "tokenizer" in config:
            notes = []
            for split in splits:
                env = cls({**config, "split": split, "shuffle": False})
                notes += env.notes
                env.close()
            return notes
        reward_functions = settings.reward_functions()
        notes = []
        for split in splits:
            loaded = load_rows(settings.dataset, split)
            check_rows(settings, loaded.rows, reward_functions)
            notes += loaded.notes
        return notes


def check_rows(settings: MathEnvSettings, rows: list[dict], reward_functions) -> None:
    """The rows suit the settings: every reward function finds the columns it needs, the
    prompt template's fields exist, chat rows get no text template."""
    if not rows:
        return
    try:
        check_columns(reward_functions, [key for key in rows[0] if key != PROMPT])
    except RewardFunctionError as e:
        raise ConfigError("reward_funcs", e.problem, e.fix) from None
    chat = not isinstance(rows[0][PROMPT], str)
    if chat and settings.prompt_template != "{prompt}":
        raise ConfigError("prompt_template", "applies to text prompts, and the rows hold chat "
                          "conversations", "remove prompt_template (use system_prompt for "
                          "instructions)")
    if not chat:
        try:
            settings.prompt_template.format_map(rows[0])
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError("prompt_template", f"{settings.prompt_template!r} does not "
                              f"format with the rows' columns {sorted(rows[0])} ({e!r})",
                              "use {prompt} or another column name in braces; write {{ and }} "
                              "for literal braces") from None
