"""Answer checking: read the final answer of a completion and compare it with the gold answer,
both with math-verify, in a persistent child process under a per-answer timeout.

Reading the answer is math-verify's ``parse`` with the extraction configs of each style (see
``extract_answer``); our own rules are only those math-verify has no notion of: the GSM8K
``####`` line, the first line of a ``plain`` completion, and ``\\fbox`` read as ``\\boxed``.
Both reading and comparing run in the child, because sympy (behind math-verify's parser and
comparison) can hang, and the only reliable interruption, SIGALRM, works in a main thread only:
callers are Ray workers and vLLM processes whose grading code may not run in the main thread.
The exception is an answer that needs neither: a plain number read without math-verify (a
``plain`` completion's line, a GSM8K ``####`` line) against a plain-number gold answer is
decided in the caller, with the child's rules (most of the embedded arithmetic task's
answers; the others, e.g. a number followed by text, still go to the child).
The child is a fresh interpreter (fork + immediate exec, like multiprocessing's "spawn"; a plain
fork of a process with threads can deadlock), started lazily on first use and reused.

Two timeout layers:
- in the child, one SIGALRM timer of ``timeout_s`` bounds each item (reading the completion's
  answer, parsing the gold answer and comparing them together). math-verify's own per-stage
  ``alarm()`` timeouts are switched off: they take whole seconds, cancel any enclosing timer,
  and turn a timeout into a plain ``False``, indistinguishable from a wrong answer.
- in the caller, a watchdog waits ``2 * timeout_s + 2`` s per item; a child stuck in C code that
  ignores the signal is killed, the item graded as a timeout, and a fresh child grades the rest.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import multiprocessing.connection
import re
import signal
import socket
import subprocess
import sys
import threading
import traceback
import weakref
from dataclasses import dataclass
from decimal import Decimal

logger = logging.getLogger(__name__)

STYLES = ("auto", "boxed", "gsm8k", "plain")
COUNTER_NAMES = ("checked", "correct", "no_answer", "timeouts", "errors")

# Slack on top of the child's own per-item timer before the caller declares the child hung.
_WATCHDOG_GRACE_S = 2.0
# Starting the child imports sympy and math-verify (seconds; more on a loaded machine).
_START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Grade:
    reward: float  # 1.0 if correct else 0.0
    correct: bool
    # The answer read from the completion: None if it holds none, or if grading failed first.
    extracted: str | None
    failure: str | None  # None, "timeout" or "error" (checker exception)

    @property
    def no_answer(self) -> bool:
        """The completion holds no final answer (a timeout or error is not counted here)."""
        return self.extracted is None and self.failure is None


# ---------------------------------------------------------------------------------------------
# Reading answers (pure functions; math-verify is imported on first use, in the child)

_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_INTEGER = re.compile(r"-?\d+")
_DECIMAL = re.compile(r"-?\d+(?:\.\d+)?")


def _normalize_number_text(text: str) -> str:
    """Strip markup around a short numeric answer: ``**``, ``$``, a trailing full stop, and
    thousands separators ("1,000" -> "1000"; "1,2" stays)."""
    text = text.strip().strip("*").strip().replace("\\$", "").replace("$", "").strip()
    text = text.rstrip(".").strip()
    return _THOUSANDS_COMMA.sub("", text)


def hashes_answer(text: str) -> str | None:
    """GSM8K convention: the first line after the last ``####``, normalised (a GSM8K row stores
    "1500" for "$1,500."); None if absent.

    Ours: math-verify has no notion of GSM8K's ``####`` marker (its free extraction would take
    the last number of the whole text, which need not be the one after ``####``)."""
    position = text.rfind("####")
    if position < 0:
        return None
    tail = text[position + 4:].strip()
    first_line = tail.split("\n", 1)[0] if tail else ""
    return _normalize_number_text(first_line) or None


@functools.cache
def _extraction_configs() -> dict[str, tuple]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return {
        # \boxed{...} first, then "final answer is $...$" / "answer: $...$"; nothing unanchored.
        "boxed": (LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False),),
        # math-verify's defaults: anchored answers, then the last LaTeX, number or expression.
        "free": (LatexExtractionConfig(), ExprExtractionConfig()),
        # A text that is the answer itself (gold answers, plain completions), read as \boxed{text}
        # so that math-verify's LaTeX normalisation (units, \text, \dfrac, ...) applies.
        "whole": (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()),
    }


