"""Single-turn math environment (gymnasium API) over a prompt dataset.

``reset()`` draws the next problem and returns its prompt as token ids (right-padded with the
tokenizer's pad id to ``max_prompt_tokens``); ``step(response_ids)`` decodes the response,
checks the answer with math-verify (:mod:`envs.math.grading`) and returns reward 1/0 with
``terminated=True``. Rollout workers that sample n responses per prompt call :meth:`grade_many`
directly on the decoded texts instead of stepping n copies of the env.

env_config keys (defaults in brackets):
    dataset            dict for :func:`envs.math.datasets.load_problems` [{"name": "arithmetic"}]
    split              "train" | "test" | ... ["train"]
    tokenizer          model directory / hub id / "tiny" whose tokenizer encodes prompts ["tiny"]
    prompt_template    format string with ``{question}`` ["{question}"]
    use_chat_template  wrap the prompt as a user message with the tokenizer's chat template [False]
    max_prompt_tokens  observation width; longer prompts are skipped and counted [64]
    max_response_tokens action width [8]
    answer_style       grading style (see AnswerChecker); default by dataset: arithmetic "plain",
                       gsm8k "gsm8k", math "boxed"
    checker_timeout_s  per-answer math-verify timeout [5.0]
    answer_verifier    "module:function" (predicted, gold) -> bool replacing math-verify, e.g.
                       for custom answer types [None]
    shuffle, seed      a seeded permutation of the problems per epoch [True, 0]
The prompts are sharded across env runners by ``worker_index`` (every runner sees a disjoint
slice). :meth:`get_state`/:meth:`set_state` carry the position in the data (epoch, index) so a
resumed run neither replays nor skips prompts.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from envs.math.datasets import MathProblem, load_problems
from envs.math.grading import AnswerChecker, Grade

DEFAULT_ANSWER_STYLE = {"arithmetic": "plain", "gsm8k": "gsm8k", "math": "boxed"}
REPLACEMENT_CHARACTER = "\ufffd"


class MathEnv(gym.Env):
    """One problem per episode: prompt ids in, response ids out, reward = answer correct."""

    metadata: dict[str, Any] = {}

    def __init__(self, config: dict | None = None):
        from transformers import AutoTokenizer

        from rllib_ext.llm.tiny import resolve_model

        # RLlib passes an EnvContext: a dict that also carries the env runner's index.
        worker_index = int(getattr(config, "worker_index", 0) or 0)
        num_workers = int(getattr(config, "num_workers", 0) or 0)
        config = dict(config or {})
        self.dataset_config = dict(config.get("dataset") or {"name": "arithmetic"})
        self.split = config.get("split", "train")
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.get("tokenizer",
                                                                                "tiny")))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        self.prompt_template = config.get("prompt_template", "{question}")
        self.use_chat_template = bool(config.get("use_chat_template", False))
        self.max_prompt_tokens = int(config.get("max_prompt_tokens", 64))
        self.max_response_tokens = int(config.get("max_response_tokens", 8))
        style = config.get("answer_style") or DEFAULT_ANSWER_STYLE.get(
            self.dataset_config.get("name"), "auto")
        self.checker = AnswerChecker(style=style,
                                     timeout_s=float(config.get("checker_timeout_s", 5.0)),
                                     verifier=config.get("answer_verifier"))
        self.shuffle = bool(config.get("shuffle", True))
        self.seed_value = int(config.get("seed", 0))

        loaded = load_problems(self.dataset_config, self.split)
        self.skipped_rows = loaded.skipped_rows
        shard = loaded.problems
        if num_workers > 1 and worker_index >= 1:
            shard = shard[worker_index - 1::num_workers]
        self.problems: list[MathProblem] = []
        self.prompt_ids: list[list[int]] = []
        self.prompts_too_long = 0
        for problem in shard:
            ids = self.encode_prompt(problem.question)
            if len(ids) > self.max_prompt_tokens:
                self.prompts_too_long += 1
                continue
            self.problems.append(problem)
            self.prompt_ids.append(ids)
        if not self.problems:
            raise ValueError(
                f"no usable problems in dataset {self.dataset_config} split '{self.split}' "
                f"({self.prompts_too_long} longer than max_prompt_tokens="
                f"{self.max_prompt_tokens}). Fix: raise env_config.max_prompt_tokens or check "
                "the dataset.")

        vocab = len(self.tokenizer)
        self.observation_space = gym.spaces.Box(0, vocab - 1, (self.max_prompt_tokens,),
                                                np.int64)
        self.action_space = gym.spaces.Box(0, vocab - 1, (self.max_response_tokens,), np.int64)
        self.epoch, self.position = 0, 0
        self.order = self._permutation(0)
        self.current: int | None = None

    # ------------------------------------------------------------------ prompts and data order

    def encode_prompt(self, question: str) -> list[int]:
        text = self.prompt_template.format(question=question)
        if self.use_chat_template:
            return list(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True))
        return self.tokenizer(text).input_ids

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.problems))
        return np.random.default_rng([self.seed_value, epoch]).permutation(len(self.problems))

    def next_problem(self) -> int:
        """Index of the next problem in this epoch's order (a new epoch reshuffles)."""
        if self.position >= len(self.order):
            self.epoch += 1
            self.position = 0
            self.order = self._permutation(self.epoch)
        index = int(self.order[self.position])
        self.position += 1
        return index

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.order = self._permutation(self.epoch)
        self.position = int(state["position"])

    # ------------------------------------------------------------------ gymnasium API

    def pad_prompt(self, ids: list[int]) -> np.ndarray:
        padded = np.full(self.max_prompt_tokens, self.pad_id, dtype=np.int64)
        padded[:len(ids)] = ids
        return padded

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.current = self.next_problem()
        problem = self.problems[self.current]
        ids = self.prompt_ids[self.current]
        info = {"uid": problem.uid, "answer": problem.answer, "prompt_length": len(ids)}
        return self.pad_prompt(ids), info

    def step(self, action):
        if self.current is None:
            raise RuntimeError("step() before reset(). Fix: call reset() first.")
        ids = [int(t) for t in np.asarray(action).reshape(-1)]
        text = self.decode_response(ids)
        [grade] = self.grade_many([text], [self.problems[self.current].answer])
        obs = self.pad_prompt(self.prompt_ids[self.current])
        return obs, grade.reward, True, False, grade_info(grade, text)

    # ------------------------------------------------------------------ scoring

    def decode_response(self, ids: list[int]) -> str:
        """Text of a response: stops at the end-of-sequence token, drops padding."""
        eos = self.tokenizer.eos_token_id
        if eos in ids:
            ids = ids[:ids.index(eos)]
        while ids and ids[-1] == self.pad_id:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def grade_many(self, texts: list[str], golds: list[str]) -> list[Grade]:
        return self.checker.grade_many(texts, golds)

    def close(self):
        self.checker.close()


def grade_info(grade: Grade, text: str) -> dict:
    return {"correct": grade.correct, "extracted": grade.extracted,
            "checker_failure": grade.failure, "empty": not text.strip(),
            "non_utf8": REPLACEMENT_CHARACTER in text}
