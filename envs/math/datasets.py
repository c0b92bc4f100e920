"""Prompt datasets: the embedded arithmetic task, GSM8K, MATH, and any file or hub dataset of
rows with a prompt column or chat messages.

``load_rows(config, split)`` returns the rows of one split. A row is a dict: ``uid`` (stable,
``"<name>/<split>/<index in the source>"``), ``prompt`` (text, or a chat conversation: a list
of ``{"role", "content"}`` messages), ``answer`` (the gold answer, where the data has one) and,
for files and hub datasets, every other column of the source row (reward functions receive
them). Files are read with Hugging Face ``datasets``.

Which rows form a split:
- arithmetic: generated; a hash of the question decides its split (``test_fraction``).
- a single file: the file is the "train" split. ``test_fraction`` holds out that share of its
  rows (chosen by a hash of the prompt, so repeated prompts stay on one side) as "test"; without
  it the file has no other split, so an evaluation split is refused rather than silently equal
  to the training data.
- a directory: ``<split>.jsonl|.json|.parquet`` in it; a hub id: the hub dataset's splits.
  With ``test_fraction`` both splits come from the "train" split, as for a single file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from envs.math.grading import hashes_answer
from envs.validation import ConfigError, check_known_keys
from rllib_ext.llm.columns import ANSWER, MESSAGES, PROMPT, UID


@dataclass
class LoadedDataset:
    rows: list[dict]
    source: str  # file path or hub id ("arithmetic" for the synthetic task)
    skipped_rows: int = 0  # malformed rows skipped (only with on_bad_row="skip")
    notes: list[str] = field(default_factory=list)  # what the loader decided, for the user


class DatasetError(ConfigError):
    """Bad dataset configuration or data; the message names the key/file/row and the fix."""

    def __init__(self, problem: str, fix: str, key: str = "dataset"):
        super().__init__(key, problem, fix)


ARITHMETIC_DEFAULTS = {"min_operand": 0, "max_operand": 29, "ops": "+", "num_operands": 2,
                       "test_fraction": None, "split_seed": 0, "max_problems": None}
ARITHMETIC_TEST_FRACTION = 0.1
ARITHMETIC_SPLITS = ("train", "test")
ARITHMETIC_OPS = "+-*"
# Above this many combinations (or max_problems) the arithmetic task is sampled, not enumerated.
ARITHMETIC_ENUMERATION_CAP = 100_000

COMMON_KEYS = ("name", "limit", "test_fraction", "split_seed")
FILE_KEYS = ("path", "subset", "prompt_field", "answer_field", "answer_format", "on_bad_row")
ANSWER_FORMATS = ("gsm8k", "boxed", "plain")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
# Named file datasets: name -> (prompt field, answer field (None: per row, see
# _answer_field), answer format (None: per row), default hub subset).
NAMED_FILE_DATASETS = {"gsm8k": ("question", "answer", "gsm8k", "main"),
                       "math": ("problem", None, None, None)}
# Without a name, a dataset with a path is plain rows: prompt and answer columns as they are.
ROWS = "rows"
DATASET_NAMES = ("arithmetic", *NAMED_FILE_DATASETS, ROWS)


def dataset_name(config: Mapping) -> str:
    """The dataset's kind: its ``name``, else "rows" when it has a ``path``, else arithmetic."""
    return config.get("name") or (ROWS if config.get("path") else "arithmetic")


