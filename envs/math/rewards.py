"""The built-in reward: is the completion's final answer the row's gold ``answer``?

A reward function in TRL's convention (:mod:`rllib_ext.llm.rewards`), listed in ``reward_funcs``
as ``envs.math.rewards:math_answer`` (MathEnv's default). Inside MathEnv it grades with the
env's ``answer_style``, ``checker_timeout_s`` and ``answer_verifier``; called directly, with
the defaults ("auto" extraction, 5 s per answer).
"""

from __future__ import annotations

import functools

from envs.math.grading import AnswerChecker

MATH_ANSWER = "envs.math.rewards:math_answer"


@functools.cache
def _default_checker() -> AnswerChecker:
    return AnswerChecker()


def math_answer(prompts: list, completions: list[str], answer: list[str], **columns
                ) -> list[float]:
    """1.0 where ``completions[i]``'s final answer equals ``answer[i]`` (math-verify), else 0.0."""
    return [grade.reward for grade in _default_checker().grade_many(completions, answer)]
