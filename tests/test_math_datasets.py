"""Prompt datasets (envs/math/datasets.py): arithmetic splits, rows files, GSM8K/MATH files,
held-out splits, hub boundary."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from envs.math.datasets import (
    ARITHMETIC_ENUMERATION_CAP,
    DatasetError,
    evaluate_arithmetic,
    last_boxed_content,
    load_rows,
)


def arithmetic(split="train", **knobs):
    return load_rows({"name": "arithmetic", **knobs}, split)


def row(uid, prompt, answer, **columns):
    return {"uid": uid, "prompt": prompt, "answer": answer, **columns}


def write_jsonl(path: Path, rows) -> Path:
    """Rows are dicts (written as JSON) or raw strings (written as they are)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n"
                            for row in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Arithmetic


def test_arithmetic_default_task_is_complete_disjoint_and_correct():
    train, test = arithmetic("train"), arithmetic("test")
    assert train.source == "arithmetic" and train.skipped_rows == 0
    questions = [p["prompt"] for p in train.rows + test.rows]
    assert len(questions) == len(set(questions)) == 30 * 30  # every a+b with 0 <= a, b <= 29
    assert set(questions) == {f"{a}+{b}=" for a in range(30) for b in range(30)}
    assert 0.05 < len(test.rows) / 900 < 0.15  # test_fraction 0.1
    for problem in train.rows + test.rows:
        a, b = problem["prompt"][:-1].split("+")
        assert problem["answer"] == str(int(a) + int(b))
    assert row("arithmetic/train/0", "0+0=", "0") in train.rows  # index: a + 30 b
    assert row("arithmetic/train/61", "1+2=", "3") in train.rows
    uids = [p["uid"] for p in train.rows + test.rows]
    assert len(set(uids)) == len(uids)


def test_arithmetic_split_is_deterministic_and_seeded():
    first = [p["prompt"] for p in arithmetic("test").rows]
    assert first == [p["prompt"] for p in arithmetic("test").rows]
    other_seed = [p["prompt"] for p in arithmetic("test", split_seed=1).rows]
    assert set(other_seed) != set(first)
    # membership depends on the question and seed only, not on the rest of the space
    wider = {p["prompt"] for p in arithmetic("test", max_operand=40).rows}
    assert set(first) <= wider


def test_arithmetic_difficulty_knobs_and_brute_force_answers():
    knobs = {"min_operand": 2, "max_operand": 6, "ops": "+-*", "num_operands": 3}
    problems = arithmetic("train", **knobs).rows + arithmetic("test", **knobs).rows
    assert len(problems) == 5**3 * 3**2
    for problem in problems:
        assert problem["prompt"].endswith("=") and " " not in problem["prompt"]
        operands = [int(x) for x in problem["prompt"][:-1].replace("-", "+").replace("*", "+")
                    .split("+")]
        assert all(2 <= x <= 6 for x in operands) and len(operands) == 3
        assert problem["answer"] == str(eval(problem["prompt"][:-1]))  # Python's precedence
    assert any(p["answer"].startswith("-") for p in problems)  # negative answers with "-"
    assert evaluate_arithmetic([2, 3, 4, 5], "*-*") == 2 * 3 - 4 * 5


def test_arithmetic_large_space_is_sampled_without_replacement():
    knobs = {"max_operand": 999, "num_operands": 3, "max_problems": 2000, "split_seed": 7}
    train, test = arithmetic("train", **knobs), arithmetic("test", **knobs)
    questions = [p["prompt"] for p in train.rows + test.rows]
    assert len(questions) == len(set(questions)) == 2000
    assert questions == [p["prompt"] for p in arithmetic("train", **knobs).rows
                         + arithmetic("test", **knobs).rows]
    assert [p["prompt"] for p in arithmetic("train", **{**knobs, "split_seed": 8}).rows] \
        != [p["prompt"] for p in train.rows]


def test_arithmetic_space_beyond_the_cap_is_sampled_to_the_cap():
    knobs = {"max_operand": 999, "num_operands": 3}  # 10^9 combinations, no max_problems
    sizes = [len(arithmetic(split, **knobs).rows) for split in ("train", "test")]
    assert sum(sizes) == ARITHMETIC_ENUMERATION_CAP
    assert 0.09 < sizes[1] / sum(sizes) < 0.11


def test_arithmetic_tiny_space_still_fills_both_splits():
    knobs = {"min_operand": 0, "max_operand": 1, "test_fraction": 0.01}
    train, test = arithmetic("train", **knobs), arithmetic("test", **knobs)
    assert len(test.rows) >= 1 and len(train.rows) >= 1
    assert len(train.rows) + len(test.rows) == 4
    with pytest.raises(DatasetError, match="single problem"):
        arithmetic(min_operand=3, max_operand=3)


