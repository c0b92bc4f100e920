"""Watch the operations queued on remote actors, so that no wait on them is silent.

A Ray actor runs the calls sent to it one after the other. For each actor this keeps the queue
of calls sent and not yet answered; the call at the head has been running since it was sent or
since the previous call was answered, whichever is later. :meth:`OperationWatch.overdue` names
the first head that has run longer than its operation's timeout, so the caller can fail with
"which worker, which operation, how long" instead of hanging.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class Operation:
    name: str  # e.g. "sample()", "weight sync to version 12"
    kind: str  # the key of its timeout, e.g. "sample", "set_state"
    sent: float


@dataclass
class OperationWatch:
    timeouts: dict[str, float]  # kind -> seconds
    clock: callable = time.monotonic
    _queues: dict[int, deque] = field(default_factory=dict)
    _last_answer: dict[int, float] = field(default_factory=dict)

    def sent(self, actor_id: int, kind: str, name: str) -> None:
        self._queues.setdefault(actor_id, deque()).append(Operation(name, kind, self.clock()))

    def answered(self, actor_id: int, kind: str) -> None:
        """The oldest pending ``kind`` call of the actor returned."""
        queue = self._queues.get(actor_id)
        if not queue:
            return
        for operation in queue:
            if operation.kind == kind:
                queue.remove(operation)
                break
        self._last_answer[actor_id] = self.clock()

    def forget(self, actor_id: int) -> None:
        """The actor died or was replaced: its calls will never be answered."""
        self._queues.pop(actor_id, None)
        self._last_answer.pop(actor_id, None)

    def pending(self, actor_id: int, kind: str) -> int:
        return sum(op.kind == kind for op in self._queues.get(actor_id, ()))

    def busy_actor_ids(self) -> list[int]:
        """Actors with calls not yet answered."""
        return [actor_id for actor_id, queue in self._queues.items() if queue]

    def overdue(self) -> str | None:
        """A one-line description of the first call running past its timeout, or None."""
        now = self.clock()
        for actor_id, queue in self._queues.items():
            if not queue:
                continue
            head = queue[0]
            started = max(head.sent, self._last_answer.get(actor_id, head.sent))
            running = now - started
            limit = self.timeouts.get(head.kind)
            if limit is not None and running > limit:
                return (f"env runner {actor_id}: {head.name} has not returned after "
                        f"{running:.0f} s (limit {limit:.0f} s)")
        return None
