"""`make scale-ray` (`python scripts/scale.py --ray`): mpfeed's Ray backend on a local 3-node cluster.

The cluster: a head with no CPUs (the consumer, this process, is its driver) and two worker nodes of
12 logical CPUs each, all bound to 127.0.0.1; the actors sleep, so 24 of them need no real core each.
Every record a worker node makes crosses to the head node's object store, as it would between hosts.

Part 1, `io` (sleep 10 ms, a 224x224x3 uint8 image + int64 label) against the actor count: mpfeed on Ray
(``RayBackend(scheduling_strategy="SPREAD")``) with single elements and with ``batch_size=16``, beside the
local engine (plain `mpfeed.Feeder`) with as many worker processes, as efficiency against the ideal
N / 10 ms. Part 2, `io-5ms` (the same at 5 ms, in batches of 16): mpfeed on Ray, Ray Data's `to_tf`
(when ``ray.data`` imports: ``make scale-ray`` installs it) and serial `from_generator` side by side.
Parts 1 and 2 consume ``dataset()`` (and to_tf's dataset) inside the `tf.data` graph, as training does
(`harness.consume`): a Python loop's ``.numpy()`` would copy every image. Part 3, the per-record cost of
the Ray path on a source that does no work (a tiny element, and the 150 KB image), the feeder iterated
directly (numpy views, no TensorFlow: the pipeline's own cost): wall time and CPU per record in the
consumer, in the workers and in Ray's own processes (raylets, GCS, object managers), against the local
engine and against bare Ray actors answering the same calls without mpfeed.

Sources: mpfeed's rows use the workload's generator source (``Workload.source``, strided shards), as
`scale.py` does. Each figure is the median of interleaved repetitions (each repetition runs every row
once, in an order rotated between repetitions), with the min-max spread.

    python scripts/scale_ray.py            # ~12 minutes on 2 cores
    python scripts/scale_ray.py --quick    # ~1.5 minutes: fewer actor counts, short windows, one repetition
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # nodes bind to 127.0.0.1, not the host's address
# The actors unpickle the workloads' functions by importing `workloads`: the nodes inherit this path.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [SCRIPTS, os.environ.get("PYTHONPATH")]))

import numpy as np  # noqa: E402
from benchlib.harness import Timing, measure, run_schedule, touch  # noqa: E402
from benchlib.report import machine, plot_scaling, warn_if_engine_changed, write_results  # noqa: E402
from benchlib.workloads import (  # noqa: E402
    ENDLESS,
    IO_5MS_SLEEP_S,
    IO_SLEEP_S,
    RAY_WORKLOADS,
    WORKLOADS,
    ItemServer,
    Workload,
)

import mpfeed  # noqa: E402

NODES = 2
NODE_CPUS = 12  # logical CPUs per worker node: room for 24 actors of num_cpus=1
STORE_BYTES = 2**30  # object store per node
ACTOR_COUNTS = (1, 2, 4, 8, 16, 24)
QUICK_ACTOR_COUNTS = (1, 8)
BATCH = 16
TARGET_EFFICIENCY = 0.85  # of ideal, with 24 actors and batch_size=16 on io
TARGET_ACTORS = 24
COMPARE_ACTORS = 24  # part 2: mpfeed's actors, and the CPUs Ray Data's tasks may take
QUICK_COMPARE_ACTORS = 8
# A Ray dataset is finite: rows for one measurement (warm-up and window, each at least its rounds) at a few
# thousand rows/s; what is left runs on after it, until `Processes.settle` sees the CPUs back.
RAY_DATA_ROWS = 8_000
QUICK_RAY_DATA_ROWS = 4_000
OVERHEAD_ACTORS = (1, 8)
QUICK_OVERHEAD_ACTORS = (1,)
DEPTH = 4  # records in flight per actor: mpfeed's default depth, and the bare actors' too
SETTLE_S = 60.0  # longest wait for a run's actors and processes to be gone before the next run

# -- the cluster ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def local_cluster() -> Iterator[Any]:
    """A head (no CPUs) and `NODES` worker nodes on this machine, connected; shut down on the way out,
    whatever happens (an error, Ctrl-C, SIGTERM)."""
    import ray
    from ray.cluster_utils import Cluster

    previous = signal.signal(signal.SIGTERM, _interrupt)
    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 0, "object_store_memory": STORE_BYTES, "include_dashboard": False},
        )
        for _ in range(NODES):
            cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=STORE_BYTES)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class Processes:
    """This process's descendants: Ray's (the cluster's daemons and the workers they start) and the rest
    (the local engine's). CPU seconds of each group, and a wait until a run has left nothing behind."""

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.ray_roots = {child.pid for child in self.me.children()}  # the cluster, started just before

    def _descendants(self) -> list[Any]:
        return self.me.children(recursive=True)

    def _is_ray(self, process: Any) -> bool:
        with contextlib.suppress(self.psutil.Error):
            return any(parent.pid in self.ray_roots for parent in process.parents()) or (
                process.pid in self.ray_roots
            )
        return False

    def is_ray_pid(self, pid: int) -> bool:
        with contextlib.suppress(self.psutil.Error):
            return self._is_ray(self.psutil.Process(pid))
        return False

    def cpu(self) -> dict[int, float]:
        """CPU seconds of every descendant, by pid."""
        times = {}
        for process in self._descendants():
            with contextlib.suppress(self.psutil.Error):
                cpu = process.cpu_times()
                times[process.pid] = cpu.user + cpu.system
        return times

    def settle(self, timeout_s: float = SETTLE_S) -> None:
        """Wait until the cluster's CPUs are all free (every actor gone) and no process of the local
        engine is left."""
        import ray

        total = ray.cluster_resources().get("CPU", 0.0)

        def local_left() -> bool:
            for process in self._descendants():
                with contextlib.suppress(self.psutil.Error):
                    if self._is_ray(process) or process.status() == self.psutil.STATUS_ZOMBIE:
                        continue
                    if "resource_tracker" not in str(process.cmdline()):
                        return True
            return False

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ray.available_resources().get("CPU", 0.0) >= total and not local_left():
                return
            time.sleep(0.05)
        print(f"warning: a run's actors or processes were still there after {timeout_s:g} s", file=sys.stderr)


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else {}


# -- part 1: io against the actor count ----------------------------------------------------------------------


def scaling_rows(counts: tuple[int, ...], timing: Timing) -> list[tuple[str, Callable[[], dict]]]:
    from benchlib.contenders import mpfeed_dataset, mpfeed_ray_dataset

    io = WORKLOADS["io"]
    rows = []
    for count in counts:
        for batch in (None, BATCH):
            suffix = f"-b{batch}" if batch else ""
            round_items = count * (batch or 1)
            for name, build in (("mpfeed-ray", mpfeed_ray_dataset), ("mpfeed-local", mpfeed_dataset)):
                rows.append(
                    (
                        f"{name}{suffix} x{count}",
                        functools.partial(
                            measure,
                            functools.partial(build, io, count, batch),
                            timing,
                            round_items,
                            True,
                        ),
                    )
                )
    return rows


def summarize_scaling(results: dict, counts: tuple[int, ...]) -> dict:
    """The shape `report.plot_scaling` draws: ideal and, per row, rate and efficiency by actor count."""
    rows: dict[str, dict] = {}
    for label, reps in results.items():
        name, count = label.rsplit(" x", 1)
        ok = [r for r in reps if "error" not in r]
        if not ok:
            rows.setdefault(name, {})[int(count)] = {"error": reps[0]["error"]}
            continue
        rates = [r["rate"] for r in ok]
        ideal = int(count) / IO_SLEEP_S
        rows.setdefault(name, {})[int(count)] = {
            "rate": statistics.median(rates),
            "min": min(rates),
            "max": max(rates),
            "efficiency": statistics.median(rates) / ideal,
            "startup_s": statistics.median(r["startup_s"] for r in ok),
            "first_s": statistics.median(r["first_s"] for r in ok),
            "consumed": ok[0]["consumed"],
            "reps": len(ok),
        }
    return {"io": {"ideal": {c: c / IO_SLEEP_S for c in counts}, "rows": rows}}


def scaling_table(summary: dict) -> str:
    entry = summary["io"]
    names = list(entry["rows"])
    lines = [
        "io (sleep 10 ms, 150 KB image + label), elements/s: median (efficiency vs ideal N / 10 ms) and "
        "min-max over the repetitions; dataset() consumed in the tf.data graph",
    ]
    header = f"{'actors':>6} {'ideal':>6}" + "".join(f" {n:>30}" for n in names)
    lines += [header, "-" * len(header)]
    for count, ideal in entry["ideal"].items():
        cells = []
        for name in names:
            cell = entry["rows"][name].get(count)
            if cell is None:
                cells.append(f" {'-':>30}")
            elif "error" in cell:
                cells.append(f" {'error':>30}")
            else:
                text = f"{cell['rate']:,.0f} ({cell['efficiency']:.0%}) {cell['min']:,.0f}-{cell['max']:,.0f}"
                cells.append(f" {text:>30}")
        lines.append(f"{count:>6} {ideal:>6,.0f}" + "".join(cells))
    lines.append("start-up (s until the feeder is built; median), Ray rows:")
    for name in names:
        if name.startswith("mpfeed-ray"):
            starts = ", ".join(
                f"x{c} {cell['startup_s']:.1f}"
                for c, cell in entry["rows"][name].items()
                if "startup_s" in cell
            )
            lines.append(f"  {name}: {starts}")
    return "\n".join(lines)


# -- part 2: io-5ms, mpfeed on Ray against Ray Data's to_tf and from_generator -------------------------------


def ray_data_available() -> bool:
    try:
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


def compare_rows(actors: int, rows: int, timing: Timing) -> list[tuple[str, Callable[[], dict]]]:
    from benchlib.contenders import from_generator, mpfeed_ray_dataset, ray_data_to_tf

    workload = RAY_WORKLOADS["io-5ms"]
    batch = workload.batch_size or 1
    schedule = [
        (
            f"mpfeed-ray-b{batch} x{actors}",
            lambda: measure(lambda: mpfeed_ray_dataset(workload, actors), timing, actors * batch, True),
        ),
        ("from_generator", lambda: measure(lambda: from_generator(workload, 1), timing, batch, True)),
    ]
    if ray_data_available():
        schedule.append(
            (
                f"ray-data-to_tf-b{batch} ({actors} CPUs)",
                lambda: measure(lambda: ray_data_to_tf(workload, rows), timing, actors * batch, True),
            )
        )
    return schedule


def summarize_each(results: dict, summarize: Callable[[list[dict]], dict]) -> dict:
    """row -> ``summarize(the repetitions that worked)`` with their count, or the first error."""
    summary = {}
    for name, reps in results.items():
        ok = [r for r in reps if "error" not in r]
        summary[name] = {**summarize(ok), "reps": len(ok)} if ok else {"error": reps[0]["error"]}
    return summary


def summarize_rows(results: dict) -> dict:
    return summarize_each(
        results,
        lambda ok: {
            "rate": stats([r["rate"] for r in ok]),
            "startup_s": statistics.median(r["startup_s"] for r in ok),
            "first_s": statistics.median(r["first_s"] for r in ok),
            "consumed": ok[0]["consumed"],
        },
    )


def compare_table(summary: dict, actors: int) -> str:
    ideal = actors / IO_5MS_SLEEP_S
    lines = [
        f"io-5ms (sleep 5 ms, 150 KB image + label, batches of {BATCH}); ideal with {actors} actors: "
        f"{ideal:,.0f} elements/s",
    ]
    header = (
        f"{'row':<34} {'elem/s':>8} {'min-max':>15} {'vs ideal':>8} {'start s':>8} {'first s':>8}  consumed"
    )
    lines += [header, "-" * len(header)]
    for name, row in summary.items():
        if "error" in row:
            lines.append(f"{name:<34} error: {row['error'][:90]}")
            continue
        rate = row["rate"]
        spread = f"{rate['min']:,.0f}-{rate['max']:,.0f}"
        lines.append(
            f"{name:<34} {rate['median']:>8,.0f} {spread:>15} {rate['median'] / ideal:>8.0%} "
            f"{row['startup_s']:>8.2f} {row['first_s']:>8.2f}  {row['consumed']}"
        )
    return "\n".join(lines)


# -- part 3: the per-record cost of the Ray path -------------------------------------------------------------


def _window(
    records: Iterator[Any], batched: bool, timing: Timing, processes: Processes, workers: set[int]
) -> dict:
    """Consume ``records`` for a warm-up, then time a window: wall and CPU per record in this process, in
    ``workers`` and in the other processes of the cluster (Ray's daemons)."""
    warm_until = time.perf_counter() + timing.warmup_s
    while time.perf_counter() < warm_until:
        touch(next(records), batched)
    before = processes.cpu()
    count, wall, consumer = 0, time.perf_counter(), time.process_time()  # every thread of this process
    while time.perf_counter() - wall < timing.duration_s:
        touch(next(records), batched)
        count += 1
    consumer = time.process_time() - consumer
    wall = time.perf_counter() - wall
    after = processes.cpu()
    spent = {pid: after[pid] - before.get(pid, 0.0) for pid in after}
    worker_s = sum(s for pid, s in spent.items() if pid in workers)
    ray_s = sum(s for pid, s in spent.items() if pid not in workers and processes.is_ray_pid(pid))
    return {
        "records": count,
        "rate": count / wall,
        "wall_us": 1e6 * wall / count,
        "consumer_us": 1e6 * consumer / count,
        "workers_us": 1e6 * worker_s / count,
        "ray_us": 1e6 * ray_s / count,
    }


def feeder_cost(
    workload: Workload,
    actors: int,
    on_ray: bool,
    timing: Timing,
    processes: Processes,
    batch_size: int | None = None,
) -> dict:
    backend = mpfeed.RayBackend(scheduling_strategy="SPREAD") if on_ray else None
    feeder = mpfeed.Feeder(
        workload.source, args=(ENDLESS,), workers=actors, batch_size=batch_size, backend=backend
    )
    try:
        records = iter(feeder)
        next(records)
        workers = {w.pid for w in feeder.stats().workers}
        result = _window(records, batch_size is not None, timing, processes, workers)
        del records
    finally:
        feeder.close()
    return result


def bare_actor_cost(workload: Workload, actors: int, timing: Timing, processes: Processes) -> dict:
    """Bare Ray actors (`workloads.ItemServer`), `DEPTH` calls in flight each, taken in turn with
    ``ray.get``: what one actor call per record costs without mpfeed."""
    import ray

    server = ray.remote(ItemServer).options(num_cpus=1, scheduling_strategy="SPREAD")
    handles = [server.remote(workload.item) for _ in range(actors)]
    try:
        pids = ray.get([h.pid.remote() for h in handles])
        calls = [[h.call.remote(k) for k in range(DEPTH)] for h in handles]

        def records() -> Iterator[Any]:
            i = DEPTH
            while True:
                for handle, pending in zip(handles, calls):
                    element = ray.get(pending.pop(0))
                    pending.append(handle.call.remote(i))
                    i += 1
                    yield element

        stream = records()
        next(stream)
        result = _window(stream, False, timing, processes, set(pids))
        stream.close()
    finally:
        for handle in handles:
            ray.kill(handle, no_restart=True)
    return result


def overhead_rows(
    actor_counts: tuple[int, ...], timing: Timing, processes: Processes
) -> list[tuple[str, Callable[[], dict]]]:
    rows = []
    for name, workload in (("tiny", WORKLOADS["tiny"]), ("image 150 KB", RAY_WORKLOADS["image"])):
        for actors in actor_counts:
            rows += [
                (
                    f"{name}|mpfeed-ray|{actors}",
                    functools.partial(feeder_cost, workload, actors, True, timing, processes),
                ),
                (
                    f"{name}|mpfeed-local|{actors}",
                    functools.partial(feeder_cost, workload, actors, False, timing, processes),
                ),
                (
                    f"{name}|bare ray actors|{actors}",
                    functools.partial(bare_actor_cost, workload, actors, timing, processes),
                ),
            ]
    for actors in actor_counts:  # the records of the io target: batches of 16 images, 2.4 MB
        for engine, on_ray in (("mpfeed-ray", True), ("mpfeed-local", False)):
            rows.append(
                (
                    f"image b{BATCH} 2.4 MB|{engine}|{actors}",
                    functools.partial(
                        feeder_cost, RAY_WORKLOADS["image"], actors, on_ray, timing, processes, BATCH
                    ),
                )
            )
    return rows


def summarize_overhead(results: dict) -> dict:
    keys = ("rate", "wall_us", "consumer_us", "workers_us", "ray_us")
    return summarize_each(results, lambda ok: {key: stats([r[key] for r in ok]) for key in keys})


def overhead_table(summary: dict) -> str:
    lines = [
        "per-record cost on a source that does no work, the feeder iterated directly (numpy views, no "
        "TensorFlow; mpfeed's default depth 4); CPU us per record in this consumer process (all its "
        "threads), in the workers, and in Ray's other processes (raylets, GCS, object managers, idle "
        "or not); "
        "median (min-max)",
    ]
    header = (
        f"{'record':<17} {'engine':<16} {'actors':>6} {'records/s':>10} {'wall us':>8} "
        f"{'consumer CPU us':>21} {'worker CPU us':>14} {'Ray daemons CPU us':>18}"
    )
    lines += [header, "-" * len(header)]
    for label, row in summary.items():
        element, engine, actors = label.split("|")
        if "error" in row:
            lines.append(f"{element:<17} {engine:<16} {actors:>6} error: {row['error'][:80]}")
            continue
        consumer = row["consumer_us"]
        spread = f"{consumer['median']:,.0f} ({consumer['min']:,.0f}-{consumer['max']:,.0f})"
        lines.append(
            f"{element:<17} {engine:<16} {actors:>6} {row['rate']['median']:>10,.0f} "
            f"{row['wall_us']['median']:>8,.0f} {spread:>21} {row['workers_us']['median']:>14,.0f} "
            f"{row['ray_us']['median']:>18,.0f}"
        )
    return "\n".join(lines)


# -- targets, output -----------------------------------------------------------------------------------------


def targets(scaling: dict, compare: dict, compare_actors: int) -> list[str]:
    lines = []
    cell = scaling["io"]["rows"].get(f"mpfeed-ray-b{BATCH}", {}).get(TARGET_ACTORS)
    if cell is None or "error" in cell:
        lines.append(
            f"target >= {TARGET_EFFICIENCY:.0%} of ideal, {TARGET_ACTORS} actors, batch_size={BATCH}, "
            "io: not measured"
        )
    else:
        ideal = TARGET_ACTORS / IO_SLEEP_S
        verdict = "holds" if cell["efficiency"] >= TARGET_EFFICIENCY else "MISSED"
        lines.append(
            f"target >= {TARGET_EFFICIENCY:.0%} of ideal, {TARGET_ACTORS} actors, batch_size={BATCH}, io: "
            f"measured {cell['efficiency']:.0%} ({cell['rate']:,.0f}/s of {ideal:,.0f}/s; min-max "
            f"{cell['min'] / ideal:.0%}-{cell['max'] / ideal:.0%}): {verdict}"
        )
    ours = next(
        (row for name, row in compare.items() if name.startswith("mpfeed-ray") and "rate" in row), None
    )
    theirs = next(
        (row for name, row in compare.items() if name.startswith("ray-data") and "rate" in row), None
    )
    if ours is None or theirs is None:
        lines.append("target: mpfeed on Ray faster than Ray Data's to_tf on io-5ms: not measured")
    else:
        ratio = ours["rate"]["median"] / theirs["rate"]["median"]
        apart = ours["rate"]["min"] > theirs["rate"]["max"]
        verdict = "holds" if ratio > 1 else "MISSED"
        lines.append(
            f"target: mpfeed on Ray faster than Ray Data's to_tf on io-5ms ({compare_actors} actors / CPUs): "
            f"{ours['rate']['median']:,.0f} vs {theirs['rate']['median']:,.0f} elements/s, {ratio:.2f}x "
            f"({'the spreads do not overlap' if apart else 'the spreads overlap'}): {verdict}"
        )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="actors 1 and 8, short windows, one repetition")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3)")
    parser.add_argument(
        "--parts",
        default="io,compare,overhead",
        help="comma-separated, of io, compare, overhead (default all)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:

    args = parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"io", "compare", "overhead"}
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}; choose from io, compare, overhead")
    reps = args.reps or (1 if args.quick else 3)
    if args.quick:
        timing = Timing(duration_s=0.5, warmup_s=0.2)
        cost_timing = Timing(duration_s=0.6, warmup_s=0.3)
        counts, compare_actors, rows, overhead_actors = (
            QUICK_ACTOR_COUNTS,
            QUICK_COMPARE_ACTORS,
            QUICK_RAY_DATA_ROWS,
            QUICK_OVERHEAD_ACTORS,
        )
    else:
        timing = Timing(duration_s=1.5, warmup_s=0.5)
        cost_timing = Timing(duration_s=2.0, warmup_s=1.0)
        counts, compare_actors, rows, overhead_actors = (
            ACTOR_COUNTS,
            COMPARE_ACTORS,
            RAY_DATA_ROWS,
            OVERHEAD_ACTORS,
        )
    info = machine()
    started = time.perf_counter()
    with local_cluster():
        import ray

        info["ray"] = ray.__version__
        info["cluster"] = {
            "nodes": NODES,
            "cpus_per_node": NODE_CPUS,
            "head_cpus": 0,
            "store_bytes": STORE_BYTES,
        }
        processes = Processes()
        schedule = {}
        if "io" in parts:
            schedule["io"] = scaling_rows(counts, timing)
        if "compare" in parts:
            schedule["io-5ms"] = compare_rows(compare_actors, rows, timing)
        if "overhead" in parts:
            schedule["overhead"] = overhead_rows(overhead_actors, cost_timing, processes)
        raw: dict = {}
        # Between rows, wait for the cluster's resources to come back, not for child processes to exit:
        # the cluster's daemons are children of this process for the whole run.
        run_schedule(schedule, reps, raw, desc="scale-ray", between=processes.settle)
    warn_if_engine_changed(info)
    scaling = summarize_scaling(raw.get("io", {}), counts) if "io" in parts else None
    compare = summarize_rows(raw.get("io-5ms", {})) if "compare" in parts else None
    overhead = summarize_overhead(raw.get("overhead", {})) if "overhead" in parts else None
    goals = targets(scaling or {"io": {"rows": {}}}, compare or {}, compare_actors)

    document = {
        "machine": info,
        "options": vars(args),
        "timing": vars(timing),
        "cost_timing": vars(cost_timing),
    }
    document.update(scaling=scaling, compare=compare, overhead=overhead, targets=goals, raw=raw)
    document["ray_data"] = {
        "pipeline": "ray.data.range(rows).map(item_row).to_tf('image', 'label', batch_size=16)",
        "rows": rows,
        "installed": ray_data_available(),
    }
    base = write_results("scale-ray", document, default=_plain)
    if scaling is not None:
        plot_scaling(
            scaling,
            base.with_suffix(".png"),
            f"mpfeed on Ray (3-node local cluster): {info['cpu_model']}, {info['usable_cores']} cores",
        )

    print(
        f"# {info['cpu_model']}, {info['usable_cores']} usable cores, TF {info['tensorflow']}, "
        f"Ray {info['ray']}, {info['date']}"
    )
    engine = f"{info['mpfeed_commit']}{' (modified)' if info['mpfeed_modified'] else ''}"
    print(f"# mpfeed {engine} from {info['mpfeed_path']}, sources {info['mpfeed_sources_sha256']}")
    print(f"# python {' '.join(sys.argv)}   ({time.perf_counter() - started:.0f} s, {reps} repetitions)")
    print(
        f"# cluster: head (0 CPUs, the driver) + {NODES} nodes x {NODE_CPUS} logical CPUs, 127.0.0.1; "
        "actors spread over the nodes; mpfeed's sources are generators (Workload.source)"
    )
    for table in (
        scaling_table(scaling) if scaling else None,
        compare_table(compare, compare_actors) if compare else None,
        overhead_table(overhead) if overhead else None,
    ):
        if table:
            print()
            print(table)
    print()
    print("\n".join(goals))
    print(f"\nresults: {base}.json{', ' + str(base) + '.png' if scaling else ''}")


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else str(value)


if __name__ == "__main__":
    main()
