"""Fault injection for reliability tests and chaos runs.

Answer verifiers for ``env_config.answer_verifier`` that fail on purpose, so that a run's
handling of broken reward checkers can be exercised end to end (they run in the grading child
process like a real verifier).
"""

from __future__ import annotations

import time


def _numeric(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def raising_on_odd_gold(predicted: str, gold: str) -> bool:
    """Raise for problems whose answer is odd; plain comparison otherwise."""
    if (_numeric(gold) or 0) % 2:
        raise RuntimeError(f"injected checker failure on gold {gold!r}")
    return predicted.strip() == gold.strip()


def hanging_on_odd_gold(predicted: str, gold: str) -> bool:
    """Never return (until the checker's timeout) for problems whose answer is odd."""
    if (_numeric(gold) or 0) % 2:
        time.sleep(3600)
    return predicted.strip() == gold.strip()
