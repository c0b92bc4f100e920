"""Math datasets (envs/math/datasets.py): arithmetic splits, GSM8K/MATH files, hub boundary."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from envs.math.datasets import (
    ARITHMETIC_ENUMERATION_CAP,
    DatasetError,
    MathProblem,
    evaluate_arithmetic,
    load_problems,
)


def arithmetic(split="train", **knobs):
    return load_problems({"name": "arithmetic", **knobs}, split)


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
    questions = [p.question for p in train.problems + test.problems]
    assert len(questions) == len(set(questions)) == 30 * 30  # every a+b with 0 <= a, b <= 29
    assert set(questions) == {f"{a}+{b}=" for a in range(30) for b in range(30)}
    assert 0.05 < len(test.problems) / 900 < 0.15  # test_fraction 0.1
    for problem in train.problems + test.problems:
        a, b = problem.question[:-1].split("+")
        assert problem.answer == str(int(a) + int(b))
    assert MathProblem("arithmetic/train/0", "0+0=", "0") in train.problems  # index: a + 30 b
    assert MathProblem("arithmetic/train/61", "1+2=", "3") in train.problems
    uids = [p.uid for p in train.problems + test.problems]
    assert len(set(uids)) == len(uids)


def test_arithmetic_split_is_deterministic_and_seeded():
    first = [p.question for p in arithmetic("test").problems]
    assert first == [p.question for p in arithmetic("test").problems]
    other_seed = [p.question for p in arithmetic("test", split_seed=1).problems]
    assert set(other_seed) != set(first)
    # membership depends on the question and seed only, not on the rest of the space
    wider = {p.question for p in arithmetic("test", max_operand=40).problems}
    assert set(first) <= wider


def test_arithmetic_difficulty_knobs_and_brute_force_answers():
    knobs = {"min_operand": 2, "max_operand": 6, "ops": "+-*", "num_operands": 3}
    problems = arithmetic("train", **knobs).problems + arithmetic("test", **knobs).problems
    assert len(problems) == 5**3 * 3**2
    for problem in problems:
        assert problem.question.endswith("=") and " " not in problem.question
        operands = [int(x) for x in problem.question[:-1].replace("-", "+").replace("*", "+")
                    .split("+")]
        assert all(2 <= x <= 6 for x in operands) and len(operands) == 3
        assert problem.answer == str(eval(problem.question[:-1]))  # Python's precedence
    assert any(p.answer.startswith("-") for p in problems)  # negative answers with "-"
    assert evaluate_arithmetic([2, 3, 4, 5], "*-*") == 2 * 3 - 4 * 5


def test_arithmetic_large_space_is_sampled_without_replacement():
    knobs = {"max_operand": 999, "num_operands": 3, "max_problems": 2000, "split_seed": 7}
    train, test = arithmetic("train", **knobs), arithmetic("test", **knobs)
    questions = [p.question for p in train.problems + test.problems]
    assert len(questions) == len(set(questions)) == 2000
    assert questions == [p.question for p in arithmetic("train", **knobs).problems
                         + arithmetic("test", **knobs).problems]
    assert [p.question for p in arithmetic("train", **{**knobs, "split_seed": 8}).problems] \
        != [p.question for p in train.problems]


def test_arithmetic_space_beyond_the_cap_is_sampled_to_the_cap():
    knobs = {"max_operand": 999, "num_operands": 3}  # 10^9 combinations, no max_problems
    sizes = [len(arithmetic(split, **knobs).problems) for split in ("train", "test")]
    assert sum(sizes) == ARITHMETIC_ENUMERATION_CAP
    assert 0.09 < sizes[1] / sum(sizes) < 0.11


def test_arithmetic_tiny_space_still_fills_both_splits():
    knobs = {"min_operand": 0, "max_operand": 1, "test_fraction": 0.01}
    train, test = arithmetic("train", **knobs), arithmetic("test", **knobs)
    assert len(test.problems) >= 1 and len(train.problems) >= 1
    assert len(train.problems) + len(test.problems) == 4
    with pytest.raises(DatasetError, match="single problem"):
        arithmetic(min_operand=3, max_operand=3)


def test_limit_keeps_the_first_problems_a_uniform_sample_for_arithmetic():
    full = arithmetic("train").problems
    first = arithmetic("train", limit=100).problems
    assert first == full[:100]
    # the split is in seeded shuffled order, so the first problems span the operand range
    assert max(int(p.answer) for p in first) > 40 and min(int(p.answer) for p in first) < 18


@pytest.mark.parametrize("config, message", [
    ({"max_operand": 3, "min_operand": 5}, "max_operand \\(3\\) is below min_operand \\(5\\)"),
    ({"ops": "+/"}, "ops must be a non-empty string of characters from '\\+-\\*'"),
    ({"ops": ""}, "ops must be"),
    ({"test_fraction": 0}, "test_fraction must be a number in \\(0, 1\\)"),
    ({"test_fraction": 1.5}, "test_fraction"),
    ({"num_operands": 1}, "num_operands must be >= 2"),
    ({"min_operand": -1}, "min_operand must be >= 0"),
    ({"max_operand": "9"}, "max_operand must be an integer"),
    ({"max_problems": 1}, "max_problems must be an integer >= 2"),
    ({"max_operands": 9}, "unknown key\\(s\\) \\['max_operands'\\].*allowed keys"),
    ({"limit": 0}, "limit must be a positive integer"),
])
def test_arithmetic_bad_knobs_name_the_key(config, message):
    with pytest.raises(DatasetError, match=message):
        arithmetic("train", **config)


def test_unknown_name_and_split():
    with pytest.raises(DatasetError, match="dataset name 'gsm9k' is unknown.*'arithmetic'"):
        load_problems({"name": "gsm9k"}, "train")
    with pytest.raises(DatasetError, match="split 'validation' is unknown.*'train' or 'test'"):
        arithmetic("validation")
    with pytest.raises(DatasetError, match="mapping with a 'name' key"):
        load_problems(["arithmetic"], "train")


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
    loaded = load_problems({"name": "gsm8k", "path": str(path)}, "train")
    assert loaded.source == str(path) and loaded.skipped_rows == 0
    assert loaded.problems == [
        MathProblem("gsm8k/train/0", GSM8K_ROWS[0]["question"], "7"),
        MathProblem("gsm8k/train/1", GSM8K_ROWS[1]["question"], "1500"),
        MathProblem("gsm8k/train/2", GSM8K_ROWS[2]["question"], "-3"),
    ]
    limited = load_problems({"name": "gsm8k", "path": str(path), "limit": 2}, "train")
    assert [p.answer for p in limited.problems] == ["7", "1500"]


def test_math_jsonl_boxed_and_answer_column(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", MATH_ROWS)
    loaded = load_problems({"name": "math", "path": str(path)}, "test")
    assert [p.answer for p in loaded.problems] == ["\\frac{1}{2}", "\\sqrt{x^{2}}", "\\{1, 2\\}"]
    assert loaded.problems[0].uid == "math/test/0"
    # MATH-500 rows carry a final "answer" beside the solution: it wins
    math500 = write_jsonl(tmp_path / "math500.jsonl", [
        {"problem": "p", "solution": "long ... \\boxed{0.5}", "answer": "\\frac{1}{2}"},
        {"problem": "q", "answer": "\\text{(C)}"}])
    assert [p.answer for p in load_problems({"name": "math", "path": str(math500)},
                                            "test").problems] == ["\\frac{1}{2}", "\\text{(C)}"]


def test_parquet_and_json_and_directory(tmp_path):
    pd.DataFrame(GSM8K_ROWS).to_parquet(tmp_path / "train.parquet")
    (tmp_path / "test.json").write_text(json.dumps(GSM8K_ROWS[:2]))
    from_dir = load_problems({"name": "gsm8k", "path": str(tmp_path)}, "train")
    assert from_dir.source == str(tmp_path / "train.parquet")
    assert [p.answer for p in from_dir.problems] == ["7", "1500", "-3"]
    from_json = load_problems({"name": "gsm8k", "path": str(tmp_path)}, "test")
    assert [p.answer for p in from_json.problems] == ["7", "1500"]
    with pytest.raises(DatasetError, match="no file for split 'validation'.*train.parquet"):
        load_problems({"name": "gsm8k", "path": str(tmp_path)}, "validation")


def test_custom_fields_and_plain_answers(tmp_path):
    path = write_jsonl(tmp_path / "custom.jsonl", [{"q": "1+1?", "final": 2},
                                                   {"q": "half?", "final": "\\frac{1}{2}"}])
    loaded = load_problems({"name": "math", "path": str(path), "question_field": "q",
                            "answer_field": "final"}, "train")
    assert [(p.question, p.answer) for p in loaded.problems] == [("1+1?", "2"),
                                                                 ("half?", "\\frac{1}{2}")]
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"question": "q", "answer": "42"}])
    assert load_problems({"name": "gsm8k", "path": str(plain), "answer_format": "plain"},
                         "train").problems[0].answer == "42"
    with pytest.raises(DatasetError, match="line 1: field 'answer' has no final answer after "
                                           "'####'.*answer_format: plain"):
        load_problems({"name": "gsm8k", "path": str(plain)}, "train")


BAD_GSM8K_LINES = [
    ('{"question": "q", "answer": "#### 1"}', None),
    ('{"question": "q", "answer": "#### 1"', "is not valid JSON"),
    ('{"question": "q"}', "has no field 'answer' \\(fields: \\['question'\\]\\).*answer_field"),
    ('{"query": "q", "answer": "#### 1"}', "has no field 'question'.*set question_field"),
    ('{"question": "q", "answer": "   "}', "field 'answer' is empty"),
    ('{"question": "", "answer": "#### 1"}', "field 'question' is empty"),
    ('{"question": "q", "answer": "the end"}', "no final answer after '####'"),
    ('{"question": "q", "answer": "#### "}', "no final answer after '####'"),
    ('{"question": ["q"], "answer": "#### 1"}', "field 'question' is list, not text"),
    ('["q", "#### 1"]', "is a list, not an object"),
]


@pytest.mark.parametrize("line, message", [case for case in BAD_GSM8K_LINES if case[1]])
def test_bad_jsonl_row_error_names_file_line_field_and_fix(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GSM8K_ROWS[0], "", line])  # blank line 2
    with pytest.raises(DatasetError) as error:
        load_problems({"name": "gsm8k", "path": str(path)}, "train")
    text = str(error.value)
    assert text.startswith(f"{path}, line 3: ")
    assert "set on_bad_row: skip to skip such rows" in text
    assert re.search(message, text), text


def test_bad_rows_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [line for line, _ in BAD_GSM8K_LINES])
    loaded = load_problems({"name": "gsm8k", "path": str(path), "on_bad_row": "skip"}, "train")
    assert loaded.skipped_rows == len(BAD_GSM8K_LINES) - 1
    assert loaded.problems == [MathProblem("gsm8k/train/0", "q", "1")]
    # uids keep the source index of the surviving rows
    path = write_jsonl(tmp_path / "mixed2.jsonl", ['{"question": "q"}', GSM8K_ROWS[0]])
    loaded = load_problems({"name": "gsm8k", "path": str(path), "on_bad_row": "skip"}, "train")
    assert [p.uid for p in loaded.problems] == ["gsm8k/train/1"]


def test_non_utf8_line_is_a_bad_row(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GSM8K_ROWS[0]).encode() + b"\n"
                     + '{"question": "caf\xe9", "answer": "#### 1"}'.encode("latin-1") + b"\n")
    with pytest.raises(DatasetError, match="line 2: is not valid UTF-8"):
        load_problems({"name": "gsm8k", "path": str(path)}, "train")
    loaded = load_problems({"name": "gsm8k", "path": str(path), "on_bad_row": "skip"}, "train")
    assert (len(loaded.problems), loaded.skipped_rows) == (1, 1)


def test_bad_math_and_parquet_rows(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", [MATH_ROWS[0],
                                                 {"problem": "p", "solution": "no box here"},
                                                 {"problem": "p", "solution": "\\boxed{unclosed"}])
    with pytest.raises(DatasetError, match=f"{path}, line 2: field 'solution' has no complete "
                                           "\\\\boxed"):
        load_problems({"name": "math", "path": str(path)}, "train")
    skipped = load_problems({"name": "math", "path": str(path), "on_bad_row": "skip"}, "train")
    assert (len(skipped.problems), skipped.skipped_rows) == (1, 2)

    parquet = tmp_path / "bad.parquet"
    pd.DataFrame([{"question": "q", "answer": "#### 1"}, {"question": "q", "answer": None}]) \
        .to_parquet(parquet)
    with pytest.raises(DatasetError, match=f"{parquet}, row 1: field 'answer' is NoneType"):
        load_problems({"name": "gsm8k", "path": str(parquet)}, "train")
    missing_column = tmp_path / "nocol.parquet"
    pd.DataFrame([{"question": "q", "solution": "#### 1"}]).to_parquet(missing_column)
    with pytest.raises(DatasetError, match="row 0: has no field 'answer'.*answer_field"):
        load_problems({"name": "gsm8k", "path": str(missing_column)}, "train")


@pytest.mark.parametrize("config, message", [
    ({"name": "gsm8k"}, "the gsm8k dataset needs 'path'.*openai/gsm8k"),
    ({"name": "gsm8k", "path": "./missing.jsonl"}, "path './missing.jsonl' does not exist"),
    ({"name": "math", "path": "/nowhere/math.parquet"}, "does not exist.*fix 'path'"),
    ({"name": "gsm8k", "path": "x", "on_bad_row": "ignore"}, "on_bad_row must be 'error' or "
                                                              "'skip'"),
    ({"name": "gsm8k", "path": "x", "answer_format": "latex"}, "answer_format must be one of"),
    ({"name": "gsm8k", "path": "x", "max_operand": 3}, "unknown key\\(s\\) \\['max_operand'\\]"),
])
def test_bad_file_config(config, message):
    with pytest.raises(DatasetError, match=message):
        load_problems(config, "train")


def test_unsupported_suffix_and_bad_json(tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_text("question,answer\n")
    with pytest.raises(DatasetError, match="unsupported suffix; use one of .jsonl, .json"):
        load_problems({"name": "gsm8k", "path": str(csv)}, "train")
    not_array = tmp_path / "data.json"
    not_array.write_text('{"question": "q"}')
    with pytest.raises(DatasetError, match="must hold a JSON array.*use .jsonl"):
        load_problems({"name": "gsm8k", "path": str(not_array)}, "train")


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
    loaded = load_problems({"name": "gsm8k", "path": "openai/gsm8k"}, "test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert loaded.source == "openai/gsm8k"
    assert [p.answer for p in loaded.problems] == ["7", "1500", "-3"]
    assert loaded.problems[2].uid == "gsm8k/test/2"

    math500 = load_problems({"name": "math", "path": "HuggingFaceH4/MATH-500"}, "test")
    assert calls[-1] == ("HuggingFaceH4/MATH-500", None, "test")
    assert math500.problems == [MathProblem("math/test/0", "p", "3")]
    load_problems({"name": "gsm8k", "path": "openai/gsm8k", "subset": "socratic"}, "train")
    assert calls[-1] == ("openai/gsm8k", "socratic", "train")

    with pytest.raises(DatasetError, match="could not load gsm8k dataset 'openai/gsm8k'.*"
                                           "Unknown split \"validation\""):
        load_problems({"name": "gsm8k", "path": "openai/gsm8k"}, "validation")