def _parse(text: str, configs: str) -> list:
    """math-verify's parse: [] (nothing found), [value, text] or [text] (found, not parsed)."""
    import math_verify

    return math_verify.parse(text, extraction_config=_extraction_configs()[configs],
                             parsing_timeout=None)


@functools.lru_cache(maxsize=8192)
def _parse_whole(answer: str) -> list:
    """An answer text parsed as a whole (cached: every sample of a prompt shares the gold, and
    samples of a group often repeat an answer)."""
    return _parse("\\boxed{" + answer + "}", "whole")


def _first_line(completion: str) -> str | None:
    # Ours: a plain completion is the answer itself; math-verify only searches text for one.
    return completion.strip().split("\n", 1)[0].strip() or None


def _read_answer(completion: str, style: str) -> tuple[str | None, list | None]:
    """(the answer's text, math-verify's parse of it) per style. The parse is None for a text
    that is the answer itself (a plain completion's line, a plain number after ``####``): it is
    compared exactly where it is a plain number, else parsed whole."""
    if style == "plain":
        return _first_line(completion), None
    if style in ("boxed", "auto"):
        # Ours: math-verify's extraction patterns know \boxed only (its normaliser reads \fbox).
        parsed = _parse(completion.replace("\\fbox", "\\boxed"), "boxed")
        if parsed or style == "boxed":
            return _parsed_text(parsed), parsed
    if "####" in completion:  # gsm8k, and auto without a boxed answer
        line = hashes_answer(completion)
        if line is None:
            return None, []
        if _DECIMAL.fullmatch(line):
            return line, None  # a plain number: compared without sympy
        parsed = _parse(line, "free")
    else:
        parsed = _parse(completion, "free")
    return _parsed_text(parsed), parsed


def _parsed_text(parsed: list) -> str | None:
    if not parsed:
        return None
    text = parsed[-1]  # parse appends the matched text (normalised) after the parsed value
    return text if isinstance(text, str) else str(text)


def extract_answer(completion: str, style: str = "auto") -> str | None:
    r"""The final answer of a completion as text, or None.

    style: "boxed" (math-verify: the last ``\boxed{}``, else an answer announced with "final
    answer is" or "answer:" in LaTeX), "gsm8k" (the line after the last ``####``, else
    math-verify's reading of the whole text: an announced answer, else the last number,
    expression or LaTeX), "plain" (the first line of the stripped completion), "auto" (boxed,
    else gsm8k).

    math-verify's parser can hang on pathological input; ``AnswerChecker`` runs this in its child
    process under a timeout.
    """
    if style not in STYLES:
        raise ValueError(f"answer style {style!r} is unknown; use one of {', '.join(STYLES)}")
    return _read_answer(completion, style)[0]


def _exact_number_comparison(predicted: str, gold: str) -> bool | None:
    """Decide plain-number pairs without sympy: equal decimals are correct, different integers
    are wrong. None (ask math-verify) otherwise, e.g. decimals that differ only past its
    rounding, fractions, LaTeX."""
    if _DECIMAL.fullmatch(predicted) and _DECIMAL.fullmatch(gold):
        if Decimal(predicted) == Decimal(gold):
            return True
        if _INTEGER.fullmatch(predicted) and _INTEGER.fullmatch(gold):
            return False
    return None


def _plain_number_outcome(completion: str, gold: str, style: str
                          ) -> tuple[bool, None, str | None] | None:
    """The outcome (correct, failure, extracted) the child would give an item whose answer is
    read and compared without math-verify (no parser, no sympy: it cannot hang), or None when
    the item needs the child: a ``plain`` completion's first line or a GSM8K ``####`` line
    that is missing, or a plain number compared with a plain-number gold answer."""
    if style == "plain":
        answer = _first_line(completion)
    elif style == "gsm8k" and "####" in completion:
        answer = hashes_answer(completion)
        if answer is not None and not _DECIMAL.fullmatch(answer):
            return None  # math-verify reads it
    else:
        return None
    if answer is None:
        return False, None, None
    exact = _exact_number_comparison(answer, gold)
    return None if exact is None else (exact, None, answer)


def _math_verify_comparison(answer: str, parsed: list | None, gold: str) -> bool:
    """Is the answer (its text, and math-verify's parse of it or None) the gold answer?"""
    import math_verify

    if parsed is None:  # a plain answer
        exact = _exact_number_comparison(answer, gold)
        if exact is not None:
            return exact
        parsed = _parse_whole(answer)
    gold_parsed = _parse_whole(gold)
    return bool(gold_parsed) and math_verify.verify(gold_parsed, parsed, timeout_seconds=None)


