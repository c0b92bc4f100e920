"""The demo end to end against synchronous GRPO: updates/s of the asynchronous VCPO demo
(tuned_examples/vcpo_math_tiny.yaml: one remote vLLM env runner, the learner in the driver,
k = 4) vs TRL's GRPOTrainer and vs a minimal synchronous GRPO loop, on the same machine, same
settings, side by side in one run.

The peers: TRL's ``GRPOTrainer`` (bench/trl_grpo_peer.py; left out with a note when TRL is
not installed: ``pip install -e ".[bench]"``), and ``SyncGRPOLoop``, what a user writes in one
file: per update, 16 prompts of the arithmetic task x 8 samples with ``transformers.generate``
(batched, KV cache, temperature 1, <= 6 tokens) from the model being trained, answers graded by
the same MathEnv checker, GRPO advantages (group mean / std) and the sequence-sum
policy-gradient loss from ``rllib_ext.algorithms.vcpo.losses``, one AdamW step (lr 1e-4,
weight decay 0, grad clip 1.0). No Ray, no weight sync, no importance weights: on-policy, all in
one process.

All are built and warmed up first, then take turns in blocks of 10 updates (one demo
iteration), the order rotated each round, held-out evaluation off (it costs all the same).
Reported: the median over rounds of (demo updates/s) / (peer updates/s), the demo's time per
update by phase (``vcpo/time_*_s`` and the env runner's metrics), the CPU seconds each process
spent per update (from /proc: on a shared machine, what the work costs, apart from waiting for
a core) and the ratio those CPU seconds allow on 2 cores, next to the figures of the run before
the pipeline fixes (``BEFORE``).

    .venv/bin/python bench/vcpo_vs_sync_loop.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from common import RESULTS, markdown_table, write_results
from vcpo_common import env_runner_pid, start_demo, tiny_config

NAME = "vcpo_vs_sync_loop"
UPDATES_PER_BLOCK = 10
# The peers' torch threads: each round compares the demo with a peer's faster setting (one
# thread wins on a loaded machine, two, torch's default here, on a quiet one).
PEER_THREADS = (1, 2)
PHASES = ("wait_for_samples", "learner_update", "weight_push")
# The committed run before the pipeline fixes (commit ba02c42; its "episode fetch" phase, a
# separate get of the episodes after the sample's reply, is gone: they come in the reply).
BEFORE = {"demo_over_sync_loop": 0.74, "demo_s_per_update": 0.214,
          "sync_loop_s_per_update": 0.16, "demo_time_wait_for_samples_s": 0.0718,
          "demo_time_episode_fetch_s": 0.0237, "demo_time_learner_update_s": 0.1158,
          "demo_time_weight_push_s": 0.0042, "demo_learner_busy": 0.603,
          "demo_runner_sample_s_per_sample": 0.1303,
          "demo_runner_generation_s_per_sample": 0.0773, "demo_runner_weight_sync_s": 0.0224}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (the grading process of a task, for example)."""
    children = []
    for thread in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{thread}/children") as listing:
                children += [int(c) for c in listing.read().split()]
        except OSError:
            continue
    return children


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = cpu_seconds(pid)
        except OSError:  # a grading child restarted in between
            out[name] = float("nan")
    return out


