"""`make scale`: throughput against worker count, and what mpfeed itself costs.

Part 1 runs the `io`, `decode` and `python` workloads with 1, 2, 4, ... workers (up to twice the usable
cores, and up to 32 for `io`) for every contender that takes a worker count, beside `from_generator`
(which has none) and the ideal: for `io` N / 10 ms, otherwise one core's rate x min(N, cores). Each
warm-up and window lasts whole rounds of the workers too (`harness.measure`), so that `mpfeed-b16`, whose
workers need 160 ms for one batch on `io`, is timed over several batches of every worker even in the
short windows of ``--quick``.

Part 2 measures mpfeed's own cost on a source that does no work: the consumer's CPU time per element
(iterating the feeder directly and through ``dataset()``), the workers' CPU time per element beyond the
source's own, and the start-up of 16 workers. From those it predicts how many cores of work one consumer
can keep fed.

    python scripts/scale.py              # ~8 minutes on 2 cores
    python scripts/scale.py --quick      # ~1 minute
    python scripts/scale.py --ray        # the Ray backend on a local cluster: scripts/scale_ray.py

Part 3 is the curve of epoch 2's rate against ``cache_bytes`` on the `decode-cached` workload
(`decode_cached.cache_curve`: caches that hold 0, 25, 50, 75 and 100% of the data set), with its own table
and PNG; ``--no-cache-curve`` skips it.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from benchlib.harness import Contender, Pipeline, Timing, measure, settle, touch, usable_cores  # noqa: E402
from benchlib.limits import one_core  # noqa: E402
from benchlib.report import machine, plot_scaling, warn_if_engine_changed, write_results  # noqa: E402
from benchlib.workloads import ENDLESS, IO_SLEEP_S, WORKLOADS, Workload  # noqa: E402

import mpfeed  # noqa: E402

# The contenders, and TensorFlow with them, are imported where they are used: a spawned worker (Grain's)
# imports this script again, and needs none of them.

PREDICT_WORK_MS = (1, 5, 20)
STARTUP_WORKERS = 16
IO_MAX_WORKERS = 32
PEER_MAX_WORKERS = 8  # PyTorch and Grain workers, at most


def worker_counts(workload: Workload, cores: int) -> list[int]:
    top = IO_MAX_WORKERS if workload.name == "io" else 2 * cores
    counts = [1]
    while counts[-1] * 2 <= top:
        counts.append(counts[-1] * 2)
    return counts


def mpfeed_b16(workload: Workload, workers: int) -> Pipeline:
    from benchlib.contenders import mpfeed_dataset

    return mpfeed_dataset(workload, workers, batch_size=16)


def scaling_contenders(workload: Workload, workers: int) -> list[Contender]:
    """The contenders that take a worker count. PyTorch's and Grain's loaders, when installed, run up to
    `PEER_MAX_WORKERS`: each of their workers imports this script again, which at 32 workers takes longer
    than the measurement."""
    from benchlib.contenders import (
        PEER_MODULES,
        PEERS,
        importable,
        keras_pydataset,
        mp_pool,
        mpfeed_dataset,
        tf_map,
    )

    peers = [peer for peer in PEERS if importable(PEER_MODULES[peer.name])]
    contenders = [
        Contender("tf-map", lambda w, n: tf_map(w, n, parallel=n)),
        Contender("keras-pydataset", keras_pydataset),
        Contender("mp-pool", mp_pool),
        *(peers if workers <= PEER_MAX_WORKERS else []),
        Contender("mpfeed", mpfeed_dataset),
    ]
    if workload.name == "io":
        contenders.append(Contender("mpfeed-b16", mpfeed_b16, batch_size=16))
    return contenders


# -- part 1: throughput against worker count -----------------------------------------------------------------


def scaling(workloads: list[Workload], reps: int, timing: Timing, progress: Any) -> dict:
    """``{workload: {"one_core": rate, "rows": {contender: {workers: [rates]}}}}``, interleaved."""
    from benchlib.contenders import from_generator

    cores = usable_cores()
    results: dict = {w.name: {"one_core": [], "rows": {}} for w in workloads}
    for rep in range(reps):
        for workload in workloads:
            entry = results[workload.name]
            if workload.limit == "ideal-cpu":
                entry["one_core"].append(one_core(workload, timing.duration_s))
            jobs = [("from_generator", 1, from_generator, 1)]
            for count in worker_counts(workload, cores):
                jobs += [
                    (c.name, count, c.build, c.round_items(workload, count))
                    for c in scaling_contenders(workload, count)
                ]
            shift = rep % len(jobs)
            for name, count, build, round_items in jobs[shift:] + jobs[:shift]:
                progress.set_postfix_str(f"rep {rep + 1}/{reps} {workload.name} {name} x{count}")
                try:
                    pipeline = functools.partial(build, workload, count)
                    rate = measure(pipeline, timing, round_items, workload.in_graph)["rate"]
                except Exception as error:
                    progress.write(f"{workload.name} / {name} x{count}: {type(error).__name__}: {error}")
                    rate = None
                finally:
                    settle()
                entry["rows"].setdefault(name, {}).setdefault(count, []).append(rate)
                progress.update()
    return results


def ideal(workload: Workload, workers: int, one_core: float | None, cores: int) -> float | None:
    if workload.name == "io":
        return workers / IO_SLEEP_S
    return one_core * min(workers, cores) if one_core else None


def summarize_scaling(workloads: list[Workload], results: dict) -> dict:
    cores = usable_cores()
    summary = {}
    for workload in workloads:
        entry = results[workload.name]
        one_core = statistics.median(entry["one_core"]) if entry["one_core"] else None
        counts = worker_counts(workload, cores)
        rows = {}
        for name, by_count in entry["rows"].items():
            rows[name] = {}
            for count in counts:
                # from_generator has no workers: its one measurement stands at every count
                measured = by_count[1] if name == "from_generator" else by_count.get(count, [])
                rates = [r for r in measured if r is not None]
                if rates:
                    median = statistics.median(rates)
                    limit = ideal(workload, count, one_core, cores)
                    rows[name][count] = {
                        "rate": median,
                        "min": min(rates),
                        "max": max(rates),
                        "efficiency": median / limit if limit else None,
                    }
        summary[workload.name] = {
            "attempted": {name: sorted(by_count) for name, by_count in entry["rows"].items()},
            "one_core": one_core,
            "ideal": {count: ideal(workload, count, one_core, cores) for count in counts},
            "rows": rows,
        }
    return summary


def scaling_table(summary: dict) -> str:
    lines = []
    for name, entry in summary.items():
        contenders = list(entry["rows"])
        lines.append(f"\n{name}: elements/s (efficiency vs ideal)")
        header = f"{'workers':>7} {'ideal':>8}" + "".join(f" {c:>19}" for c in contenders)
        lines += [header, "-" * len(header)]
        for count, limit in entry["ideal"].items():
            cells = []
            for contender in contenders:
                cell = entry["rows"][contender].get(count)
                if cell is None:
                    cells.append(f" {'-' if count not in entry['attempted'][contender] else 'error':>19}")
                    continue
                efficiency = f"({cell['efficiency']:.0%})" if cell["efficiency"] is not None else ""
                cells.append(f" {cell['rate']:>12,.0f} {efficiency:>6}")
            lines.append(f"{count:>7} {limit or 0:>8,.0f}" + "".join(cells))
    return "\n".join(lines)


# -- part 2: mpfeed's own cost -------------------------------------------------------------------------------


def cpu_seconds(feeder: mpfeed.Feeder) -> float:
    return sum(worker.cpu_s for worker in feeder.stats().workers)


def consumer_cost(workload: Workload, workers: int, timing: Timing, batch_size: int | None, via: str) -> dict:
    """CPU seconds per element in the consumer process and in the workers, over a steady window."""
    feeder = mpfeed.Feeder(workload.source, args=(ENDLESS,), workers=workers, batch_size=batch_size)
    try:
        elements = feeder if via == "direct" else feeder.dataset()
        batched = batch_size is not None
        iterator = iter(elements)
        warm_until = time.perf_counter() + timing.warmup_s + 0.3  # workers' own start-up CPU stays out
        while time.perf_counter() < warm_until:
            touch(next(iterator), batched)
        count, workers_cpu = 0, cpu_seconds(feeder)
        wall, consumer = time.perf_counter(), time.process_time()  # every thread of this process
        while time.perf_counter() - wall < timing.duration_s:
            count += touch(next(iterator), batched)
        consumer = time.process_time() - consumer
        wall = time.perf_counter() - wall
        workers_cpu = cpu_seconds(feeder) - workers_cpu
        del iterator
    finally:
        feeder.close()
    return {"rate": count / wall, "consumer_s": consumer / count, "workers_s": workers_cpu / count}


def source_cost(workload: Workload, duration: float) -> float:
    """Seconds per element of the source's own work, alone in a fresh interpreter."""
    return 1 / one_core(workload, duration)