def test_limit_keeps_the_first_problems_a_uniform_sample_for_arithmetic():
    full = arithmetic("train").rows
    first = arithmetic("train", limit=100).rows
    assert first == full[:100]
    # the split is in seeded shuffled order, so the first problems span the operand range
    assert max(int(p["answer"]) for p in first) > 40 and min(int(p["answer"]) for p in first) < 18


@pytest.mark.parametrize("config, message", [
    ({"max_operand": 3, "min_operand": 5},
     "\\['max_operand'\\]: 3 is below min_operand \\(5\\); set max_operand >= min_operand"),
    ({"ops": "+/"}, "\\['ops'\\]: got '\\+/'; use a non-empty string of characters from "
                    "'\\+-\\*'"),
    ({"ops": ""}, "\\['ops'\\]: got ''"),
    ({"test_fraction": 0}, "\\['test_fraction'\\]: got 0; use a number in \\(0, 1\\)"),
    ({"test_fraction": 1.5}, "test_fraction"),
    ({"num_operands": 1}, "\\['num_operands'\\]: got 1; use an integer >= 2"),
    ({"min_operand": -1}, "\\['min_operand'\\]: got -1; use an integer >= 0"),
    ({"max_operand": "9"}, "\\['max_operand'\\]: got '9'; use an integer"),
    ({"max_problems": 1}, "\\['max_problems'\\]: got 1; use an integer >= 2"),
    ({"max_operands": 9}, "unknown env_config key\\(s\\) 'dataset.max_operands' \\(did you "
                          "mean 'dataset.max_operand'\\?\\); valid keys are"),
    ({"limit": 0}, "\\['limit'\\]: got 0; use a positive integer"),
])
def test_arithmetic_bad_knobs_name_the_key(config, message):
    with pytest.raises(ValueError, match=message):
        arithmetic("train", **config)


def test_unknown_name_and_split():
    with pytest.raises(DatasetError, match="\\['name'\\]: name 'gsm9k' is unknown.*'arithmetic'"):
        load_rows({"name": "gsm9k"}, "train")
    with pytest.raises(DatasetError, match="split 'validation' is unknown.*'train' or 'test'"):
        arithmetic("validation")
    with pytest.raises(DatasetError, match="must be a mapping such as"):
        load_rows(["arithmetic"], "train")


# ---------------------------------------------------------------------------------------------
# GSM8K and MATH files

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
    {"question": "A car costs $1,200 and a bike $300. Total?", "answer": "So\n#### 1,500"},
    {"question": "Temperature drops 5 from 2?", "answer": "2-5=-3\n#### -3"},
]

MATH_ROWS = [
    {"problem": "Compute $\\frac{2}{4}$.", "solution": "Simplify: $\\boxed{\\frac{1}{2}}$."},
    {"problem": "Box?", "solution": "First $\\boxed{1}$, then $\\fbox{\\sqrt{x^{2}}}$"},
    {"problem": "Set?", "solution": "The set is $\\boxed{\\{1, 2\\}}$"},
]


def test_gsm8k_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS)
    loaded = load_rows({"name": "gsm8k", "path": str(path)}, "train")
    assert loaded.source == str(path) and loaded.skipped_rows == 0
    # the prompt is the question; the answer column holds the final answer after "####"
    assert [(r["uid"], r["prompt"], r["answer"]) for r in loaded.rows] == [
        ("gsm8k/train/0", GSM8K_ROWS[0]["question"], "7"),
        ("gsm8k/train/1", GSM8K_ROWS[1]["question"], "1500"),
        ("gsm8k/train/2", GSM8K_ROWS[2]["question"], "-3"),
    ]
    assert loaded.rows[0]["question"] == GSM8K_ROWS[0]["question"]  # other columns stay
    limited = load_rows({"name": "gsm8k", "path": str(path), "limit": 2}, "train")
    assert [p["answer"] for p in limited.rows] == ["7", "1500"]