class SyncGRPOLoop:
    """A synchronous single-process GRPO loop with transformers generation."""

    def __init__(self, config):
        import torch

        from envs.math.env import MathEnv
        from rllib_ext.llm.generation import TransformersBackend
        from rllib_ext.llm.tiny import resolve_model

        path = resolve_model(config.llm_model)
        self.config = config
        self.backend = TransformersBackend(path, seed=0)
        self.model = self.backend.model
        self.env = MathEnv({**config.env_config, "tokenizer": path,
                            "max_prompt_tokens": config.max_prompt_tokens})
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.cpu_s = {"generation": 0.0, "learning_step": 0.0}

    def update(self) -> float:
        """One update; returns the mean reward. ``cpu_s`` sums this thread's CPU seconds of
        generation and of the learning step (packing, forward, backward, optimiser)."""
        import torch

        from rllib_ext.algorithms.vcpo.losses import (
            group_mean_std_advantages,
            policy_gradient_loss,
        )
        from rllib_ext.llm.causal_lm_module import pack_prompt_response, response_log_probs
        from rllib_ext.llm.tiny import PAD_ID

        config, sampling = self.config, self.config.sampling_settings()
        prompts = self.env.next_prompts(config.prompts_per_sample)
        sampled_prompts = [p for p in prompts for _ in range(sampling.n)]
        self.model.eval()
        started = time.thread_time()
        groups = self.backend.generate([p.token_ids for p in prompts], sampling)
        self.cpu_s["generation"] += time.thread_time() - started
        completions = [c for group in groups for c in group]
        texts = [self.env.decode(c.token_ids) for c in completions]
        rewards = torch.tensor(self.env.score(sampled_prompts, texts).rewards)
        group_ids = torch.arange(len(prompts)).repeat_interleave(sampling.n)
        started = time.thread_time()
        batch = pack_prompt_response([p.token_ids for p in sampled_prompts],
                                     [c.token_ids for c in completions], PAD_ID,
                                     response_width=config.max_response_tokens)
        self.model.train()
        logp = response_log_probs(self.model, batch, config.temperature)
        loss = policy_gradient_loss(logp, batch["response_mask"],
                                    group_mean_std_advantages(rewards, group_ids),
                                    len(completions) * config.max_response_tokens)
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.cpu_s["learning_step"] += time.thread_time() - started
        return float(rewards.mean())


def demo_processes(algo) -> dict[str, int]:
    """The demo's processes: the driver (learner), the env runner (its vLLM engine inside) and
    the runner's children (the task's grading process)."""
    runner = env_runner_pid(algo)
    return {"driver": os.getpid(), "runner": runner,
            "runner_children": child_pids(runner)}


def process_cpu(pids: dict, started: dict | None = None) -> dict[str, float]:
    """CPU seconds per process group (children summed), or the change since ``started``."""
    now = {name: sum(cpu_of({str(p): p for p in (pid if isinstance(pid, list) else [pid])})
                     .values()) for name, pid in pids.items()}
    return now if started is None else {name: now[name] - started[name] for name in now}


def count_learner_cpu(algo) -> dict:
    """Wrap the algorithm's ``learner_group.update`` (the learner is local: it runs in this
    thread) to sum its CPU seconds."""
    spent = {"learner_update": 0.0}
    update = algo.learner_group.update

    def timed(**kwargs):
        started = time.thread_time()
        try:
            return update(**kwargs)
        finally:
            spent["learner_update"] += time.thread_time() - started

    algo.learner_group.update = timed
    return spent


def demo_block(algo, learner_cpu: dict) -> dict:
    pids = demo_processes(algo)
    cpu_started = process_cpu(pids)
    learner_started = learner_cpu["learner_update"]
    started = time.perf_counter()
    result = algo.train()
    # Requests this block queued finish inside its timed window (as bench/vcpo_async_throughput).
    while algo._staleness.in_flight:
        algo._collect()
    seconds = time.perf_counter() - started
    cpu = process_cpu(pids, cpu_started)
    vcpo, runners = result["vcpo"], result["env_runners"]
    # The runner's times are sums over the iteration's sample() calls.
    calls = runners["num_env_steps_sampled"] / algo.config.sample_size
    return {"updates_per_s": UPDATES_PER_BLOCK / seconds, "seconds": seconds,
            **{f"time_{p}_s": vcpo.get(f"time_{p}_s", float("nan")) for p in PHASES},
            "learner_busy": vcpo["learner_busy_fraction"],
            "runner_generation_s": runners["generation_time_s"] / calls,
            "runner_sample_s": runners["sample_time_s"] / calls,
            "runner_weight_sync_s": runners.get("weight_sync_time_s", float("nan")),
            "staleness": result["learners"]["default_policy"]["staleness_mean"],
            **{f"cpu_{name}_s": value / UPDATES_PER_BLOCK for name, value in cpu.items()},
            "cpu_learner_update_s": (learner_cpu["learner_update"] - learner_started)
            / UPDATES_PER_BLOCK,
            "load": os.getloadavg()[0]}


