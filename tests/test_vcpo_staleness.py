"""Bounded staleness by admission: simulated asynchronous runs with random sampler speeds."""

import itertools
import random

import pytest

from rllib_ext.algorithms.vcpo.staleness import StalenessController, schedule_is_feasible


def simulate(k, num_runners, batch_samples, updates, seed, train_time=1.0, queue=1):
    """The VCPO driver loop against runners with random generation times; each runner serves
    up to ``queue`` requests one after the other.

    Returns (stalenesses, learner idle time, max outstanding samples)."""
    rng = random.Random(seed)
    size = 4
    controller = StalenessController(k, batch_samples * size, max_requests_per_runner=queue)
    finish = {r: [] for r in range(num_runners)}  # runner -> [(finish time, version)] in order
    now, idle, stalenesses, max_outstanding, trained = 0.0, 0.0, [], 0, 0

    def collect():
        for runner, requests in finish.items():
            while requests and requests[0][0] <= now:
                _, version = requests.pop(0)
                controller.arrived(runner, version, size)

    def launch():
        nonlocal max_outstanding
        for runner, requests in finish.items():
            while controller.can_launch(runner, size):
                controller.launched(runner, size, controller.learner_version)
                start = requests[-1][0] if requests else now
                requests.append((start + rng.choice([0.2, 0.5, 1.0, 3.0]),
                                 controller.learner_version))
        max_outstanding = max(max_outstanding, controller.outstanding)

    while trained < updates:
        collect()
        launch()
        batch = controller.next_batch()
        if batch is None:
            pending = [t for requests in finish.values() for t, _ in requests]
            assert pending, "deadlock: nothing in flight and no admissible batch"
            wake = min(pending)
            idle += wake - now
            now = wake
            continue
        now += train_time
        stalenesses += controller.trained(batch)
        trained += 1
    return stalenesses, idle, max_outstanding


@pytest.mark.parametrize("k", [0, 1, 2, 4, 16])
@pytest.mark.parametrize("num_runners", [1, 3, 8])
@pytest.mark.parametrize("batch_samples", [1, 2])
@pytest.mark.parametrize("queue", [1, 3])
def test_staleness_never_exceeds_k_and_nothing_is_dropped(k, num_runners, batch_samples, queue):
    for seed in range(5):
        stalenesses, _, max_outstanding = simulate(k, num_runners, batch_samples, 60, seed,
                                                   queue=queue)
        assert len(stalenesses) == 60 * batch_samples
        assert min(stalenesses) >= 0 and max(stalenesses) <= k
        assert max_outstanding <= (k + 1) * batch_samples * 4


def test_queued_requests_let_one_sampler_run_k_versions_ahead():
    stalenesses, _, _ = simulate(8, 1, 1, 100, seed=0, train_time=0.1, queue=16)
    assert max(stalenesses) == 8


def test_k0_is_synchronous_on_policy():
    stalenesses, _, max_outstanding = simulate(0, 4, 2, 40, seed=1)
    assert set(stalenesses) == {0}
    assert max_outstanding == 2 * 4  # one batch: sample, train, repeat


def test_async_overlaps_sampling_with_learning():
    # One runner as fast as the learner: sync idles the learner half the time, k >= 1 barely.
    _, idle_sync, _ = simulate(0, 1, 1, 50, seed=0, train_time=1.0)
    _, idle_async, _ = simulate(2, 1, 1, 50, seed=0, train_time=1.0)
    assert idle_async < 0.6 * idle_sync


def test_learner_waits_for_a_late_sample_instead_of_dropping_it():
    controller = StalenessController(max_staleness=1, train_batch_size=4)
    controller.launched(0, 4, 0)  # slow runner, v0
    controller.launched(1, 4, 0)
    controller.arrived(1, 0, 4)
    assert controller.trained(controller.next_batch()) == [0]  # v0 -> v1
    controller.launched(1, 4, 1)
    controller.arrived(1, 1, 4)
    # Training runner 1's v1 sample would make the learner v2; runner 0's v0 sample would then
    # be 2 versions stale: the learner must wait.
    assert controller.next_batch() is None
    controller.arrived(0, 0, 4)
    batch = controller.next_batch()
    assert [s.version for s in batch] == [0]
    assert controller.trained(batch) == [1]


def test_a_sample_stamped_too_old_is_never_trained():
    controller = StalenessController(max_staleness=1, train_batch_size=4, learner_version=5)
    controller.launched(0, 4, 5)
    controller.arrived(0, 3, 4)  # stamped v3 although sent v5: staleness 2 > k
    assert controller.next_batch() is None
    assert not controller.in_flight  # nothing to wait for: the algorithm raises


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_staleness must be >= 0"):
        StalenessController(-1, 8)
    controller = StalenessController(2, 8)
    with pytest.raises(ValueError, match="push the current weights first"):
        controller.launched(0, 4, version=3)
    controller.launched(0, 3, 0)
    controller.arrived(0, 0, 3)
    controller.launched(1, 6, 0)
    controller.arrived(1, 0, 6)
    with pytest.raises(ValueError, match="multiple of prompts_per_sample x num_generations"):
        controller.next_batch()


def test_schedule_feasibility_hand_cases():
    assert not schedule_is_feasible([(0, 4), (0, 4)], 2, 2, 4)  # the second v0 lands at v3
    assert schedule_is_feasible([(0, 4), (1, 4)], 2, 2, 4)
    assert schedule_is_feasible([(1, 2), (0, 2), (1, 4)], 2, 2, 4)  # 2+2 share version 2
    assert schedule_is_feasible([], 5, 0, 4)


def test_oldest_first_is_feasible_whenever_any_order_is():
    rng = random.Random(0)
    for _ in range(300):
        samples = [(rng.randint(0, 4), 4) for _ in range(rng.randint(1, 5))]
        k, first = rng.randint(0, 3), rng.randint(2, 5)
        any_order = any(
            all(first + i - v <= k for i, (v, _) in enumerate(order))
            for order in itertools.permutations(samples))
        assert schedule_is_feasible(samples, first, k, 4) == any_order


class DriverLoop:
    """What VCPO._wait_for_admissible_batch calls on its algorithm, recorded."""

    def __init__(self, batches):
        self.batches = list(batches)  # next_batch() answers, in order
        self.waits = []
        self._staleness = self

    def _collect(self, wait_s):
        self.waits.append(wait_s)

    def _launch(self):
        pass

    def next_batch(self):
        return self.batches.pop(0)


def test_the_driver_takes_a_buffered_batch_without_waiting_for_requests_in_flight():
    from rllib_ext.algorithms.vcpo.vcpo import COLLECT_WAIT_S, VCPO

    ready = DriverLoop(["batch"])
    assert VCPO._wait_for_admissible_batch(ready) == "batch"
    assert ready.waits == [0.0]
    # Nothing admissible yet: later passes wait for a request in flight.
    ready.in_flight, ready.batches = {0: [(0, 4)]}, [None, None, "batch"]
    ready._watch = type("Watch", (), {"overdue": lambda self: None,
                                      "busy_actor_ids": lambda self: []})()
    ready.waits = []
    assert VCPO._wait_for_admissible_batch(ready) == "batch"
    assert ready.waits == [0.0, COLLECT_WAIT_S, COLLECT_WAIT_S]
