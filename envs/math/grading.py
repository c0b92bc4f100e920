"""Answer checking: extract the final answer from a completion, compare it with math-verify.

Extraction (regexes, linear time) runs in the caller's process. Comparison of plain numbers
takes a fast exact path; everything else goes to ``math_verify.parse`` + ``math_verify.verify``
in one persistent child process, because sympy can hang and the only reliable interruption,
SIGALRM, works in a main thread only: callers are Ray workers and vLLM processes whose grading
code may not run in the main thread. The child is a fresh interpreter (fork + immediate exec,
like multiprocessing's "spawn"; a plain fork of a process with threads can deadlock), started
lazily on first use and reused.

Two timeout layers:
- in the child, one SIGALRM timer of ``timeout_s`` bounds each item (extraction-parse of both
  answers and the comparison together). math-verify's own per-stage ``alarm()`` timeouts are
  switched off: they take whole seconds, cancel any enclosing timer, and turn a timeout into a
  plain ``False``, indistinguishable from a wrong answer.
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
    extracted: str | None  # the answer extracted from the completion (None if none)
    failure: str | None  # None, "timeout" or "error" (checker exception)


# ---------------------------------------------------------------------------------------------
# Extraction (pure functions; also used by datasets.py for gold answers)

_BOXED_COMMAND = re.compile(r"\\(?:boxed|fbox)")
# A number: optional sign (not after a word character, so "x-5" gives "5"), thousands groups or
# digits, optional decimals, optional "/denominator".
_NUMBER = re.compile(r"(?:(?<![\w.)])-)?(?<![\w.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_INTEGER = re.compile(r"-?\d+")
_DECIMAL = re.compile(r"-?\d+(?:\.\d+)?")


def last_boxed_content(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` or ``\fbox{...}`` (balanced braces; ``\{`` and ``\}``
    do not count), or the token after ``\boxed `` (``\boxed 5``). None when there is no such
    command, or when the last one is unclosed (a truncated completion) or empty."""
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


def normalize_number_text(text: str) -> str:
    """Strip markup around a short numeric answer: ``**``, ``$``, a trailing full stop, and
    thousands separators ("1,000" -> "1000"; "1,2" stays)."""
    text = text.strip().strip("*").strip().replace("\\$", "").replace("$", "").strip()
    text = text.rstrip(".").strip()
    return _THOUSANDS_COMMA.sub("", text)


def hashes_answer(text: str) -> str | None:
    """GSM8K convention: the first line after the last ``####``, normalised; None if absent."""
    position = text.rfind("####")
    if position < 0:
        return None
    tail = text[position + 4:].strip()
    first_line = tail.split("\n", 1)[0] if tail else ""
    return normalize_number_text(first_line) or None


def last_number(text: str) -> str | None:
    """The last number in the text (sign, thousands separators, decimals, simple fraction)."""
    numbers = _NUMBER.findall(text)
    return normalize_number_text(numbers[-1]) if numbers else None


def extract_answer(completion: str, style: str = "auto") -> str | None:
    r"""The final answer of a completion, or None.

    style: "boxed" (last ``\boxed{}``/``\fbox{}``), "gsm8k" (after the last ``####``, else the
    last number), "plain" (the first line of the stripped completion), "auto" (boxed, then
    ``####``, then the last number).
    """
    if style == "plain":
        first_line = completion.strip().split("\n", 1)[0].strip()
        return first_line or None
    if style == "boxed":
        return last_boxed_content(completion)
    if style == "gsm8k":
        if "####" in completion:
            return hashes_answer(completion)
        return last_number(completion)
    if style == "auto":
        for extract in (last_boxed_content, hashes_answer, last_number):
            answer = extract(completion)
            if answer is not None:
                return answer
        return None
    raise ValueError(f"answer style {style!r} is unknown; use one of {', '.join(STYLES)}")


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


def _math_verify_comparison():
    """(predicted, gold) -> bool with math-verify; parsed answers are cached (a group of samples
    often repeats answers, and every sample of a prompt shares the gold)."""
    import math_verify
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    # Its "timeout disabled" warning: the child's own timer bounds every item.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # The answers are already extracted; wrapping them in \boxed{} lets math-verify's LaTeX
    # normalisation (units, \text, \dfrac, ...) apply, with plain expressions as a fallback.
    configs = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())

    @functools.lru_cache(maxsize=8192)
    def parse_answer(answer: str):
        return math_verify.parse("\\boxed{" + answer + "}", extraction_config=configs,
                                 parsing_timeout=None)

    def compare(predicted: str, gold: str) -> bool:
        gold_parsed = parse_answer(gold)
        return bool(gold_parsed) and math_verify.verify(gold_parsed, parse_answer(predicted),
                                                        timeout_seconds=None)

    return compare