def loop_block(loop) -> dict:
    pids = {"process": os.getpid(), "children": child_pids(os.getpid())}
    cpu_started = process_cpu(pids)
    steps_started = dict(loop.cpu_s)
    started = time.perf_counter()
    rewards = [loop.update() for _ in range(UPDATES_PER_BLOCK)]
    seconds = time.perf_counter() - started
    cpu = process_cpu(pids, cpu_started)
    return {"updates_per_s": UPDATES_PER_BLOCK / seconds, "seconds": seconds,
            "reward": statistics.mean(rewards),
            **{f"cpu_{name}_s": value / UPDATES_PER_BLOCK for name, value in cpu.items()},
            **{f"cpu_{name}_s": (loop.cpu_s[name] - steps_started[name]) / UPDATES_PER_BLOCK
               for name in loop.cpu_s},
            "load": os.getloadavg()[0]}


def trl_block(peer, threads: int) -> dict:
    pids = {"children": [peer.grading_pid]}
    cpu_started = process_cpu(pids)
    block = peer.run_block(UPDATES_PER_BLOCK, threads)
    cpu = process_cpu(pids, cpu_started)
    return {"updates_per_s": UPDATES_PER_BLOCK / block["seconds"], "seconds": block["seconds"],
            "cpu_trainer_s": block["cpu_trainer_s"] / UPDATES_PER_BLOCK,
            "cpu_children_s": cpu["children"] / UPDATES_PER_BLOCK, "load": os.getloadavg()[0]}


def order(pair: int, kinds: list[str]) -> list[str]:
    """The contenders' order in block round ``pair``: rotated each round, reversed every other
    round, so that no contender always follows the same one."""
    rotated = kinds[pair % len(kinds):] + kinds[:pair % len(kinds)]
    return rotated if pair % 2 == 0 else rotated[::-1]


def cpu_bound(flat: dict, peer: str) -> float:
    """The most the demo can reach against ``peer`` on 2 cores: it cannot finish an update in
    less than its CPU seconds per update (all its processes) / 2, while the peer takes its
    measured seconds per update."""
    return round(2 * flat[f"{peer}_s_per_update"] / flat["demo_cpu_total_s_per_update"], 2)


def limits(flat: dict) -> str:
    """What keeps the demo from 1.5x its peers, from this run's CPU figures."""
    demo_total = flat["demo_cpu_total_s_per_update"]
    loop_total = flat["sync_loop_cpu_process_s_per_update"] + \
        flat["sync_loop_cpu_children_s_per_update"]
    learner = flat["demo_cpu_learner_update_s_per_update"]
    runner = flat["demo_cpu_runner_s_per_update"]
    return (
        "What limits it: CPU. The demo spreads an update over two cores, but its processes "
        f"together spend {demo_total:.3f} CPU s per update (driver "
        f"{flat['demo_cpu_driver_s_per_update']:.3f}, of which the learner update "
        f"{learner:.3f}; env runner {runner:.3f}, of which vLLM generation "
        f"~{flat['demo_runner_generation_s_per_sample']:.3f} and the in-place weight load "
        f"~{flat['demo_runner_weight_sync_s']:.3f}; grading "
        f"{flat['demo_cpu_runner_children_s_per_update']:.3f}), against {loop_total:.3f} for "
        "the minimal loop's whole update. So on 2 cores the demo can reach at most "
        f"{flat['demo_over_sync_loop_cpu_bound']}x the minimal loop"
        + (f" and {flat['demo_over_trl_cpu_bound']}x TRL" if "demo_over_trl_cpu_bound" in flat
           else "") + " (2 x the peer's seconds per update / the demo's CPU seconds per "
        "update). What the demo does beyond the minimal loop: vLLM's per-request scheduling "
        "(on 6-token answers of a 0.45M-parameter model it generates slower than "
        f"transformers.generate: {flat['demo_runner_generation_s_per_sample']:.3f} against "
        f"{flat['sync_loop_cpu_generation_s_per_update']:.3f} s), a weight load into vLLM after "
        "every update, exact per-trajectory gradient norms for OPOB, and Ray and RLlib "
        "around both.")