def _as_text(value) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    raise TypeError(f"completions and gold answers must be str, got {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# The grading child process


class _ItemTimeout(BaseException):
    """Raised by the child's SIGALRM handler. A BaseException so that math-verify's and sympy's
    ``except Exception`` clauses do not swallow it."""


_timer_fired = False


def _on_alarm(signum, frame):
    global _timer_fired
    _timer_fired = True
    raise _ItemTimeout()


def _grade_in_child(style: str, compare, completion: str, gold: str, timeout_s: float
                    ) -> tuple[bool, str | None, str | None]:
    """(correct, failure, extracted) of one item, reading and comparing under one timer."""
    global _timer_fired
    _timer_fired = False
    extracted = None
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        try:
            extracted, parsed = _read_answer(completion, style)
            correct = extracted is not None and bool(compare(extracted, parsed, gold))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _ItemTimeout:
        return False, "timeout", extracted
    except Exception:
        logger.debug("answer checking failed", exc_info=True)
        return False, "error", extracted
    # A library that swallowed the timer's exception still returns late: count it as a timeout.
    return (False, "timeout", extracted) if _timer_fired else (correct, None, extracted)


def _child_main(fd: int, timeout_s: float, style: str, verifier: str | None) -> None:
    """Entry point of the grading process: grade (completion, gold) batches read from ``fd``."""
    conn = multiprocessing.connection.Connection(fd)
    try:
        # Its "timeout disabled" warning: the child's own timer bounds every item.
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        if verifier is None:
            compare = _math_verify_comparison
        else:
            module_name, _, attribute = verifier.partition(":")
            function = getattr(importlib.import_module(module_name), attribute)

            def compare(answer, parsed, gold):
                return function(answer, gold)
        if style != "plain" or verifier is None:
            # The first call imports sympy and builds math-verify's parsers (~1 s).
            _math_verify_comparison(*_read_answer("\\boxed{\\frac{1}{2}}", "boxed"), "0.5")
    except BaseException:
        conn.send(("failed", traceback.format_exc()))
        return
    signal.signal(signal.SIGALRM, _on_alarm)
    conn.send(("ready", None))
    while True:
        try:
            batch = conn.recv()
        except EOFError:  # the caller is gone
            return
        if batch is None:
            return
        for completion, gold in batch:
            conn.send(_grade_in_child(style, compare, completion, gold, timeout_s))


# A fresh interpreter (fork + immediate exec, as multiprocessing's "spawn" does) rather than
# multiprocessing.Process: spawn re-runs the caller's __main__ script in the child, which breaks
# scripts without an ``if __name__ == "__main__"`` guard, and daemonic processes may not use it.
_CHILD_BOOT = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
               f"from {__name__} import _child_main; "
               "_child_main(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], "
               "sys.argv[5] or None)")


def _stop_child(process: subprocess.Popen, conn) -> None:
    try:
        conn.send(None)
    except (OSError, ValueError):
        pass
    conn.close()
    try:
        process.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class _GradingChild:
    """One grading process plus its socket; stopped when closed or garbage-collected."""

    def __init__(self, timeout_s: float, style: str, verifier: str | None):
        parent_socket, child_socket = socket.socketpair()
        with child_socket:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _CHILD_BOOT, json.dumps(sys.path),
                 str(child_socket.fileno()), repr(timeout_s), style, verifier or ""],
                pass_fds=[child_socket.fileno()], stdin=subprocess.DEVNULL)
        self.conn = multiprocessing.connection.Connection(parent_socket.detach())
        self._finalizer = weakref.finalize(self, _stop_child, self.process, self.conn)
        try:
            ready = self.conn.poll(_START_TIMEOUT_S)
            status, detail = self.conn.recv() if ready else ("failed", "no answer")
        except EOFError:
            status, detail = "failed", f"it exited with code {self.process.wait()}"
        if status != "ready":
            self.kill()
            raise RuntimeError(f"the answer-checking process failed to start "
                               f"(within {_START_TIMEOUT_S:.0f} s): {detail}")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        self._finalizer.detach()
        self.process.kill()
        self.process.wait()
        self.conn.close()

    def close(self) -> None:
        self._finalizer()