def load_rows(config: Mapping, split: str) -> LoadedDataset:
    """Load one split of the dataset ``config`` describes (see the module docstring).

    Common keys: ``name`` ("arithmetic", "gsm8k", "math"; none for plain rows), ``limit``
    (keep the first N rows), ``test_fraction`` and ``split_seed`` (hold-out share and its hash
    seed). arithmetic: ``min_operand, max_operand, ops, num_operands, max_problems``.
    Files and hub datasets: ``path`` (a .jsonl/.json/.parquet file, a directory holding
    ``<split>.jsonl|.json|.parquet``, or a hub id), ``subset`` (hub config name),
    ``prompt_field`` (default "prompt", else "messages"; gsm8k "question", math "problem"),
    ``answer_field`` (default "answer" where present), ``answer_format`` ("gsm8k": after the
    last "####", "boxed": last \\boxed{} of a solution, "plain": the field is the answer) and
    ``on_bad_row`` ("error" or "skip").
    """
    if not isinstance(config, Mapping):
        raise DatasetError(f"must be a mapping such as {{name: arithmetic}} or {{path: "
                           f"data.jsonl}}, got {type(config).__name__}",
                           "write the dataset as a mapping")
    name = dataset_name(config)
    if name not in DATASET_NAMES:
        raise DatasetError(f"name {name!r} is unknown",
                           "set name to 'arithmetic', 'gsm8k' or 'math', or leave it out and set "
                           "path for a file of rows with a prompt column", key="dataset.name")
    allowed = (*COMMON_KEYS, *(ARITHMETIC_DEFAULTS if name == "arithmetic" else FILE_KEYS))
    check_known_keys(config, allowed, f"the {name} dataset", prefix="dataset.")
    limit = config.get("limit")
    if limit is not None and (not _is_int(limit) or limit < 1):
        raise DatasetError(f"got {limit!r}", "use a positive integer (or leave it out)",
                           key="dataset.limit")
    fraction = config.get("test_fraction")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(
            fraction, (int, float)) or not 0 < fraction < 1):
        raise DatasetError(f"got {fraction!r}", "use a number in (0, 1), e.g. 0.1",
                           key="dataset.test_fraction")
    if not isinstance(split, str) or not split:
        raise DatasetError(f"split must be a non-empty string such as 'train', got {split!r}",
                           "set split to 'train' or 'test'", key="split")

    loaded = _load_arithmetic(config, split) if name == "arithmetic" \
        else _load_file_dataset(name, config, split)
    if limit is not None:
        loaded.rows = loaded.rows[:limit]
    return loaded


# ---------------------------------------------------------------------------------------------
# Arithmetic


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def evaluate_arithmetic(operands: list[int], ops: str) -> int:
    """Value of ``operands[0] ops[0] operands[1] ...`` with * before + and -, left to right."""
    total, sign, term = 0, 1, operands[0]
    for op, operand in zip(ops, operands[1:], strict=True):
        if op == "*":
            term *= operand
        else:
            total += sign * term
            sign, term = (1 if op == "+" else -1), operand
    return total + sign * term