def plot(rows: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for kind, color in (("demo", "tab:blue"), ("trl", "tab:orange"), ("loop", "tab:gray")):
        if rows.get(kind):
            axis.plot(range(1, len(rows[kind]) + 1), [r["updates_per_s"] for r in rows[kind]],
                      "o-", color=color, label=LABELS[kind])
    axis.set_xlabel("block round")
    axis.set_ylabel("updates / s (128 trajectories each)")
    axis.set_ylim(bottom=0)
    axis.set_title("End to end, tiny recipe, 2 CPU cores (shared)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / f"{NAME}.png", dpi=120)


LABELS = {"demo": "VCPO demo (async, vLLM runner)",
          "trl": "TRL GRPOTrainer (sync, transformers)",
          "loop": "minimal sync GRPO loop (transformers, 1 process)"}


def serve_peers(conn, total_updates: int) -> None:
    """The peers' process: builds the minimal loop and (where TRL is installed) TRL's trainer,
    sends the kinds it has, then runs one block per kind it receives and sends back its row.
    The peers run apart from the demo's driver so that nothing the demo sets up in its process
    (Ray, its learner, the engine's libraries) weighs on them."""
    import torch
    from trl_grpo_peer import TRLGRPOPeer, trl_available

    config = tiny_config(accuracy_eval_interval=0)
    loop = SyncGRPOLoop(config)

    def loop_with(threads):
        torch.set_num_threads(threads)
        return loop_block(loop)

    blocks = {"loop": loop_with}
    if trl_available():
        trl = TRLGRPOPeer(config, total_updates=total_updates * len(PEER_THREADS))
        blocks["trl"] = lambda threads: trl_block(trl, threads)
    conn.send([f"{peer}@{threads}" for peer in blocks for threads in PEER_THREADS])
    while (kind := conn.recv()) is not None:
        peer, threads = kind.split("@")
        conn.send(blocks[peer](int(threads)))


def main(argv: list[str] | None = None) -> int:
    import multiprocessing

    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 block rounds")
    args = parser.parse_args(argv)
    pairs = 2 if args.quick else 10
    conn, peer_end = multiprocessing.Pipe()
    peers = multiprocessing.get_context("spawn").Process(
        target=serve_peers, args=(peer_end, (pairs + 1) * UPDATES_PER_BLOCK), daemon=True)
    peers.start()
    peer_kinds = conn.recv()
    if not any(kind.startswith("trl@") for kind in peer_kinds):
        print("TRL is not installed (pip install -e '.[bench]'): its row is left out.")
    algo = start_demo(UPDATES_PER_BLOCK)
    learner_cpu = count_learner_cpu(algo)

    def run(kind):
        if kind == "demo":
            return demo_block(algo, learner_cpu)
        conn.send(kind)
        return conn.recv()

    kinds = ["demo", *peer_kinds]
    rows: dict[str, list[dict]] = {kind: [] for kind in kinds}
    try:
        for kind in kinds:  # warm-up
            run(kind)
        for pair in range(pairs):
            for kind in order(pair, kinds):
                row = run(kind)
                rows[kind].append(row)
                print(kind, {k: round(v, 4) for k, v in row.items()}, flush=True)
    finally:
        conn.send(None)
        peers.join(timeout=60)
        algo.stop()
        ray.shutdown()

    def fastest(peer):
        """Per round, the peer's faster thread setting (its rows, tagged with the setting)."""
        settings = [k for k in rows if k.startswith(f"{peer}@")]
        return [max(({**rows[k][i], "threads": int(k.split("@")[1])} for k in settings),
                    key=lambda r: r["updates_per_s"]) for i in range(pairs)] if settings else []

    demo, sync, trl_rows = rows["demo"], fastest("loop"), fastest("trl")

    def mean(rows, key):
        return statistics.mean(r[key] for r in rows)

    def ratios(peer_rows):
        return [d["updates_per_s"] / p["updates_per_s"] for d, p in zip(demo, peer_rows)]

    def headline(peer, peer_rows, goal=None):
        r = ratios(peer_rows)
        return {f"{peer}_updates_per_s": round(mean(peer_rows, "updates_per_s"), 2),
                f"{peer}_s_per_update": round(1 / mean(peer_rows, "updates_per_s"), 3),
                f"demo_over_{peer}": round(statistics.median(r), 2),
                f"demo_over_{peer}_min": round(min(r), 2),
                f"demo_over_{peer}_max": round(max(r), 2),
                **({f"goal_demo_over_{peer}": goal} if goal else {})}

    flat = {
        "demo_updates_per_s": round(mean(demo, "updates_per_s"), 2),
        "demo_s_per_update": round(1 / mean(demo, "updates_per_s"), 3),
        **(headline("trl", trl_rows, goal=1.5) if trl_rows else {}),
        **headline("sync_loop", sync),
        **{f"demo_time_{p}_s": round(mean(demo, f"time_{p}_s"), 4) for p in PHASES},
        "demo_learner_busy": round(mean(demo, "learner_busy"), 3),
        "demo_runner_generation_s_per_sample": round(mean(demo, "runner_generation_s"), 4),
        "demo_runner_sample_s_per_sample": round(mean(demo, "runner_sample_s"), 4),
        "demo_runner_weight_sync_s": round(mean(demo, "runner_weight_sync_s"), 4),
        **{f"demo_cpu_{name}_s_per_update": round(mean(demo, f"cpu_{name}_s"), 4)
           for name in ("driver", "runner", "runner_children")},
        "demo_cpu_learner_update_s_per_update": round(mean(demo, "cpu_learner_update_s"), 4),
        **{f"sync_loop_cpu_{name}_s_per_update": round(mean(sync, f"cpu_{name}_s"), 4)
           for name in ("process", "children", "generation", "learning_step")},
        **({f"trl_cpu_{name}_s_per_update": round(mean(trl_rows, f"cpu_{name}_s"), 4)
            for name in ("trainer", "children")} if trl_rows else {}),
        **{f"{peer}_{t}_threads_updates_per_s": round(mean(rows[f"{kind}@{t}"],
                                                             "updates_per_s"), 2)
           for peer, kind in (("trl", "trl"), ("sync_loop", "loop")) for t in PEER_THREADS
           if f"{kind}@{t}" in rows},
        **{f"{peer}_rounds_won_by_2_threads": sum(r["threads"] == 2 for r in peer_rows)
           for peer, peer_rows in (("trl", trl_rows), ("sync_loop", sync)) if peer_rows},
        "load_average_median": round(statistics.median(
            r["load"] for kind_rows in rows.values() for r in kind_rows), 1),
    }
    flat["demo_cpu_total_s_per_update"] = round(sum(
        flat[f"demo_cpu_{name}_s_per_update"] for name in ("driver", "runner",
                                                           "runner_children")), 4)
    flat["demo_over_sync_loop_cpu_bound"] = cpu_bound(flat, "sync_loop")
    if trl_rows:
        flat["demo_over_trl_cpu_bound"] = cpu_bound(flat, "trl")
    peers = [("trl", trl_rows)] * bool(trl_rows) + [("sync_loop", sync)]
    table = markdown_table(
        ["round", "demo updates/s"] + [f"{p} updates/s" for p, _ in peers]
        + [f"demo / {p}" for p, _ in peers],
        [[i + 1, f"{d['updates_per_s']:.2f}"]
         + [f"{rows_[i]['updates_per_s']:.2f}" for _, rows_ in peers]
         + [f"{d['updates_per_s'] / rows_[i]['updates_per_s']:.2f}x" for _, rows_ in peers]
         for i, d in enumerate(demo)])

    def row(label, key, digits=4):
        before = BEFORE.get(key)
        return [label, "-" if before is None else f"{before:.{digits}f}",
                "-" if key not in flat else f"{flat[key]:.{digits}f}"]

    phase_table = markdown_table(
        ["per update", "before (ba02c42)", "now"],
        [row("demo / minimal loop (median, x)", "demo_over_sync_loop", 2),
         row("demo: seconds per update", "demo_s_per_update", 3),
         row("minimal loop: seconds per update", "sync_loop_s_per_update", 3)]
        + [row(f"driver: {p.replace('_', ' ')}", f"demo_time_{p}_s") for p in PHASES]
        + [row("driver: episode fetch (separate get after the reply)",
               "demo_time_episode_fetch_s"),
           row("learner busy (fraction of the wall time)", "demo_learner_busy", 3),
           row("env runner: one sample() of 128 trajectories (overlaps the learner)",
               "demo_runner_sample_s_per_sample"),
           row("... of which vLLM generation", "demo_runner_generation_s_per_sample"),
           row("env runner: weight sync per update (overlaps the learner)",
               "demo_runner_weight_sync_s")])
    cpu_rows = [
        ["demo: driver (learner, Ray client)", "demo_cpu_driver_s_per_update"],
        ["... of which the learner update (RLlib's Learner.update: connector, VCPO step with "
         "per-trajectory norms, optimiser; driver's main thread)",
         "demo_cpu_learner_update_s_per_update"],
        ["demo: env runner (vLLM in-process, episodes, weight loads)",
         "demo_cpu_runner_s_per_update"],
        ["demo: env runner's children (answer grading)",
         "demo_cpu_runner_children_s_per_update"],
        ["demo: all its processes", "demo_cpu_total_s_per_update"],
        ["TRL: the trainer's thread (generation, rewards call, loss, backward, AdamW)",
         "trl_cpu_trainer_s_per_update"],
        ["TRL: its grading process", "trl_cpu_children_s_per_update"],
        ["minimal loop: its process", "sync_loop_cpu_process_s_per_update"],
        ["... of which transformers.generate", "sync_loop_cpu_generation_s_per_update"],
        ["... of which the learning step (pack, forward, backward, AdamW)",
         "sync_loop_cpu_learning_step_s_per_update"],
        ["minimal loop: its children (answer grading)", "sync_loop_cpu_children_s_per_update"]]
    cpu_table = markdown_table(["process", "CPU s per update"],
                               [[label, f"{flat[key]:.4f}"] for label, key in cpu_rows
                                if key in flat])
    versus = (f"demo / TRL = {flat['demo_over_trl']}x (range {flat['demo_over_trl_min']}-"
              f"{flat['demo_over_trl_max']}x; goal >= 1.5x); " if trl_rows else
              "TRL was not installed, so its row is missing; ")
    notes = [
        versus + f"demo / minimal loop = {flat['demo_over_sync_loop']}x (range "
        f"{flat['demo_over_sync_loop_min']}-{flat['demo_over_sync_loop_max']}x); medians over "
        f"{pairs} block rounds. A block = 10 updates of 16 prompts x 8 samples, <= 6 tokens, "
        "lr 1e-4.",
        "Demo: tuned_examples/vcpo_math_tiny.yaml (VCPO, k = 4, OPOB with ghost norms, one "
        "remote vLLM env runner, learner in the driver with 1 torch thread), evaluation off. "
        "TRL: GRPOTrainer 1.16 (bench/trl_grpo_peer.py: the demo's batch, lr, clipping and "
        "response length, one update per generation, no KL, TRL's defaults otherwise; "
        "transformers.generate). Minimal loop: bench/vcpo_vs_sync_loop.py SyncGRPOLoop, what a "
        "user writes in one file (generate, grade, GRPO loss, AdamW). Both peers run in a "
        "process of their own (apart from the demo's driver: with the demo built in the same "
        "process TRL measured up to 1.5x slower), each with 1 and with 2 torch threads (one "
        "block each per round); each round compares the demo with the peer's faster setting "
        f"(2 threads won {flat['trl_rounds_won_by_2_threads'] if trl_rows else '-'} of "
        f"{pairs} rounds for TRL, {flat['sync_loop_rounds_won_by_2_threads']} for the minimal "
        "loop). All blocks are interleaved, the order rotated each round.",
        "The demo's time per update, by phase (driver side unless named; mean over the "
        "blocks), before and after the pipeline fixes:\n\n" + phase_table,
        "CPU seconds per update by process (from /proc; mean over the blocks): what the work "
        "costs apart from waiting for a core.\n\n" + cpu_table,
        limits(flat),
        "Changes since the 'before' column: the driver collects a finished sample as soon as it "
        "is done (RLlib's fetch waited for every in-flight request until its 50 ms timeout, "
        "with two samples queued per runner), the episodes come in the sample's reply as "
        "columns (no separate object and fetch; 62 instead of 142 KB, serialised in 1 instead "
        "of 10 ms), runner episodes are built in one constructor call, the driver takes a buffered batch without first waiting for a request in flight, RLlib's per-parameter NaN scan is off, and the bench runs Ray's "
        "workers at the driver's niceness (Ray's default, 15, left the env runner a sliver of "
        "a core on the loaded machine while the driver and the peers ran at 0).",
        "The 2-core machine was shared with other jobs during the run (load average, median "
        f"over the blocks: {flat['load_average_median']}); blocks are interleaved so that its "
        "drift hits all alike, but the demo needs both cores at once and the peers one, so a "
        "loaded machine costs the demo more.",
    ]
    plot({"demo": demo, "trl": trl_rows, "loop": sync})
    write_results(NAME, flat, "End to end: the VCPO demo vs synchronous GRPO (TRL and a "
                  "minimal loop)", table, notes, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
