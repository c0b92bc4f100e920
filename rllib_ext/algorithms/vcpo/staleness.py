"""Bounded staleness by admission, for asynchronous sampling.

A sample generated with policy version v and trained when the learner holds version V has
staleness V - v. With bound k (``max_staleness``) the controller guarantees V - v <= k for every
trained sample without discarding finished work, by two admission rules:

1. Launch: a new sample request (generated with the learner's current weights) is admitted only
   while the outstanding work — requested, finished-but-untrained, and the new request — stays
   within (k + 1) train batches. k = 0 is the synchronous on-policy loop: sample, train, repeat.
2. Learn: the learner trains the oldest samples first and takes the step V -> V + 1 only if the
   samples still outstanding afterwards can all be trained in time: taken oldest first, one
   batch per version from V + 1 on, none may end up more than k versions stale
   (:func:`schedule_is_feasible`). Otherwise it waits for the late samples to arrive: a slow
   sampler holds the learner back instead of having its work dropped.

Together the rules keep the outstanding work feasible at all times (a launch appends a
current-version sample within the first k + 1 batches; a step removes the first batch), so the
learner only ever waits for samples that are in flight: there is no deadlock.

Samples are whole ``sample()`` results; a train batch is an integral number of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def schedule_is_feasible(samples: list[tuple[int, int]], first_version: int, max_staleness: int,
                         train_batch_size: int) -> bool:
    """Whether ``samples`` ((version, size) pairs), trained oldest first with one batch of
    ``train_batch_size`` trajectories per learner version starting at ``first_version``, all
    have staleness <= ``max_staleness``:

        for the i-th sample in version order, with n_i trajectories before it,
        first_version + floor(n_i / train_batch_size) - v_i <= max_staleness.
    """
    before = 0
    for version, size in sorted(samples):
        if first_version + before // train_batch_size - version > max_staleness:
            return False
        before += size
    return True


@dataclass
class Sample:
    """One finished ``sample()`` result."""

    version: int  # policy version that generated it
    size: int  # trajectories in it
    payload: Any = None
    arrival: int = 0  # order of arrival, the tie-break among equal versions


@dataclass
class StalenessController:
    """Admission bookkeeping of one asynchronous run (rules 1 and 2 of the module docstring).

    A runner may hold up to ``max_requests_per_runner`` requests; it serves them in order, each
    with the weights queued before it, so queued requests carry older versions — this is how a
    single sampler can run k versions ahead.
    """

    max_staleness: int
    train_batch_size: int
    max_requests_per_runner: int = 1
    learner_version: int = 0
    in_flight: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # runner -> FIFO
    buffer: list[Sample] = field(default_factory=list)
    _arrivals: int = 0

    def __post_init__(self):
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}. Fix: use 0 "
                             "for synchronous on-policy training or k >= 1 for async.")
        if self.train_batch_size < 1:
            raise ValueError(f"train_batch_size must be >= 1, got {self.train_batch_size}.")
        if self.max_requests_per_runner < 1:
            raise ValueError("max_requests_per_runner must be >= 1, got "
                             f"{self.max_requests_per_runner}.")

    def _in_flight_requests(self) -> list[tuple[int, int]]:
        return [request for queue in self.in_flight.values() for request in queue]

    @property
    def outstanding(self) -> int:
        """Trajectories requested or finished but not yet trained."""
        return sum(size for _, size in self._in_flight_requests()) + \
            sum(s.size for s in self.buffer)

    def can_launch(self, runner_id: int, size: int) -> bool:
        """Rule 1, and the runner's queue has room."""
        return len(self.in_flight.get(runner_id, ())) < self.max_requests_per_runner and \
            self.outstanding + size <= (self.max_staleness + 1) * self.train_batch_size

    def launched(self, runner_id: int, size: int, version: int) -> None:
        """A request went out to a runner whose weights are ``version`` (must be current)."""
        if version != self.learner_version:
            raise ValueError(f"launching with weights v{version} while the learner is at "
                             f"v{self.learner_version}: push the current weights first.")
        self.in_flight.setdefault(runner_id, []).append((version, size))

    def arrived(self, runner_id: int, version: int, size: int, payload: Any = None) -> Sample:
        """Record a finished sample (``version`` as stamped on its episodes); a runner's
        requests finish in the order they were sent."""
        queue = self.in_flight.get(runner_id)
        if queue:
            queue.pop(0)
            if not queue:
                del self.in_flight[runner_id]
        sample = Sample(version=version, size=size, payload=payload, arrival=self._arrivals)
        self._arrivals += 1
        self.buffer.append(sample)
        return sample

    def lost(self, runner_id: int) -> None:
        """The runner failed: its requests will never arrive."""
        self.in_flight.pop(runner_id, None)

    def next_batch(self) -> list[Sample] | None:
        """Rule 2: the oldest samples forming one train batch, or None (wait for more, or, with
        nothing in flight, never: a buffered sample is already more than k versions stale)."""
        if sum(s.size for s in self.buffer) < self.train_batch_size:
            return None
        ordered = sorted(self.buffer, key=lambda s: (s.version, s.arrival))
        batch, size = [], 0
        for sample in ordered:
            if size >= self.train_batch_size:
                break
            batch.append(sample)
            size += sample.size
        if size != self.train_batch_size:
            raise ValueError(f"samples of {[s.size for s in ordered]} trajectories cannot form "
                             f"a train batch of exactly {self.train_batch_size}. Fix: make the "
                             "train batch a multiple of prompts_per_sample x num_generations.")
        if any(self.learner_version - s.version > self.max_staleness for s in batch):
            # Only if a runner stamped a version older than it was sent: never trainable; the
            # caller sees None with nothing in flight and reports it.
            return None
        remaining = [(s.version, s.size) for s in ordered[len(batch):]] + \
            self._in_flight_requests()
        if not schedule_is_feasible(remaining, self.learner_version + 1, self.max_staleness,
                                    self.train_batch_size):
            return None
        return batch

    def trained(self, batch: list[Sample]) -> list[int]:
        """Remove ``batch`` from the buffer, advance the version; returns its stalenesses."""
        ids = {id(s) for s in batch}
        self.buffer = [s for s in self.buffer if id(s) not in ids]
        staleness = [self.learner_version - s.version for s in batch]
        self.learner_version += 1
        return staleness