class AnswerChecker:
    """Grades completions against gold answers; never raises on bad or pathological answers.

    ``style``: how the answer is read from a completion (see ``extract_answer``).
    ``timeout_s``: per-item budget for reading and comparing (seconds, may be fractional).
    ``verifier``: optional ``"module:function"`` of a ``(predicted, gold) -> bool`` run in the
    grading process instead of math-verify's comparison (custom answer types); it receives the
    answer text as ``extract_answer`` reads it.

    ``counters`` (cumulative): checked, correct, no_answer, timeouts, errors.
    Thread-safe; picklable (a copy starts its own child).
    """

    def __init__(self, style: str = "auto", timeout_s: float = 5.0, *,
                 verifier: str | None = None):
        if style not in STYLES:
            raise ValueError(f"answer style {style!r} is unknown; use one of {', '.join(STYLES)}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) \
                or not timeout_s > 0:
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if verifier is not None and (not isinstance(verifier, str) or ":" not in verifier):
            raise ValueError(f"verifier must be 'module:function', got {verifier!r}")
        self.style = style
        self.timeout_s = float(timeout_s)
        self.verifier = verifier
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self._child: _GradingChild | None = None
        self._lock = threading.Lock()

    def __reduce__(self):
        return (_rebuild_checker, (self.style, self.timeout_s, self.verifier))

    @property
    def worker_pid(self) -> int | None:
        """Process id of the grading child, None before first use or after close()."""
        child = self._child
        return child.process.pid if child is not None else None

    def grade(self, completion: str, gold: str) -> Grade:
        return self.grade_many([completion], [gold])[0]

    def grade_many(self, completions: list[str], golds: list[str]) -> list[Grade]:
        """Grade a batch; it travels to the child in one message."""
        if len(completions) != len(golds):
            raise ValueError(f"grade_many got {len(completions)} completions but "
                             f"{len(golds)} gold answers; pass one gold answer per completion")
        items = [(_as_text(completion), _as_text(gold).strip())
                 for completion, gold in zip(completions, golds, strict=True)]
        # A custom verifier sees every answer; otherwise plain numbers skip the child.
        outcomes = [None if self.verifier else _plain_number_outcome(completion, gold, self.style)
                    for completion, gold in items]
        with self._lock:
            rest = iter(self._grade_in_child([item for item, outcome in zip(items, outcomes)
                                              if outcome is None]))
            outcomes = [next(rest) if outcome is None else outcome for outcome in outcomes]
            grades = [Grade(1.0 if correct else 0.0, correct, extracted, failure)
                      for correct, failure, extracted in outcomes]
            self._count(grades)
        return grades

    def _count(self, grades: list[Grade]) -> None:
        c = self.counters
        c["checked"] += len(grades)
        for grade in grades:
            c["correct"] += grade.correct
            c["no_answer"] += grade.no_answer
            c["timeouts"] += grade.failure == "timeout"
            c["errors"] += grade.failure == "error"

    def _grade_in_child(self, items: list[tuple[str, str]]
                        ) -> list[tuple[bool, str | None, str | None]]:
        outcomes: list[tuple[bool, str | None, str | None]] = []
        watchdog_s = 2 * self.timeout_s + _WATCHDOG_GRACE_S
        while len(outcomes) < len(items):
            remaining = items[len(outcomes):]
            child = self._running_child()
            try:
                child.conn.send(remaining)
            except OSError:  # died while idle (e.g. killed by the OOM killer): retry once
                self._discard_child()
                child = self._running_child()
                child.conn.send(remaining)
            for completion, _ in remaining:
                failure = None
                try:
                    if child.conn.poll(watchdog_s):
                        outcomes.append(child.conn.recv())
                        continue
                    failure = "timeout"
                except (EOFError, OSError):
                    failure = "error"
                logger.warning("answer-checking process %s on completion %r; restarting it",
                               "hung" if failure == "timeout" else "died", completion[:200])
                self._discard_child()
                outcomes.append((False, failure, None))
                break
        return outcomes

    def _running_child(self) -> _GradingChild:
        if self._child is None or not self._child.alive:
            if self._child is not None:
                self._discard_child()
            self._child = _GradingChild(self.timeout_s, self.style, self.verifier)
        return self._child

    def _discard_child(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child = None

    def close(self) -> None:
        """Stop the grading child (a later call starts a new one)."""
        with self._lock:
            if self._child is not None:
                self._child.close()
                self._child = None

    def __enter__(self) -> AnswerChecker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _rebuild_checker(style: str, timeout_s: float, verifier: str | None) -> AnswerChecker:
    return AnswerChecker(style, timeout_s, verifier=verifier)