def test_math_jsonl_boxed_and_answer_column(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", MATH_ROWS)  # a folder's test split
    loaded = load_rows({"name": "math", "path": str(tmp_path)}, "test")
    assert [p["answer"] for p in loaded.rows] == ["\\frac{1}{2}", "\\sqrt{x^{2}}", "\\{1, 2\\}"]
    assert loaded.rows[0]["uid"] == "math/test/0"
    # MATH-500 rows carry a final "answer" beside the solution: it wins
    math500 = write_jsonl(tmp_path / "math500.jsonl", [
        {"problem": "p", "solution": "long ... \\boxed{0.5}", "answer": "\\frac{1}{2}"},
        {"problem": "q", "solution": "", "answer": "\\text{(C)}"}])
    assert [p["answer"] for p in load_rows({"name": "math", "path": str(math500)},
                                           "train").rows] == ["\\frac{1}{2}", "\\text{(C)}"]


@pytest.mark.parametrize("solution, expected", [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{2} then \\boxed{3}", "3"),
    ("\\fbox{x^{2}+1}", "x^{2}+1"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces do not close the box
    ("\\boxed{\\}}", "\\}"),
    ("$\\boxed 5$", "5"),
    ("\\boxed{5\\text{ cm}}", "5\\text{ cm}"),  # the solution's own text, units kept
    ("\\boxed{}", None),
    ("\\boxed{12", None),  # unclosed
    ("\\boxed{1} and \\boxed{2", None),  # the last box counts, even if unclosed
    ("no box", None),
])
def test_gold_answer_of_a_math_solution(solution, expected):
    assert last_boxed_content(solution) == expected


def test_rows_with_a_prompt_column_keep_every_column(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [
        {"prompt": "2+2=", "answer": 4, "difficulty": "easy"},
        {"prompt": "3+3=", "answer": "6", "difficulty": "easy"}])
    loaded = load_rows({"path": str(path)}, "train")
    assert loaded.rows == [row("rows/train/0", "2+2=", "4", difficulty="easy"),
                           row("rows/train/1", "3+3=", "6", difficulty="easy")]
    # no answer column: rows without one (reward functions then need none)
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "Write a haiku."}])
    assert load_rows({"path": str(plain)}, "train").rows == [
        {"uid": "rows/train/0", "prompt": "Write a haiku."}]


def test_chat_rows_from_a_messages_column(tmp_path):
    conversation = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "2+2?"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation, "answer": "4"}])
    [loaded] = load_rows({"path": str(path)}, "train").rows
    assert loaded["prompt"] == conversation and loaded["answer"] == "4"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(DatasetError, match="row 0: field 'messages' is not a chat conversation"):
        load_rows({"path": str(bad)}, "train")


def test_a_single_file_is_train_only_unless_rows_are_held_out(tmp_path):
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(200)]
    path = write_jsonl(tmp_path / "all.jsonl", rows + [rows[0]])  # a repeated prompt at the end
    with pytest.raises(DatasetError, match="single file: it is the 'train' split.*training "
                                           "accuracy.*test_fraction"):
        load_rows({"path": str(path)}, "test")
    config = {"path": str(path), "test_fraction": 0.25}
    train, test = load_rows(config, "train"), load_rows(config, "test")
    prompts = {split: [r["prompt"] for r in loaded.rows] for split, loaded in
               (("train", train), ("test", test))}
    assert not set(prompts["train"]) & set(prompts["test"])  # the repeat stays on one side
    assert len(prompts["train"]) + len(prompts["test"]) == 201
    assert 0.15 < len(prompts["test"]) / 201 < 0.35
    assert prompts["train"] == [p for p in (r["prompt"] for r in rows + [rows[0]])
                                if p in set(prompts["train"])]  # the file's order
    assert test.rows[0]["uid"].startswith("rows/test/") and "held out as 'test'" in test.notes[0]
    other_seed = load_rows({**config, "split_seed": 1}, "test")
    assert {r["prompt"] for r in other_seed.rows} != set(prompts["test"])


def test_parquet_and_json_and_directory(tmp_path):
    pd.DataFrame(GSM8K_ROWS).to_parquet(tmp_path / "train.parquet")
    (tmp_path / "test.json").write_text(json.dumps(GSM8K_ROWS[:2]))
    from_dir = load_rows({"name": "gsm8k", "path": str(tmp_path)}, "train")
    assert from_dir.source == str(tmp_path / "train.parquet")
    assert [p["answer"] for p in from_dir.rows] == ["7", "1500", "-3"]
    from_json = load_rows({"name": "gsm8k", "path": str(tmp_path)}, "test")
    assert [p["answer"] for p in from_json.rows] == ["7", "1500"]
    with pytest.raises(DatasetError, match="no file for split 'validation'.*train.parquet"):
        load_rows({"name": "gsm8k", "path": str(tmp_path)}, "validation")