START_METHODS = ("forkserver", "spawn")


def startup(workers: int, start_method: str) -> dict:
    """Seconds until the constructor returns, and until every worker has delivered an element."""
    started = time.perf_counter()
    feeder = mpfeed.Feeder(
        WORKLOADS["tiny"].source, args=(ENDLESS,), workers=workers, start_method=start_method
    )
    built = time.perf_counter()
    try:
        iterator = iter(feeder)
        for _ in range(workers):  # ordered round-robin: element k comes from worker k
            next(iterator)
        ready = time.perf_counter()
        del iterator
    finally:
        feeder.close()
    return {"constructor_s": built - started, "all_ready_s": ready - started}


def costs(reps: int, timing: Timing, progress: Any) -> dict:
    cores = usable_cores()
    cases: list[tuple[str, str, str, int | None]] = [
        ("tiny, direct", "tiny", "direct", None),
        ("tiny, dataset()", "tiny", "dataset", None),
        ("tiny, dataset(), batch_size=256", "tiny", "dataset", 256),
        ("transfer 8 MiB, direct", "transfer", "direct", None),
        ("transfer 8 MiB, dataset()", "transfer", "dataset", None),
    ]
    measured: dict[str, list] = {label: [] for label, *_ in cases}
    starts: dict[str, list[dict]] = {method: [] for method in START_METHODS}
    own = {name: [] for name in ("tiny", "transfer")}
    for rep in range(reps):
        for label, name, via, batch_size in cases:
            progress.set_postfix_str(f"rep {rep + 1}/{reps} cost: {label}")
            measured[label].append(consumer_cost(WORKLOADS[name], cores, timing, batch_size, via))
            settle()
            progress.update()
        for name in own:
            own[name].append(source_cost(WORKLOADS[name], timing.duration_s / 2))
        for method in START_METHODS:
            progress.set_postfix_str(f"rep {rep + 1}/{reps} start-up of {STARTUP_WORKERS} workers ({method})")
            starts[method].append(startup(STARTUP_WORKERS, method))
            settle()
        progress.update()
    summary: dict[str, Any] = {"cases": {}}
    for label, name, _, _ in cases:
        runs = measured[label]
        source_s = statistics.median(own[name])
        summary["cases"][label] = {
            "rate": statistics.median(r["rate"] for r in runs),
            "consumer_us": 1e6 * statistics.median(r["consumer_s"] for r in runs),
            "consumer_us_min": 1e6 * min(r["consumer_s"] for r in runs),
            "consumer_us_max": 1e6 * max(r["consumer_s"] for r in runs),
            "workers_us": 1e6 * statistics.median(r["workers_s"] for r in runs),
            "source_us": 1e6 * source_s,
            "overhead_us": 1e6 * (statistics.median(r["workers_s"] for r in runs) - source_s),
        }
    summary["startup"] = {
        method: {
            "workers": STARTUP_WORKERS,
            "constructor_s": statistics.median(s["constructor_s"] for s in runs),
            "all_ready_s": statistics.median(s["all_ready_s"] for s in runs),
            "all_ready_s_min": min(s["all_ready_s"] for s in runs),
            "all_ready_s_max": max(s["all_ready_s"] for s in runs),
        }
        for method, runs in starts.items()
    }
    summary["prediction"] = predict(summary["cases"])
    return summary


