"""Reward functions, TRL's convention: ``f(prompts, completions, **columns) -> list[float]``.

``prompts[i]`` is the prompt of ``completions[i]`` as the dataset row holds it (text, or a chat
conversation), ``completions[i]`` the decoded completion text, and every other column of the
rows arrives as a keyword argument holding one value per completion (``answer=[...]``,
``uid=[...]``, ...), so a function takes the columns it needs and ``**columns`` for the rest.
A function returns one number per completion, or None where it does not apply. The reward of
a completion is ``sum_f weight_f * f(...)[i]`` over the functions that apply.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from rllib_ext.llm.columns import PROMPT


class RewardFunctionError(ValueError):
    """A reward function that cannot be loaded, or that returned something unusable: what is
    wrong (``problem``) and how to fix it (``fix``)."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}; {fix}")
        self.problem, self.fix = problem, fix


@dataclass(frozen=True)
class RewardFunction:
    name: str  # metrics: rewards/<name> (the function's name, made unique)
    path: str  # "package.module:function"
    function: Callable
    weight: float


def import_reward_function(path: str) -> Callable:
    """Import ``"package.module:function"``; RewardFunctionError naming the path and the fix."""
    if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
        raise RewardFunctionError(
            f"reward function {path!r} is not of the form 'package.module:function'",
            "write e.g. 'examples.rewards:no_extra_characters' (the module must be importable "
            "from the directory you run in)")
    module_name, name = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardFunctionError(f"reward function {path!r}: cannot import module "
                                  f"'{module_name}' ({e})", "check the module path and that it "
                                  "is importable from the directory you run in") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise RewardFunctionError(f"reward function {path!r}: module '{module_name}' has no "
                                  f"function '{name}'", "check the name")
    return function


def load_reward_functions(paths: Sequence[str], weights: Sequence[float] | None = None
                          ) -> list[RewardFunction]:
    """The functions named by ``paths`` with their ``weights`` (default 1.0 each)."""
    if isinstance(paths, str) or not isinstance(paths, Sequence) or not paths:
        raise RewardFunctionError(f"got {paths!r}", "give a non-empty list of "
                                  "'package.module:function' names")
    if weights is None:
        weights = [1.0] * len(paths)
    if isinstance(weights, str) or not isinstance(weights, Sequence) \
            or len(weights) != len(paths) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                for w in weights):
        raise RewardFunctionError(f"reward_weights is {weights!r}", f"give a list of "
                                  f"{len(paths)} finite numbers (one per reward function)")
    functions, names = [], set()
    for path, weight in zip(paths, weights, strict=True):
        name = base = path.split(":")[-1] if isinstance(path, str) else str(path)
        suffix = 2
        while name in names:
            name, suffix = f"{base}_{suffix}", suffix + 1
        names.add(name)
        functions.append(RewardFunction(name, path, import_reward_function(path), float(weight)))
    return functions


def check_columns(functions: Sequence[RewardFunction], columns: Sequence[str]) -> None:
    """Every column a reward function requires (a parameter after ``prompts, completions``
    without a default) is among the rows' ``columns``."""
    for reward in functions:
        try:
            parameters = list(inspect.signature(reward.function).parameters.values())[2:]
        except (TypeError, ValueError):  # a builtin or C callable: nothing to check
            continue
        required = [p.name for p in parameters if p.default is inspect.Parameter.empty
                    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        missing = [name for name in required if name not in columns]
        if missing:
            raise RewardFunctionError(
                f"reward function {reward.path} needs the column(s) {missing}, which the rows "
                f"lack (columns: {sorted(columns)})", "add the column to the data (for the gold "
                "answer: set dataset.answer_field), or use another reward function")


def weighted_rewards(functions: Sequence[RewardFunction], rows: Sequence[Mapping],
                     completions: Sequence[str], given: Mapping[str, list[float]] | None = None,
                     ) -> tuple[list[float], dict[str, list[float | None]]]:
    """Call every function (except those whose values are ``given`` by name) on the rows'
    prompts and columns; return the weighted sums and each function's values."""
    prompts = [row[PROMPT] for row in rows]
    columns = {key: [row.get(key) for row in rows]
               for key in dict.fromkeys(k for row in rows for k in row) if key != PROMPT}
    per_function: dict[str, list[float | None]] = {}
    totals = [0.0] * len(completions)
    for reward in functions:
        if given and reward.name in given:
            values = given[reward.name]
        else:
            try:
                values = reward.function(list(prompts), list(completions), **columns)
            except Exception as e:
                raise RewardFunctionError(
                    f"reward function {reward.path} raised {type(e).__name__}: {e} (on "
                    f"{len(completions)} completions; its arguments: prompts, completions and "
                    f"the columns {sorted(columns)})", "fix the function") from e
        values = _checked(reward, values, len(completions))
        per_function[reward.name] = values
        for i, value in enumerate(values):
            if value is not None:
                totals[i] += reward.weight * value
    return totals, per_function


def _checked(reward: RewardFunction, values, count: int) -> list[float | None]:
    try:
        values = list(values)
    except TypeError:
        values = None
    if values is None or len(values) != count:
        raise RewardFunctionError(
            f"reward function {reward.path} returned "
            f"{'no list' if values is None else f'{len(values)} values'} for {count} completions",
            "return a list with one number per completion")
    checked = []
    for value in values:
        if hasattr(value, "item"):  # numpy / torch scalars
            value = value.item()
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise RewardFunctionError(
                f"reward function {reward.path} returned {value!r}", "return finite numbers "
                "(or None where the function does not apply)")
        checked.append(None if value is None else float(value))
    return checked
