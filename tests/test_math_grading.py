"""Answer extraction and grading (envs/math/grading.py): outcomes, timeouts, crashes, Ray."""

import os
import pickle
import random
import signal
import threading
import time

import pytest

from envs.math.grading import (
    STYLES,
    AnswerChecker,
    Grade,
    _exact_number_comparison,
    _math_verify_comparison,
    _parse_whole,
    _plain_number_outcome,
    extract_answer,
)

PATHOLOGICAL = "\\boxed{9^{9^{9^{9}}}}"  # comparing it, sympy evaluates the tower: hangs
# Reading it, math-verify's LaTeX parser backtracks for ever over the nested parentheses.
UNPARSABLE = "\\boxed{" + "(" * 100 + "1" + ")" * 100 + "}"


def hooked_verifier(predicted: str, gold: str) -> bool:
    """Test verifier run in the grading process (AnswerChecker(verifier=...))."""
    if predicted == "hang":  # stuck where SIGALRM cannot reach: only the watchdog helps
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)
    if predicted == "boom":
        raise RuntimeError("checker bug")
    if predicted == "crash":
        os._exit(3)
    return predicted == gold


HOOK = f"{__name__}:hooked_verifier"


@pytest.mark.parametrize("style, text, expected", [
    # ours: the GSM8K "####" line, then math-verify reads the answer in it
    ("gsm8k", "3+4=7\n#### 7", "7"),
    ("gsm8k", "#### $1,234.50.\nbye", "1234.50"),
    ("gsm8k", "#### 1\n#### 2", "2"),
    ("gsm8k", "####", None),
    ("gsm8k", "#### 72 apples", "72"),
    # math-verify: an announced answer, else the last number or expression
    ("gsm8k", "The answer is 72.", "72"),
    ("gsm8k", "12-5=7, so x-3 is -3", "-3"),
    ("gsm8k", "She pays $1,234.50 in total.", "1234.50"),
    ("gsm8k", "version v1.5", None),
    ("gsm8k", "half is 1/2", "1/2"),
    # Our old regex said "3"; math-verify reads "1,2" as a decimal comma. A list of numbers is
    # no GSM8K answer either way.
    ("gsm8k", "1,2,3", "1.2"),
    # math-verify: the last \boxed{}, LaTeX normalised; ours: \fbox read as \boxed
    ("boxed", "so \\boxed{\\frac12}.", "\\frac{1}{2}"),
    ("boxed", "\\fbox{x^{2}+1}", "x^{2}+1"),
    ("boxed", "\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces do not close the box
    ("boxed", "The final answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),  # announced, in LaTeX
    ("boxed", "The answer is 72", None),  # not LaTeX, not boxed
    ("boxed", "#### 7", None),
    ("boxed", "\\boxed{}", None),
    ("boxed", "\\boxed{12", None),  # truncated completion
    # Boxes close together (or joined by "and" or a comma) are one answer, a set: a completion
    # that boxes two candidates is not graded as either (our old rule took the last box).
    ("boxed", "\\boxed{2} then \\boxed{3}", "2,3"),
    ("boxed", "\\boxed{2} was my first guess but the carry makes it \\boxed{3}", "3"),
    # Our old rule gave None (the last box is unclosed); math-verify takes the last complete one.
    ("boxed", "\\boxed{1} and \\boxed{2", "1"),
    # ours: a plain completion is its first line, taken whole
    ("plain", "  19\n20", "19"),
    ("plain", "19 because", "19 because"),
    ("plain", "\n\n", None),
    # auto: boxed, else gsm8k
    ("auto", "\\boxed{5} #### 6 and 7", "5"),
    ("auto", "#### 6 \n then 7", "6"),
    ("auto", "then 7", "7"),
    ("auto", "", None),
])
def test_extract_answer(style, text, expected):
    assert extract_answer(text, style) == expected


def test_extract_answer_rejects_an_unknown_style():
    with pytest.raises(ValueError, match="style 'latex' is unknown"):
        extract_answer("5", "latex")


# style, completion, gold, correct, extracted
CASES = [
    # GSM8K style
    ("gsm8k", "8*9=72\n#### 72", "72", True, "72"),
    ("gsm8k", "#### 72", "72.0", True, "72"),
    ("gsm8k", "#### 72.0", "72", True, "72.0"),
    ("gsm8k", "The answer is 72", "72", True, "72"),
    ("gsm8k", "#### 1,000", "1000", True, "1000"),
    ("gsm8k", "The total is $1,234,567.", "1234567", True, "1234567"),
    ("gsm8k", "#### -5", "-5", True, "-5"),
    ("gsm8k", "#### 5", "-5", False, "5"),
    ("gsm8k", "#### 73", "72", False, "73"),
    ("gsm8k", "#### 72\n#### 73", "72", False, "73"),
    ("gsm8k", "I do not know", "72", False, None),
    ("gsm8k", "#### 0.5", "\\frac{1}{2}", True, "0.5"),
    ("gsm8k", "#### 3/4", "0.75", True, "3/4"),
    ("gsm8k", "#### 72 apples", "72", True, "72"),
    ("gsm8k", "So she has 50% of them left", "0.5", True, "50"),  # math-verify: percent
    # MATH style
    ("boxed", "\\boxed{\\frac12}", "0.5", True, "\\frac{1}{2}"),
    ("boxed", "\\boxed{1/2}", "\\frac{1}{2}", True, "\\frac{1}{2}"),
    ("boxed", "\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True, "\\frac{3}{4}"),
    ("boxed", "\\boxed{-\\frac{1}{2}}", "-0.5", True, "-\\frac{1}{2}"),
    ("boxed", "\\boxed{0.33}", "\\frac{1}{3}", False, "0.33"),
    # Two boxed candidates are one answer, {2, 3}: neither candidate alone earns the reward
    # (our old rule took the last box and paid for hedging); a gold set of both does.
    ("boxed", "first \\boxed{2}, finally \\boxed{3}", "3", False, "2,3"),
    ("boxed", "first \\boxed{2}, finally \\boxed{3}", "2", False, "2,3"),
    ("boxed", "\\boxed{2} and \\boxed{3}", "\\{2, 3\\}", True, "2,3"),
    ("boxed", "\\fbox{x^2+1}", "1+x^2", True, "x^2+1"),
    ("boxed", "\\boxed{x+1}", "x+2", False, "x+1"),
    ("boxed", "\\boxed{3\\sqrt{2}}", "\\sqrt{18}", True, "3\\sqrt{2}"),
    ("boxed", "\\boxed{\\text{(C)}}", "\\text{(C)}", True, "\\text{(C)}"),
    ("boxed", "\\boxed{\\text{(B)}}", "\\text{(C)}", False, "\\text{(B)}"),
    ("boxed", "\\boxed{\\text{Monday}}", "\\text{Monday}", True, "\\text{Monday}"),
    ("boxed", "\\boxed{5\\text{ cm}}", "5", True, "5"),  # math-verify drops units
    ("boxed", "\\boxed{(1,2)}", "(1, 2)", True, "(1,2)"),
    ("boxed", "\\boxed{1,000}", "1000", True, "1,000"),
    ("boxed", "\\boxed{\\pi}", "3.14", False, "\\pi"),
    ("boxed", "The answer is 72", "72", False, None),
    ("boxed", "The answer is $72$", "72", True, "72"),  # announced, in LaTeX
    ("boxed", "\\boxed{12", "12", False, None),
    # the tiny arithmetic model
    ("plain", "19\n", "19", True, "19"),
    ("plain", "-4", "-4", True, "-4"),
    ("plain", "19\n20", "20", False, "19"),
    ("plain", "19 because", "19", False, "19 because"),  # the whole first line is the answer
    ("plain", "", "19", False, None),
    # auto: boxed, then ####, then the last number
    ("auto", "so \\boxed{7} #### 8", "7", True, "7"),
    ("auto", "#### 8", "8", True, "8"),
    ("auto", "it is 9", "9", True, "9"),
    ("auto", "", "1", False, None),
    # odd input
    ("auto", "\ufffd\ufffd #### 5", "5", True, "5"),
    ("boxed", "\\boxed{\ufffd}", "5", False, "\ufffd"),
    ("auto", "\udcff 5", "5", True, "5"),
    ("boxed", "\\boxed{\udcff\\frac{}}", "5", False, "\udcff\\frac{}"),
]


@pytest.fixture(scope="module")
def checkers():
    made = {style: AnswerChecker(style, timeout_s=5) for style in STYLES}
    yield made
    for checker in made.values():
        checker.close()


@pytest.mark.parametrize("style, completion, gold, correct, extracted", CASES)
def test_grading_cases(checkers, style, completion, gold, correct, extracted):
    grade = checkers[style].grade(completion, gold)
    assert grade == Grade(float(correct), correct, extracted, None)


def test_grade_many_keeps_order_and_counts():
    with AnswerChecker("auto", timeout_s=5) as checker:
        grades = checker.grade_many(["#### 3", "\\boxed{\\frac{1}{2}}", "nothing", "#### 4"],
                                    ["3", "0.5", "1", "5"])
        assert [g.correct for g in grades] == [True, True, False, False]
        assert [g.reward for g in grades] == [1.0, 1.0, 0.0, 0.0]
        assert checker.counters == {"checked": 4, "correct": 2, "no_answer": 1, "timeouts": 0,
                                    "errors": 0}
        checker.grade("#### 3", "3")
        assert checker.counters["checked"] == 5 and checker.counters["correct"] == 3


def test_exact_number_path_agrees_with_math_verify():
    """The sympy-free path for plain numbers decides like math-verify does."""
    def compare(predicted, gold):  # math-verify's comparison, the exact path skipped
        return _math_verify_comparison(predicted, _parse_whole(predicted), gold)

    rng = random.Random(0)
    pairs = [("72", "72.0"), ("007", "7"), ("-0", "0"), ("1.50", "1.5"), ("3", "4"),
             ("-3", "3"), ("2.5", "2.50"), ("10", "1")]
    pairs += [(str(rng.randint(-50, 50)), str(rng.randint(-50, 50))) for _ in range(100)]
    decided = 0
    for predicted, gold in pairs:
        exact = _exact_number_comparison(predicted, gold)
        if exact is not None:
            decided += 1
            assert exact == compare(predicted, gold), (predicted, gold)
    assert decided == len(pairs)
    assert _exact_number_comparison("0.3333333", "0.3333334") is None  # rounding: math-verify
    assert _exact_number_comparison("\\frac{1}{2}", "0.5") is None


def test_plain_numbers_are_graded_in_the_caller_as_the_child_grades_them():
    """Plain-number answers skip the child (no process for the arithmetic task) with the
    child's outcome; anything math-verify must read still goes to the child."""
    items = [("plain", "19\n", "19"), ("plain", "-4", "4"), ("plain", "  ", "1"),
             ("plain", "1.50 ", "1.5"), ("gsm8k", "so #### 1,500.", "1500"),
             ("gsm8k", "#### \n", "3"), ("gsm8k", "#### 12", "13")]
    needs_child = [("plain", "19 because", "19"), ("plain", "1/2", "0.5"),
                   ("plain", "0.3333333", "0.3333334"), ("gsm8k", "#### 3/4", "0.75"),
                   ("gsm8k", "it is 7", "7"), ("boxed", "\\boxed{7}", "7"),
                   ("auto", "#### 7", "7")]
    for style, completion, gold in needs_child:
        assert _plain_number_outcome(completion, gold, style) is None
    for style, completion, gold in items:
        outcome = _plain_number_outcome(completion, gold, style)
        with AnswerChecker(style, timeout_s=5) as checker:
            assert outcome == checker._grade_in_child([(completion, gold)])[0], completion
    with AnswerChecker("plain", timeout_s=5) as checker:
        grades = checker.grade_many(["19", "20", "19 because"], ["19", "19", "19"])
        assert [g.correct for g in grades] == [True, False, False]
        assert checker.worker_pid is not None  # the last one needed the child
    with AnswerChecker("plain", timeout_s=5) as checker:
        assert [g.correct for g in checker.grade_many(["3", "4"], ["3", "3"])] == [True, False]
        assert checker.worker_pid is None and checker.counters["correct"] == 1


def test_pathological_input_times_out_and_checker_recovers():
    with AnswerChecker("boxed", timeout_s=1) as checker:
        start = time.monotonic()
        grades = checker.grade_many(
            ["\\boxed{2}", PATHOLOGICAL, UNPARSABLE, "\\boxed{\\frac{1}{2}}"], ["2", "5", "1", "0.5"])
        assert time.monotonic() - start < 20
        assert grades[1] == Grade(0.0, False, "9^{9^{9^{9}}}", "timeout")  # read, not compared
        assert grades[2] == Grade(0.0, False, None, "timeout")  # reading it timed out
        assert grades[3].correct  # items after the timed-out ones are graded
        assert checker.counters["timeouts"] == 2 and checker.counters["errors"] == 0
        assert checker.counters["no_answer"] == 0  # a timeout is not a missing answer
        pid = checker.worker_pid
        assert checker.grade("\\boxed{3}", "3").correct
        assert checker.grade("\\boxed{x^2}", "x^{2}").correct
        assert checker.worker_pid == pid  # the child's own timer fired; no restart


def test_timeout_works_when_called_from_a_thread():
    """Callers (Ray threaded actors, vLLM) are often not on the main thread."""
    results = []
    with AnswerChecker("boxed", timeout_s=1) as checker:
        thread = threading.Thread(
            target=lambda: results.extend(checker.grade_many([PATHOLOGICAL, "\\boxed{1/2}"],
                                                             ["5", "0.5"])))
        thread.start()
        thread.join(timeout=60)
    assert [g.failure for g in results] == ["timeout", None]
    assert results[1].correct


def test_watchdog_kills_a_child_that_ignores_the_timer():
    with AnswerChecker("plain", timeout_s=0.5, verifier=HOOK) as checker:
        assert checker.grade("7", "7").correct
        first_pid = checker.worker_pid
        start = time.monotonic()
        grades = checker.grade_many(["hang", "8", "9"], ["1", "8", "1"])
        elapsed = time.monotonic() - start
        assert grades[0] == Grade(0.0, False, None, "timeout")  # the killed child's reading
        assert [g.correct for g in grades[1:]] == [True, False]  # graded by a fresh child
        assert 2.5 <= elapsed < 30  # watchdog: 2 * timeout_s + 2 s
        assert checker.worker_pid not in (None, first_pid)
        assert checker.counters["timeouts"] == 1 and checker.counters["no_answer"] == 0
        assert checker.grade("5", "5").correct


def test_checker_exception_gives_zero_reward_and_is_counted():
    with AnswerChecker("plain", timeout_s=5, verifier=HOOK) as checker:
        assert checker.grade("boom", "boom") == Grade(0.0, False, "boom", "error")
        pid = checker.worker_pid
        assert checker.grade("3", "3").correct
        assert checker.worker_pid == pid
        assert checker.counters["errors"] == 1 and checker.counters["checked"] == 2


def test_child_crash_is_an_error_and_checker_restarts():
    with AnswerChecker("plain", timeout_s=5, verifier=HOOK) as checker:
        grades = checker.grade_many(["crash", "4"], ["1", "4"])
        assert grades[0].failure == "error" and grades[1].correct
        assert checker.counters["errors"] == 1


def test_odd_inputs_never_crash(checkers):
    checker = checkers["auto"]
    completions = ["", None, b"\xff\xfe #### 7", "\ufffd" * 1000, "x" * 1_000_000 + " 5",
                   "\\boxed{" * 500, "\x00\x01 \\boxed{\\frac{1}{0}}"]
    grades = checker.grade_many(completions, ["7"] * len(completions))
    assert [g.correct for g in grades] == [False, False, True, False, False, False, False]
    assert [g.extracted for g in grades[:3]] == [None, None, "7"]


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="style 'latex' is unknown"):
        AnswerChecker("latex")
    with pytest.raises(ValueError, match="timeout_s"):
        AnswerChecker(timeout_s=0)
    with pytest.raises(ValueError, match="verifier must be 'module:function'"):
        AnswerChecker(verifier="no_colon")
    checker = AnswerChecker()
    with pytest.raises(ValueError, match="2 completions but 1 gold"):
        checker.grade_many(["1", "2"], ["1"])
    with pytest.raises(TypeError, match="must be str"):
        checker.grade(12, "12")


def test_child_starts_lazily_and_close_stops_it():
    checker = AnswerChecker("boxed")
    assert checker.worker_pid is None
    assert checker.grade("\\boxed{2^2}", "4").correct
    pid = checker.worker_pid
    assert pid is not None
    with checker:
        pass
    assert checker.worker_pid is None
    with pytest.raises(ProcessLookupError):
        for _ in range(50):  # reaped by close(); allow the kernel a moment
            os.kill(pid, 0)
            time.sleep(0.1)
    assert checker.grade("\\boxed{2^2}", "4").correct  # starts a new child
    checker.close()


def test_checker_pickles_without_its_child(checkers):
    original = checkers["boxed"]
    original.grade("\\boxed{2^2}", "4")
    copy = pickle.loads(pickle.dumps(original))
    assert (copy.style, copy.timeout_s, copy.worker_pid) == ("boxed", 5.0, None)
    assert copy.counters["checked"] == 0
    assert copy.grade("\\boxed{\\frac{2}{4}}", "0.5").correct
    copy.close()


def test_grading_inside_a_threaded_ray_actor(ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0, max_concurrency=2)  # threaded actor: methods off the main thread
    class Grader:
        def __init__(self):
            self.checker = AnswerChecker("auto", timeout_s=1)

        def grade(self, completions, golds):
            return self.checker.grade_many(completions, golds), dict(self.checker.counters)

    grader = Grader.remote()
    grades, counters = ray.get(grader.grade.remote(
        ["#### 72", "\\boxed{\\frac{1}{2}}", PATHOLOGICAL, "nothing"], ["72", "0.5", "5", "1"]),
        timeout=120)
    assert [(g.correct, g.failure) for g in grades] == [(True, None), (True, None),
                                                       (False, "timeout"), (False, None)]
    assert counters == {"checked": 4, "correct": 2, "no_answer": 1, "timeouts": 1, "errors": 0}
    ray.kill(grader)