def _unit_hash(seed: int, text: str) -> float:
    """Deterministic pseudo-uniform number in [0, 1) for (seed, text)."""
    digest = hashlib.blake2b(f"{seed}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def arithmetic_knobs(config: Mapping) -> dict:
    """The arithmetic knobs with defaults filled in, validated (DatasetError naming the key)."""
    knobs = {**ARITHMETIC_DEFAULTS, **{k: config[k] for k in ARITHMETIC_DEFAULTS if k in config}}
    if knobs["test_fraction"] is None:
        knobs["test_fraction"] = ARITHMETIC_TEST_FRACTION
    for key in ("min_operand", "max_operand", "num_operands", "split_seed"):
        if not _is_int(knobs[key]):
            raise DatasetError(f"got {knobs[key]!r}", "use an integer", key=f"dataset.{key}")
    if knobs["min_operand"] < 0:
        raise DatasetError(f"got {knobs['min_operand']}", "use an integer >= 0 (ops '-' gives "
                           "negative answers)", key="dataset.min_operand")
    if knobs["max_operand"] < knobs["min_operand"]:
        raise DatasetError(f"{knobs['max_operand']} is below min_operand "
                           f"({knobs['min_operand']})", "set max_operand >= min_operand",
                           key="dataset.max_operand")
    if knobs["num_operands"] < 2:
        raise DatasetError(f"got {knobs['num_operands']}", "use an integer >= 2",
                           key="dataset.num_operands")
    ops = knobs["ops"]
    if not isinstance(ops, str) or not ops or set(ops) - set(ARITHMETIC_OPS):
        raise DatasetError(f"got {ops!r}", f"use a non-empty string of characters from "
                           f"'{ARITHMETIC_OPS}' (e.g. '+-')", key="dataset.ops")
    knobs["ops"] = "".join(sorted(set(ops), key=ARITHMETIC_OPS.index))
    cap = knobs["max_problems"]
    if cap is not None and (not _is_int(cap) or cap < 2):
        raise DatasetError(f"got {cap!r}", "use an integer >= 2 (one problem per split at "
                           "least) or leave it out", key="dataset.max_problems")
    return knobs


def arithmetic_splits(knobs: Mapping) -> dict[str, list[dict]]:
    """Both splits of the arithmetic task for validated ``knobs``.

    Problem i of the combination space has operands given by the base-(max-min+1) digits of
    i and operators by the remaining base-len(ops) digits. All combinations are used when
    they fit the cap (max_problems, else ARITHMETIC_ENUMERATION_CAP); otherwise a seeded
    sample of ``cap`` of them without replacement. A problem goes to "test" when the hash of
    (split_seed, question), uniform in [0, 1), is below test_fraction (at least one problem
    per split). Each split is ordered by that hash: a seeded shuffle, so that ``limit`` keeps
    a uniform sample rather than the smallest operands.
    """
    low, high, ops, k = (knobs["min_operand"], knobs["max_operand"], knobs["ops"],
                         knobs["num_operands"])
    values = high - low + 1
    operand_space = values ** k
    total = operand_space * len(ops) ** (k - 1)
    cap = knobs["max_problems"] if knobs["max_problems"] is not None \
        else ARITHMETIC_ENUMERATION_CAP
    if total < 2:
        raise DatasetError("the arithmetic task has a single problem", "widen "
                           "min_operand..max_operand or add ops so that both splits get one")
    if total <= cap:
        indices = range(total)
    else:
        indices = sorted(random.Random(knobs["split_seed"]).sample(range(total), cap))

    problems = []  # (hash, index, question, answer)
    for index in indices:
        op_index, operand_index = divmod(index, operand_space)
        operands = []
        for _ in range(k):
            operand_index, digit = divmod(operand_index, values)
            operands.append(low + digit)
        chosen_ops = []
        for _ in range(k - 1):
            op_index, digit = divmod(op_index, len(ops))
            chosen_ops.append(ops[digit])
        question = str(operands[0]) + "".join(
            f"{op}{operand}" for op, operand in zip(chosen_ops, operands[1:], strict=True)) + "="
        problems.append((_unit_hash(knobs["split_seed"], question), index, question,
                         str(evaluate_arithmetic(operands, chosen_ops))))

    problems.sort()
    test_size = sum(h < knobs["test_fraction"] for h, *_ in problems)
    test_size = min(max(test_size, 1), len(problems) - 1)
    parts = {"test": problems[:test_size], "train": problems[test_size:]}
    return {split: [{UID: f"arithmetic/{split}/{index}", PROMPT: question, ANSWER: answer}
                    for _, index, question, answer in parts[split]]
            for split in ARITHMETIC_SPLITS}


@functools.lru_cache(maxsize=4)
def _cached_arithmetic_splits(knob_items: tuple) -> dict[str, list[dict]]:
    # An env loads "train" and "test" separately; both come from one generation.
    return arithmetic_splits(dict(knob_items))


def _load_arithmetic(config: Mapping, split: str) -> LoadedDataset:
    knobs = arithmetic_knobs(config)
    if split not in ARITHMETIC_SPLITS:
        raise DatasetError(f"split {split!r} is unknown for the arithmetic dataset",
                           "use 'train' or 'test'", key="split")
    splits = _cached_arithmetic_splits(tuple(sorted(knobs.items())))
    return LoadedDataset([dict(row) for row in splits[split]], "arithmetic")


# ---------------------------------------------------------------------------------------------
# Files and hub datasets


class _BadRow(Exception):
    """A malformed row: ``problem`` says what is wrong, ``fix`` how to repair it."""

    def __init__(self, problem: str, fix: str):
        super().__init__(problem)
        self.problem, self.fix = problem, fix


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars or error logs from ``datasets``: its failures become DatasetErrors."""
    import datasets

    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield datasets
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _local_file(name: str, path: str, split: str) -> Path | None:
    """The local file holding ``split``, or None when ``path`` is a hub id."""
    local = Path(os.path.expanduser(path))
    if local.is_dir():
        for suffix in FILE_SUFFIXES:
            if (local / f"{split}{suffix}").is_file():
                return local / f"{split}{suffix}"
        found = sorted(p.name for p in local.iterdir())[:20]
        raise DatasetError(
            f"directory {str(local)!r} has no file for split {split!r} (looked for "
            f"{', '.join(split + s for s in FILE_SUFFIXES)}; found {found})",
            "add the file, or set dataset.test_fraction to hold out part of train",
            key="dataset.path")
    if local.is_file():
        if local.suffix not in FILE_SUFFIXES:
            raise DatasetError(f"{str(local)!r} has an unsupported suffix",
                               f"use one of {', '.join(FILE_SUFFIXES)}", key="dataset.path")
        if split != "train":
            raise DatasetError(
                f"{str(local)!r} is a single file: it is the 'train' split, and the {split!r} "
                "split would be the same rows (held-out accuracy would be training accuracy)",
                "set dataset.test_fraction (e.g. 0.1) to hold out a share of its rows, or point "
                "path at a directory with train and test files", key="dataset.path")
        return local
    if path.startswith(("/", ".", "~")) or path.endswith(FILE_SUFFIXES) or path.count("/") > 1:
        raise DatasetError(f"{path!r} does not exist (relative paths resolve against "
                           f"{os.getcwd()!r})", "fix the path", key="dataset.path")
    return None


def _read_local(path: Path) -> list[dict]:
    builder = "parquet" if path.suffix == ".parquet" else "json"
    with _quiet_datasets() as datasets:
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train").to_list()
        except Exception as e:
            cause = e.__cause__ or e
            hint = ("write one JSON object per line, with the same type for a column in every "
                    "row (.jsonl), or a JSON array of such objects (.json)" if builder == "json"
                    else "check that the file is a valid parquet table")
            raise DatasetError(f"could not read {str(path)!r}: {cause} (rows count from 0)",
                               hint, key="dataset.path") from None


def unreachable_hub_note(config: Mapping) -> str | None:
    """A note when ``config`` names a hub dataset and the hub cannot be reached (no network):
    its rows cannot be checked before the run, which downloads them when it starts. A hub id
    the hub says does not exist is refused (DatasetError); local paths are not looked at."""
    path = config.get("path") if isinstance(config, Mapping) else None
    if dataset_name(config) == "arithmetic" or not isinstance(path, str) or not path:
        return None
    local = Path(os.path.expanduser(path))
    if local.exists() or path.startswith(("/", ".", "~")) or path.endswith(FILE_SUFFIXES) \
            or path.count("/") > 1:
        return None
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        huggingface_hub.dataset_info(path, timeout=10)
    except RepositoryNotFoundError:
        raise DatasetError(f"hub dataset {path!r} does not exist (or is private)",
                           "check the id on huggingface.co, or set path to a local "
                           ".jsonl/.json/.parquet file", key="dataset.path") from None
    except Exception as e:  # no network: the run will try again
        return (f"dataset '{path}' could not be checked on the Hugging Face hub "
                f"({type(e).__name__}); it will be downloaded when the run starts")
    return None


def _read_hub(name: str, hub_id: str, subset: str | None, split: str) -> list[dict]:
    with _quiet_datasets() as datasets:
        try:
            return datasets.load_dataset(hub_id, subset, split=split).to_list()
        except Exception as e:
            raise DatasetError(
                f"could not load the {name} dataset {hub_id!r} (subset {subset!r}, split "
                f"{split!r}) from the Hugging Face hub: {e}",
                "check path, subset and the split, or set path to a local .jsonl/.json/.parquet "
                "file", key="dataset.path") from None


def _text(row: Mapping, key: str, role: str, setting: str) -> str:
    """Non-empty text of ``row[key]`` (numbers are accepted for answers). A missing value is
    a missing field: ``datasets`` fills the columns a row lacks with None."""
    if row.get(key) is None:
        fields = sorted(k for k, v in row.items() if v is not None)
        raise _BadRow(f"has no field '{key}' (fields: {fields})",
                      f"set {setting} to the field that holds the {role}")
    value = row[key]
    if role == "answer" and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _BadRow(f"field '{key}' is {type(value).__name__}, not text",
                      f"store the {role} as a string")
    if not value.strip():
        raise _BadRow(f"field '{key}' is empty", f"fill in the {role}")
    return value


def _conversation(value, key: str) -> list[dict]:
    if not isinstance(value, list) or not value or not all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in value):
        raise _BadRow(f"field '{key}' is not a chat conversation",
                      'write it as [{"role": "user", "content": "..."}, ...]')
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _prompt(row: Mapping, key: str):
    value = row.get(key)
    if isinstance(value, list):
        return _conversation(value, key)
    return _text(row, key, "prompt", "dataset.prompt_field").strip()


_BOXED_COMMAND = re.compile(r"\\(?:boxed|fbox)")


def last_boxed_content(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` or ``\fbox{...}`` (balanced braces; ``\{`` and ``\}``
    do not count), or the token after ``\boxed `` (``\boxed 5``). None when there is no such
    command, or when the last one is unclosed or empty.

    Ours: a row keeps the solution's own text (math-verify's parse normalises it, dropping
    units), and a missing or unclosed box must be a bad row, which its box reader (imported
    with sympy, seconds in the driver) does not report."""
    matches = list(_BOXED_COMMAND.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():]
    if not rest.startswith("{"):
        token = re.match(r"\s+([^\s$]+)", rest)
        return token.group(1) if token else None
    depth = 0
    i = 0
    while i < len(rest):
        ch = rest[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i].strip() or None
        i += 1
    return None


def _gold_answer(text: str, key: str, answer_format: str) -> str:
    if answer_format == "gsm8k":
        answer = hashes_answer(text)
        if answer is None:
            raise _BadRow(f"field '{key}' has no final answer after '####' (GSM8K format)",
                          "end the field with '#### <answer>' or set answer_format: plain if "
                          "it holds just the answer")
        return answer
    if answer_format == "boxed":
        answer = last_boxed_content(text)
        if answer is None:
            raise _BadRow(f"field '{key}' has no complete \\boxed{{...}} answer (MATH format)",
                          "box the final answer or set answer_format: plain if the field "
                          "holds just the answer")
        return answer
    return text.strip()


def _row(record, name: str, prompt_key: str, answer_key: str | None,
         answer_format: str | None) -> dict:
    if not isinstance(record, Mapping):
        raise _BadRow(f"is a {type(record).__name__}, not an object",
                      "make every row an object with a prompt field")
    row = dict(record)
    row[PROMPT] = _prompt(record, prompt_key)
    if name == "math" and answer_key is None:  # a final "answer" (MATH-500) wins over a solution
        answer_key = ANSWER if record.get(ANSWER) not in (None, "") else "solution"
    if answer_key is not None:
        if answer_format is None:
            answer_format = "boxed" if answer_key == "solution" else "plain"
        row[ANSWER] = _gold_answer(_text(record, answer_key, "answer", "dataset.answer_field"),
                                   answer_key, answer_format)
    return row


def _field_defaults(name: str, config: Mapping, columns: set[str]):
    """(prompt field, answer field or None, answer format or None) for this dataset."""
    if name == ROWS:
        prompt_key = config.get("prompt_field") or (MESSAGES if PROMPT not in columns
                                                    and MESSAGES in columns else PROMPT)
        answer_key = config.get("answer_field") or (ANSWER if ANSWER in columns else None)
        return prompt_key, answer_key, config.get("answer_format")
    prompt_key, answer_key, answer_format, _ = NAMED_FILE_DATASETS[name]
    return (config.get("prompt_field", prompt_key), config.get("answer_field", answer_key),
            config.get("answer_format", answer_format))


def _load_file_dataset(name: str, config: Mapping, split: str) -> LoadedDataset:
    path = config.get("path")
    if not isinstance(path, str) or not path:
        example = {"gsm8k": "openai/gsm8k", "math": "HuggingFaceH4/MATH-500"}.get(name,
                                                                                "data.jsonl")
        raise DatasetError("is missing", "set dataset.path to a local .jsonl/.json/.parquet "
                           "file, a directory holding <split>.jsonl/.parquet, or a hub id such "
                           f"as {example}", key="dataset.path")
    on_bad_row = config.get("on_bad_row", "error")
    if on_bad_row not in ("error", "skip"):
        raise DatasetError(f"got {on_bad_row!r}", "use 'error' or 'skip'",
                           key="dataset.on_bad_row")
    answer_format = config.get("answer_format")
    if answer_format is not None and answer_format not in ANSWER_FORMATS:
        raise DatasetError(f"got {answer_format!r}", f"use one of {', '.join(ANSWER_FORMATS)}",
                           key="dataset.answer_format")
    for key in ("prompt_field", "answer_field"):
        value = config.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise DatasetError(f"got {value!r}", "give a column name", key=f"dataset.{key}")

    fraction = config.get("test_fraction")
    source_split = "train" if fraction is not None else split
    if fraction is not None and split not in ("train", "test"):
        raise DatasetError(f"split {split!r} is unknown with test_fraction",
                           "use 'train' or 'test'", key="split")
    local = _local_file(name, path, source_split)
    if local is None:
        subset = config.get("subset", NAMED_FILE_DATASETS.get(name, (None,) * 4)[3])
        records, source = _read_hub(name, path, subset, source_split), path
    else:
        records, source = _read_local(local), str(local)
    columns = set(records[0]) if records and isinstance(records[0], Mapping) else set()
    prompt_key, answer_key, answer_format = _field_defaults(name, config, columns)

    rows, skipped = [], 0
    for index, record in enumerate(records):
        try:
            row = _row(record, name, prompt_key, answer_key, answer_format)
        except _BadRow as bad:
            if on_bad_row == "skip":
                skipped += 1
                continue
            raise DatasetError(f"{source}, row {index}: {bad.problem}",
                               f"{bad.fix}, or set dataset.on_bad_row: skip to skip such rows",
                               key="dataset") from None
        row[UID] = f"{name}/{split}/{index}"
        rows.append(row)
    notes = []
    if fraction is not None:
        rows, note = _hold_out(rows, fraction, int(config.get("split_seed", 0)), split, source)
        notes.append(note)
    return LoadedDataset(rows, source, skipped, notes)


def _hold_out(rows: list[dict], fraction: float, seed: int, split: str, source: str
              ) -> tuple[list[dict], str]:
    """The ``split`` side of a hash split of ``rows``: a row is "test" when the hash of (seed,
    its prompt) is below ``fraction`` (at least one row per side when there are two)."""
    keys = [_unit_hash(seed, json.dumps(row[PROMPT], sort_keys=True)) for row in rows]
    test = [i for i, h in enumerate(keys) if h < fraction]
    if not test and len(rows) > 1:
        test = [min(range(len(rows)), key=keys.__getitem__)]
    if len(test) == len(rows) > 1:
        test.remove(max(test, key=keys.__getitem__))
    held_out = set(test)
    chosen = [row for i, row in enumerate(rows) if (i in held_out) == (split == "test")]
    note = (f"{source}: {len(held_out)} of {len(rows)} rows held out as 'test' "
            f"(test_fraction {fraction}, split_seed {seed}), {len(rows) - len(held_out)} "
            "for 'train'")
    return chosen, note