def predict(cases: dict) -> dict:
    """Cores of work one consumer keeps fed: (work + worker overhead) / consumer CPU, per element."""
    overhead_s = max(cases["tiny, direct"]["overhead_us"], 0.0) / 1e6
    prediction = {}
    for label in ("tiny, direct", "tiny, dataset()", "tiny, dataset(), batch_size=256"):
        consumer_s = cases[label]["consumer_us"] / 1e6
        prediction[label] = {ms: (ms / 1e3 + overhead_s) / consumer_s for ms in PREDICT_WORK_MS}
    return prediction


def costs_table(summary: dict) -> str:
    header = (
        f"{f'mpfeed cost per element ({usable_cores()} workers)':<34} {'elem/s':>10} {'consumer CPU us':>22} "
        f"{'worker CPU us':>14} {'source us':>10} {'overhead us':>12}"
    )
    lines = [header, "-" * len(header)]
    for label, case in summary["cases"].items():
        spread = f"({case['consumer_us_min']:.1f}-{case['consumer_us_max']:.1f})"
        lines.append(
            f"{label:<34} {case['rate']:>10,.0f} {case['consumer_us']:>8.1f} {spread:>13} "
            f"{case['workers_us']:>14.1f} {case['source_us']:>10.1f} {case['overhead_us']:>12.1f}"
        )
    lines.append("")
    for method, start in summary["startup"].items():
        lines.append(
            f"start-up of {start['workers']} workers ({method}): constructor {start['constructor_s']:.3f} s, "
            f"every worker delivered an element after {start['all_ready_s']:.3f} s "
            f"(min-max {start['all_ready_s_min']:.3f}-{start['all_ready_s_max']:.3f})"
        )
    lines.append("\npredicted cores of work one consumer keeps fed (work + worker overhead) / consumer CPU:")
    lines.append(f"{'consumer':<34}" + "".join(f" {f'{ms} ms/element':>15}" for ms in PREDICT_WORK_MS))
    for label, row in summary["prediction"].items():
        lines.append(f"{label:<34}" + "".join(f" {row[ms]:>15,.1f}" for ms in PREDICT_WORK_MS))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows, one repetition")
    parser.add_argument("--workloads", default="io,decode,python", help="comma-separated")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3)")
    parser.add_argument("--no-costs", action="store_true", help="skip part 2 (mpfeed's own cost)")
    parser.add_argument(
        "--no-cache-curve", action="store_true", help="skip part 3 (epoch 2 against cache_bytes)"
    )
    parser.add_argument(
        "--ray",
        action="store_true",
        help="the Ray backend's mode instead: scripts/scale_ray.py, given the rest",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm

    argv = sys.argv[1:] if argv is None else argv
    if "--ray" in argv:
        import scale_ray

        scale_ray.main([arg for arg in argv if arg != "--ray"])
        return
    args = parse_args(argv)
    workloads = [WORKLOADS[name.strip()] for name in args.workloads.split(",") if name.strip()]
    reps = args.reps or (1 if args.quick else 3)
    timing = Timing(duration_s=0.3, warmup_s=0.1) if args.quick else Timing(duration_s=1.0, warmup_s=0.3)
    cores = usable_cores()
    info = machine()
    started = time.perf_counter()
    per_rep = sum(
        1 + sum(len(scaling_contenders(w, count)) for count in worker_counts(w, cores)) for w in workloads
    )
    total = reps * (per_rep + (0 if args.no_costs else 6))
    with tqdm(total=total, desc="scale", unit="run", file=sys.stderr, dynamic_ncols=True) as progress:
        raw = scaling(workloads, reps, timing, progress)
        cost = None if args.no_costs else costs(reps, timing, progress)
    warn_if_engine_changed(info)
    summary = summarize_scaling(workloads, raw)

    document = {"machine": info, "options": vars(args), "timing": vars(timing)}
    document.update(scaling=summary, costs=cost, raw=raw)
    base = write_results("scale", document, default=_plain)
    plot_scaling(summary, base.with_suffix(".png"), f"mpfeed scaling: {info['cpu_model']}, {cores} cores")

    print(f"# {info['cpu_model']}, {cores} usable cores, TF {info['tensorflow']}, {info['date']}")
    engine = f"{info['mpfeed_commit']}{' (modified)' if info['mpfeed_modified'] else ''}"
    print(f"# mpfeed {engine} from {info['mpfeed_path']}, sources {info['mpfeed_sources_sha256']}")
    print(f"# python {' '.join(sys.argv)}   ({time.perf_counter() - started:.0f} s)")
    print(scaling_table(summary))
    if cost is not None:
        print()
        print(costs_table(cost))
    print(f"\nresults: {base}.json, {base}.png")
    if not args.no_cache_curve:
        cache_curve_part(args)


def cache_curve_part(args: argparse.Namespace) -> None:
    """Part 3: `decode_cached.py --curve` in a process of its own (its feeders and TensorFlow's threads
    apart from the figures above)."""
    import subprocess
    from pathlib import Path

    command = [sys.executable, str(Path(__file__).with_name("decode_cached.py")), "--curve"]
    if args.quick:
        command.append("--quick")
    if args.reps:
        command += ["--reps", str(args.reps)]
    subprocess.run(command, check=True)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else str(value)


if __name__ == "__main__":
    main()