def _grade_in_child(compare, predicted: str, gold: str, timeout_s: float):
    global _timer_fired
    _timer_fired = False
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        try:
            correct = bool(compare(predicted, gold))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _ItemTimeout:
        return False, "timeout"
    except Exception:
        logger.debug("answer comparison failed", exc_info=True)
        return False, "error"
    # A library that swallowed the timer's exception still returns late: count it as a timeout.
    return (False, "timeout") if _timer_fired else (correct, None)


def _child_main(fd: int, timeout_s: float, verifier: str | None) -> None:
    """Entry point of the grading process: grade (predicted, gold) batches read from ``fd``."""
    conn = multiprocessing.connection.Connection(fd)
    try:
        if verifier is None:
            compare = _math_verify_comparison()
            compare("1", "1")  # first call builds parsers and caches (~0.2 s)
        else:
            module_name, _, attribute = verifier.partition(":")
            compare = getattr(importlib.import_module(module_name), attribute)
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
        for predicted, gold in batch:
            conn.send(_grade_in_child(compare, predicted, gold, timeout_s))


# A fresh interpreter (fork + immediate exec, as multiprocessing's "spawn" does) rather than
# multiprocessing.Process: spawn re-runs the caller's __main__ script in the child, which breaks
# scripts without an ``if __name__ == "__main__"`` guard, and daemonic processes may not use it.
_CHILD_BOOT = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
               f"from {__name__} import _child_main; "
               "_child_main(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] or None)")


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

    def __init__(self, timeout_s: float, verifier: str | None):
        parent_socket, child_socket = socket.socketpair()
        with child_socket:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _CHILD_BOOT, json.dumps(sys.path),
                 str(child_socket.fileno()), repr(timeout_s), verifier or ""],
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

    ``style``: how the answer is extracted from a completion (see ``extract_answer``).
    ``timeout_s``: per-item budget for math-verify (seconds, may be fractional).
    ``verifier``: optional ``"module:function"`` of a ``(predicted, gold) -> bool`` run in the
    grading process instead of math-verify (custom answer types); disables the exact
    number path so that it sees every extracted answer.

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
        """Grade a batch; items that need math-verify travel to the child in one message."""
        if len(completions) != len(golds):
            raise ValueError(f"grade_many got {len(completions)} completions but "
                             f"{len(golds)} gold answers; pass one gold answer per completion")
        extracted = [extract_answer(_as_text(c), self.style) for c in completions]
        gold_texts = [_as_text(g).strip() for g in golds]
        outcomes: list[tuple[bool, str | None] | None] = [None] * len(extracted)
        to_child = []
        for i, (answer, gold) in enumerate(zip(extracted, gold_texts, strict=True)):
            if answer is None:
                outcomes[i] = (False, None)
                continue
            exact = None if self.verifier else _exact_number_comparison(answer, gold)
            if exact is None:
                to_child.append(i)
            else:
                outcomes[i] = (exact, None)
        with self._lock:
            if to_child:
                child_outcomes = self._compare_in_child([(extracted[i], gold_texts[i])
                                                         for i in to_child])
                for i, outcome in zip(to_child, child_outcomes, strict=True):
                    outcomes[i] = outcome
            grades = [Grade(1.0 if correct else 0.0, correct, answer, failure)
                      for (correct, failure), answer in zip(outcomes, extracted, strict=True)]
            self._count(grades)
        return grades

    def _count(self, grades: list[Grade]) -> None:
        c = self.counters
        c["checked"] += len(grades)
        for grade in grades:
            c["correct"] += grade.correct
            c["no_answer"] += grade.extracted is None
            c["timeouts"] += grade.failure == "timeout"
            c["errors"] += grade.failure == "error"

    def _compare_in_child(self, pairs: list[tuple[str, str]]) -> list[tuple[bool, str | None]]:
        outcomes: list[tuple[bool, str | None]] = []
        watchdog_s = 2 * self.timeout_s + _WATCHDOG_GRACE_S
        while len(outcomes) < len(pairs):
            remaining = pairs[len(outcomes):]
            child = self._running_child()
            try:
                child.conn.send(remaining)
            except OSError:  # died while idle (e.g. killed by the OOM killer): retry once
                self._discard_child()
                child = self._running_child()
                child.conn.send(remaining)
            for predicted, _ in remaining:
                failure = None
                try:
                    if child.conn.poll(watchdog_s):
                        outcomes.append(child.conn.recv())
                        continue
                    failure = "timeout"
                except (EOFError, OSError):
                    failure = "error"
                logger.warning("answer-checking process %s on answer %r; restarting it",
                               "hung" if failure == "timeout" else "died", predicted[:200])
                self._discard_child()
                outcomes.append((False, failure))
                break
        return outcomes

    def _running_child(self) -> _GradingChild:
        if self._child is None or not self._child.alive:
            if self._child is not None:
                self._discard_child()
            self._child = _GradingChild(self.timeout_s, self.verifier)
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