def test_custom_fields_and_plain_answers(tmp_path):
    path = write_jsonl(tmp_path / "custom.jsonl", [{"q": "1+1?", "final": 2},
                                                   {"q": "half?", "final": "\\frac{1}{2}"}])
    loaded = load_rows({"name": "math", "path": str(path), "prompt_field": "q",
                        "answer_field": "final"}, "train")
    assert [(p["prompt"], p["answer"]) for p in loaded.rows] == [("1+1?", "2"),
                                                                 ("half?", "\\frac{1}{2}")]
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"question": "q", "answer": "42"}])
    assert load_rows({"name": "gsm8k", "path": str(plain), "answer_format": "plain"},
                     "train").rows[0]["answer"] == "42"
    with pytest.raises(DatasetError, match="row 0: field 'answer' has no final answer after "
                                           "'####'.*answer_format: plain"):
        load_rows({"name": "gsm8k", "path": str(plain)}, "train")


BAD_GSM8K_ROWS = [
    ({"question": "q", "answer": "#### 1"}, None),
    ({"question": "q", "answer": None}, "has no field 'answer' \\(fields: \\['question'\\]\\)"),
    ({"query": "q", "answer": "#### 1"}, "field 'question'.*set dataset.prompt_field"),
    ({"question": "q", "answer": "   "}, "field 'answer' is empty"),
    ({"question": "", "answer": "#### 1"}, "field 'question' is empty"),
    ({"question": "q", "answer": "the end"}, "no final answer after '####'"),
    ({"question": "q", "answer": "#### "}, "no final answer after '####'"),
]


@pytest.mark.parametrize("bad, message", [case for case in BAD_GSM8K_ROWS if case[1]])
def test_bad_row_error_names_file_row_field_and_fix(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GSM8K_ROWS[0], GSM8K_ROWS[1], bad])
    with pytest.raises(DatasetError) as error:
        load_rows({"name": "gsm8k", "path": str(path)}, "train")
    text = str(error.value)
    assert text.startswith(f"env_config['dataset']: {path}, row 2: ")
    assert "set dataset.on_bad_row: skip to skip such rows" in text
    assert re.search(message, text), text


def test_bad_rows_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [bad for bad, _ in BAD_GSM8K_ROWS])
    loaded = load_rows({"name": "gsm8k", "path": str(path), "on_bad_row": "skip"}, "train")
    assert loaded.skipped_rows == len(BAD_GSM8K_ROWS) - 1
    assert [(r["uid"], r["prompt"], r["answer"]) for r in loaded.rows] == [
        ("gsm8k/train/0", "q", "1")]
    # uids keep the source index of the surviving rows
    path = write_jsonl(tmp_path / "mixed2.jsonl", [{"question": "q", "answer": ""},
                                                   GSM8K_ROWS[0]])
    loaded = load_rows({"name": "gsm8k", "path": str(path), "on_bad_row": "skip"}, "train")
    assert [p["uid"] for p in loaded.rows] == ["gsm8k/train/1"]


@pytest.mark.parametrize("text, message", [
    ('{"question": "q", "answer": "#### 1"}\n{"question": "q", "answer": "#### 1"',
     "could not read .*JSON parse error.*row 1"),
    ('{"question": "q", "answer": "#### 1"}\n{"question": "caf\xe9"}\n', "could not read"),
])
def test_a_file_that_does_not_parse_is_refused_whole(tmp_path, text, message):
    path = tmp_path / "broken.jsonl"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DatasetError, match=message):
        load_rows({"name": "gsm8k", "path": str(path), "on_bad_row": "skip"}, "train")


def test_bad_math_and_parquet_rows(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", [MATH_ROWS[0],
                                                 {"problem": "p", "solution": "no box here"},
                                                 {"problem": "p", "solution": "\\boxed{unclosed"}])
    with pytest.raises(DatasetError, match=f"{path}, row 1: field 'solution' has no complete "
                                           "\\\\boxed"):
        load_rows({"name": "math", "path": str(path)}, "train")
    skipped = load_rows({"name": "math", "path": str(path), "on_bad_row": "skip"}, "train")
    assert (len(skipped.rows), skipped.skipped_rows) == (1, 2)

    parquet = tmp_path / "bad.parquet"
    pd.DataFrame([{"question": "q", "answer": "#### 1"}, {"question": "q", "answer": None}]) \
        .to_parquet(parquet)
    with pytest.raises(DatasetError, match=f"{parquet}, row 1: has no field 'answer'"):
        load_rows({"name": "gsm8k", "path": str(parquet)}, "train")
    missing_column = tmp_path / "nocol.parquet"
    pd.DataFrame([{"question": "q", "solution": "#### 1"}]).to_parquet(missing_column)
    with pytest.raises(DatasetError, match="row 0: has no field 'answer'.*answer_field"):
        load_rows({"name": "gsm8k", "path": str(missing_column)}, "train")


