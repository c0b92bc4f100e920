"""Math problems: the embedded arithmetic task, GSM8K and MATH from local files or the HF hub.

``load_problems(config, split)``; ``config["name"]`` is "arithmetic", "gsm8k" or "math".
Every problem carries a stable uid ``"<name>/<split>/<index in source order>"``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from envs.math.grading import hashes_answer, last_boxed_content


@dataclass(frozen=True)
class MathProblem:
    uid: str  # "<dataset>/<split>/<index>" (index in the source order)
    question: str  # the question text, no prompt template applied
    answer: str  # gold final answer, parseable by math-verify ("72", "\\frac{1}{2}", ...)


@dataclass
class LoadedDataset:
    problems: list[MathProblem]
    source: str  # file path or hub id ("arithmetic" for the synthetic task)
    skipped_rows: int = 0  # malformed rows skipped (only with on_bad_row="skip")


class DatasetError(ValueError):
    """Bad dataset configuration or data; the message names the key/file/row and the fix."""


ARITHMETIC_DEFAULTS = {"min_operand": 0, "max_operand": 29, "ops": "+", "num_operands": 2,
                       "test_fraction": 0.1, "split_seed": 0, "max_problems": None}
ARITHMETIC_SPLITS = ("train", "test")
ARITHMETIC_OPS = "+-*"
# Above this many combinations (or max_problems) the arithmetic task is sampled, not enumerated.
ARITHMETIC_ENUMERATION_CAP = 100_000

FILE_DATASET_KEYS = ("path", "subset", "question_field", "answer_field", "answer_format",
                     "on_bad_row")
ANSWER_FORMATS = ("gsm8k", "boxed", "plain")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
# name -> default question field, default answer field (None: per row, see _answer_field),
# default hub subset.
_FILE_DATASETS = {"gsm8k": ("question", "answer", "main"), "math": ("problem", None, None)}


def load_problems(config: Mapping, split: str) -> LoadedDataset:
    """Load one split of the dataset ``config`` describes (see the module docstring).

    Common keys: ``name``; ``limit`` (keep the first N problems).
    arithmetic: ``min_operand, max_operand, ops, num_operands, test_fraction, split_seed,
    max_problems`` (defaults in ARITHMETIC_DEFAULTS).
    gsm8k / math: ``path`` (a .jsonl/.json/.parquet file, a directory holding
    ``<split>.jsonl|.json|.parquet``, or a hub id), ``subset`` (hub config name),
    ``question_field``, ``answer_field``, ``answer_format`` ("gsm8k": after the last "####",
    "boxed": last \\boxed{} of a solution, "plain": the field is the answer) and
    ``on_bad_row`` ("error" or "skip").
    """
    if not isinstance(config, Mapping):
        raise DatasetError(f"the dataset config must be a mapping with a 'name' key, "
                           f"got {type(config).__name__}")
    name = config.get("name")
    if name == "arithmetic":
        allowed = tuple(ARITHMETIC_DEFAULTS)
    elif name in _FILE_DATASETS:
        allowed = FILE_DATASET_KEYS
    else:
        raise DatasetError(f"dataset name {name!r} is unknown; set 'name' to one of "
                           f"'arithmetic', 'gsm8k', 'math'")
    unknown = sorted(set(config) - {"name", "limit", *allowed})
    if unknown:
        raise DatasetError(f"unknown key(s) {unknown} in the '{name}' dataset config; "
                           f"allowed keys: name, limit, {', '.join(allowed)}")
    limit = config.get("limit")
    if limit is not None and (not _is_int(limit) or limit < 1):
        raise DatasetError(f"limit must be a positive integer (or absent), got {limit!r}")
    if not isinstance(split, str) or not split:
        raise DatasetError(f"split must be a non-empty string such as 'train', got {split!r}")

    if name == "arithmetic":
        loaded = _load_arithmetic(config, split)
    else:
        loaded = _load_file_dataset(config, split)
    if limit is not None:
        loaded.problems = loaded.problems[:limit]
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
    for key in ("min_operand", "max_operand", "num_operands", "split_seed"):
        if not _is_int(knobs[key]):
            raise DatasetError(f"arithmetic {key} must be an integer, got {knobs[key]!r}")
    if knobs["min_operand"] < 0:
        raise DatasetError(f"arithmetic min_operand must be >= 0 (use ops '-' for negative "
                           f"answers), got {knobs['min_operand']}")
    if knobs["max_operand"] < knobs["min_operand"]:
        raise DatasetError(f"arithmetic max_operand ({knobs['max_operand']}) is below "
                           f"min_operand ({knobs['min_operand']}); set max_operand >= min_operand")
    if knobs["num_operands"] < 2:
        raise DatasetError(f"arithmetic num_operands must be >= 2, got {knobs['num_operands']}")
    ops = knobs["ops"]
    if not isinstance(ops, str) or not ops or set(ops) - set(ARITHMETIC_OPS):
        raise DatasetError(f"arithmetic ops must be a non-empty string of characters from "
                           f"'{ARITHMETIC_OPS}' (e.g. '+-'), got {ops!r}")
    knobs["ops"] = "".join(sorted(set(ops), key=ARITHMETIC_OPS.index))
    fraction = knobs["test_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0 < fraction < 1:
        raise DatasetError(f"arithmetic test_fraction must be a number in (0, 1), "
                           f"got {fraction!r}")
    cap = knobs["max_problems"]
    if cap is not None and (not _is_int(cap) or cap < 2):
        raise DatasetError(f"arithmetic max_problems must be an integer >= 2 (one problem per "
                           f"split at least) or absent, got {cap!r}")
    return knobs


def arithmetic_splits(knobs: Mapping) -> dict[str, list[MathProblem]]:
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
        raise DatasetError("the arithmetic task has a single problem; widen "
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
    return {split: [MathProblem(f"arithmetic/{split}/{index}", question, answer)
                    for _, index, question, answer in parts[split]]
            for split in ARITHMETIC_SPLITS}


@functools.lru_cache(maxsize=4)
def _cached_arithmetic_splits(knob_items: tuple) -> dict[str, list[MathProblem]]:
    # An env loads "train" and "test" separately; both come from one generation.
    return arithmetic_splits(dict(knob_items))


def _load_arithmetic(config: Mapping, split: str) -> LoadedDataset:
    knobs = arithmetic_knobs(config)
    if split not in ARITHMETIC_SPLITS:
        raise DatasetError(f"split {split!r} is unknown for the arithmetic dataset; use "
                           f"'train' or 'test'")
    splits = _cached_arithmetic_splits(tuple(sorted(knobs.items())))
    return LoadedDataset(list(splits[split]), "arithmetic")


# ---------------------------------------------------------------------------------------------
# GSM8K / MATH files and hub datasets


class _BadRow(Exception):
    """A malformed row: ``problem`` says what is wrong, ``fix`` how to repair it."""

    def __init__(self, problem: str, fix: str):
        super().__init__(problem)
        self.problem, self.fix = problem, fix


def _resolve_path(name: str, path: str, split: str) -> Path | None:
    """The local file to read, or None when ``path`` is a hub id."""
    local = Path(os.path.expanduser(path))
    if local.is_dir():
        for suffix in FILE_SUFFIXES:
            if (local / f"{split}{suffix}").is_file():
                return local / f"{split}{suffix}"
        found = sorted(p.name for p in local.iterdir())[:20]
        raise DatasetError(
            f"{name} dataset directory {str(local)!r} has no file for split {split!r} "
            f"(looked for {', '.join(split + s for s in FILE_SUFFIXES)}; found {found}); "
            f"add the file, request one of the splits present, or set path to a file")
    if local.is_file():
        if local.suffix not in FILE_SUFFIXES:
            raise DatasetError(f"{name} dataset file {str(local)!r} has an unsupported "
                               f"suffix; use one of {', '.join(FILE_SUFFIXES)}")
        return local
    if path.startswith(("/", ".", "~")) or path.endswith(FILE_SUFFIXES):
        raise DatasetError(f"{name} dataset path {path!r} does not exist (relative paths "
                           f"resolve against {os.getcwd()!r}); fix 'path'")
    return None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            location = f"line {line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield location, _BadRow("is not valid UTF-8", "re-encode the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield location, json.loads(line)
            except json.JSONDecodeError as e:
                yield location, _BadRow(f"is not valid JSON ({e.msg} at column {e.colno})",
                                        "write one JSON object per line")


def _json_rows(path: Path) -> Iterator[tuple[str, object]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{str(path)!r} is not a valid UTF-8 JSON file ({e}); for one "
                           f"object per line use the .jsonl suffix") from e
    if not isinstance(data, list):
        raise DatasetError(f"{str(path)!r} must hold a JSON array of row objects, found "
                           f"{type(data).__name__}; for one object per line use .jsonl")
    for index, row in enumerate(data):
        yield f"row {index}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except Exception as e:
        raise DatasetError(f"could not read parquet file {str(path)!r}: {e}") from e
    for index, row in enumerate(rows):
        yield f"row {index}", row


def _hub_rows(name: str, hub_id: str, subset: str | None, split: str):
    import datasets

    try:
        dataset = datasets.load_dataset(hub_id, subset, split=split)
    except Exception as e:
        raise DatasetError(
            f"could not load {name} dataset {hub_id!r} (subset {subset!r}, split {split!r}) "
            f"from the Hugging Face hub: {e}; check 'path', 'subset' and the split, or set "
            f"path to a local .jsonl/.json/.parquet file") from e
    return ((f"row {index}", row) for index, row in enumerate(dataset))


def _field_text(row: Mapping, key: str, role: str) -> str:
    """Non-empty text of ``row[key]`` (numbers are accepted for answers)."""
    if key not in row:
        setting = "question_field" if role == "question" else "answer_field"
        raise _BadRow(f"has no field '{key}' (fields: {sorted(row)})",
                      f"set {setting} to the field that holds the {role}")
    value = row[key]
    if role == "answer" and (isinstance(value, (int, float)) and not isinstance(value, bool)):
        value = str(value)
    if not isinstance(value, str):
        raise _BadRow(f"field '{key}' is {type(value).__name__}, not text",
                      f"store the {role} as a string")
    if not value.strip():
        raise _BadRow(f"field '{key}' is empty", f"fill in the {role}")
    return value


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


def _problem_fields(row, name: str, question_key: str, answer_key: str | None,
                    answer_format: str | None) -> tuple[str, str]:
    if not isinstance(row, Mapping):
        raise _BadRow(f"is a {type(row).__name__}, not an object", "make every row an object "
                      "with a question and an answer field")
    question = _field_text(row, question_key, "question").strip()
    if answer_key is None:  # MATH: a final "answer" (MATH-500) wins over a "solution"
        answer_key = "answer" if row.get("answer") not in (None, "") else "solution"
    if answer_format is None:
        answer_format = {"gsm8k": "gsm8k"}.get(name,
                                               "boxed" if answer_key == "solution" else "plain")
    return question, _gold_answer(_field_text(row, answer_key, "answer"), answer_key,
                                  answer_format)


def _load_file_dataset(config: Mapping, split: str) -> LoadedDataset:
    name = config["name"]
    default_question, default_answer, default_subset = _FILE_DATASETS[name]
    path = config.get("path")
    if not isinstance(path, str) or not path:
        raise DatasetError(
            f"the {name} dataset needs 'path': a local .jsonl/.json/.parquet file, a directory "
            f"holding <split>.jsonl/.parquet, or a hub id such as "
            f"{'openai/gsm8k' if name == 'gsm8k' else 'HuggingFaceH4/MATH-500'}")
    on_bad_row = config.get("on_bad_row", "error")
    if on_bad_row not in ("error", "skip"):
        raise DatasetError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    answer_format = config.get("answer_format")
    if answer_format is not None and answer_format not in ANSWER_FORMATS:
        raise DatasetError(f"answer_format must be one of {', '.join(ANSWER_FORMATS)}, "
                           f"got {answer_format!r}")
    question_key = config.get("question_field", default_question)
    answer_key = config.get("answer_field", default_answer)
    for key, value in (("question_field", question_key), ("answer_field", answer_key)):
        if value is not None and (not isinstance(value, str) or not value):
            raise DatasetError(f"{key} must be a field name, got {value!r}")

    local = _resolve_path(name, path, split)
    if local is None:
        source = path
        rows = _hub_rows(name, path, config.get("subset", default_subset), split)
    else:
        source = str(local)
        readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows}
        rows = readers[local.suffix](local)

    problems, skipped = [], 0
    for index, (location, row) in enumerate(rows):
        try:
            if isinstance(row, _BadRow):
                raise row
            question, answer = _problem_fields(row, name, question_key, answer_key,
                                               answer_format)
        except _BadRow as bad:
            if on_bad_row == "skip":
                skipped += 1
                continue
            raise DatasetError(f"{source}, {location}: {bad.problem}. Fix: {bad.fix}, or set "
                               f"on_bad_row: skip to skip such rows") from None
        problems.append(MathProblem(f"{name}/{split}/{index}", question, answer))
    return LoadedDataset(problems, source, skipped)