@pytest.mark.parametrize("config, message", [
    ({"name": "gsm8k"}, "\\['path'\\]: is missing.*openai/gsm8k"),
    ({"name": "gsm8k", "path": "./missing.jsonl"}, "'./missing.jsonl' does not exist"),
    ({"name": "math", "path": "/nowhere/math.parquet"}, "does not exist.*fix the path"),
    ({"path": "data/x/train.jsonl"}, "does not exist"),
    ({"name": "gsm8k", "path": "x", "on_bad_row": "ignore"}, "\\['on_bad_row'\\]: got "
                                                              "'ignore'; use 'error' or 'skip'"),
    ({"name": "gsm8k", "path": "x", "answer_format": "latex"}, "answer_format'\\]: got 'latex'"),
    ({"name": "gsm8k", "path": "x", "max_operand": 3}, "unknown env_config key\\(s\\) "
                                                       "'dataset.max_operand'"),
    ({"path": "x", "prompt_feld": "q"}, "'dataset.prompt_feld' \\(did you mean "
                                         "'dataset.prompt_field'\\?\\)"),
    ({"path": "x", "test_fraction": 1}, "test_fraction'\\]: got 1; use a number in \\(0, 1\\)"),
])
def test_bad_file_config(config, message):
    with pytest.raises(ValueError, match=message):
        load_rows(config, "train")


def test_unsupported_suffix_and_bad_json(tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_text("question,answer\n")
    with pytest.raises(DatasetError, match="unsupported suffix; use one of .jsonl, .json"):
        load_rows({"name": "gsm8k", "path": str(csv)}, "train")


# ---------------------------------------------------------------------------------------------
# Hugging Face hub (the call boundary is datasets.load_dataset; no network here)


def test_hub_id_goes_to_datasets_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        if split not in ("train", "test"):
            raise ValueError(f'Unknown split "{split}". Should be one of [\'train\', \'test\'].')
        if path == "HuggingFaceH4/MATH-500":
            return datasets.Dataset.from_list([
                {"problem": "p", "solution": "\\boxed{3}", "answer": "3"}])
        return datasets.Dataset.from_list(GSM8K_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = load_rows({"name": "gsm8k", "path": "openai/gsm8k"}, "test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert loaded.source == "openai/gsm8k"
    assert [p["answer"] for p in loaded.rows] == ["7", "1500", "-3"]
    assert loaded.rows[2]["uid"] == "gsm8k/test/2"

    math500 = load_rows({"name": "math", "path": "HuggingFaceH4/MATH-500"}, "test")
    assert calls[-1] == ("HuggingFaceH4/MATH-500", None, "test")
    assert [(r["uid"], r["prompt"], r["answer"]) for r in math500.rows] == [
        ("math/test/0", "p", "3")]
    load_rows({"name": "gsm8k", "path": "openai/gsm8k", "subset": "socratic"}, "train")
    assert calls[-1] == ("openai/gsm8k", "socratic", "train")
    # held-out rows of a hub dataset come from its train split
    load_rows({"name": "gsm8k", "path": "openai/gsm8k", "test_fraction": 0.5}, "test")
    assert calls[-1] == ("openai/gsm8k", "main", "train")

    with pytest.raises(DatasetError, match="could not load the gsm8k dataset 'openai/gsm8k'.*"
                                           "Unknown split \"validation\""):
        load_rows({"name": "gsm8k", "path": "openai/gsm8k"}, "validation")


def test_an_unreachable_hub_leaves_a_note_and_a_missing_hub_dataset_is_refused(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    from envs.math.datasets import DatasetError, unreachable_hub_note

    def offline(repo_id, timeout=None):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "dataset_info", offline)
    note = unreachable_hub_note({"name": "gsm8k", "path": "openai/gsm8k"})
    assert "could not be checked" in note and "downloaded when the run starts" in note
    assert unreachable_hub_note({"name": "arithmetic"}) is None
    assert unreachable_hub_note({"path": "data/train.jsonl"}) is None  # local: not probed

    class NotFound(RepositoryNotFoundError):
        def __init__(self):
            Exception.__init__(self, "404")

    def missing(repo_id, timeout=None):
        raise NotFound()

    monkeypatch.setattr(huggingface_hub, "dataset_info", missing)
    with pytest.raises(DatasetError, match="does not exist"):
        unreachable_hub_note({"path": "nobody/no-such-dataset"})
