"""What the consumer itself costs with tiny elements iterated directly (`for e in feeder`): its CPU time per
element, and its memory over a multi-million-record epoch. These are the `consumer-cpu` and
`consumer-memory` rows of docs/benchmarks.md.

consumer-cpu: the consuming process's CPU time (`time.process_time`, its threads included, not wall time)
over the elements it took, after a warm-up, for a generator and a random-access source of `tiny` elements
(10 float32 values + an int64 label), ordered, 2 workers. Each repetition runs in a fresh process, and the
repetitions of every row are interleaved. ``--against COMMIT`` adds the same rows for the mpfeed of another
commit (checked out in a temporary worktree, removed afterwards), alternating A B A B.

consumer-memory: one epoch of a random-access source of `tiny` elements, millions of records, iterated
directly: the consumer's RSS and tracemalloc's traced memory at 10%, 50% and 100% of the epoch, and how
long `state_dict(consumed=...)` takes near its end.

    python scripts/consumer_costs.py                     # both rows (the memory row takes minutes)
    python scripts/consumer_costs.py --against b3ed56b   # and consumer-cpu A/B against b3ed56b
    python scripts/consumer_costs.py --only cpu --reps 9
    python scripts/consumer_costs.py --quick             # a smoke run in seconds: figures not to quote
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psutil  # noqa: E402
from benchlib import workloads  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("generator", "random-access")
WORKERS = 2
CHECKPOINTS = (0.10, 0.50, 1.00)
STATE_DICT_CALLS = 5  # timed calls of each state_dict(consumed=...) variant; the median is reported


# -- one repetition of consumer-cpu, in a child process that imports the mpfeed on its PYTHONPATH ----------


def tiny_source(kind: str, length: int) -> tuple[Any, tuple]:
    """The `tiny` workload as mpfeed's source and its args: strided generator shards, or random access."""
    if kind == "generator":
        return workloads.WORKLOADS["tiny"].source, (length,)
    return workloads.IndexedItems("tiny", length), ()


def consumer_cpu(kind: str, elements: int, warmup: int) -> dict[str, Any]:
    """Iterate one epoch of ``warmup + elements`` tiny elements directly; the consumer's CPU time and wall
    time over the last ``elements``."""
    import mpfeed

    source, args = tiny_source(kind, warmup + elements)
    with mpfeed.Feeder(source, args=args, workers=WORKERS) as feeder:
        iterator = iter(feeder)
        for _ in range(warmup):
            next(iterator)
        count = 0
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in iterator:
            count += 1
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if count != elements:
        raise RuntimeError(f"expected {elements} elements after the warm-up, got {count}")
    return {
        "cpu_us": cpu / count * 1e6,
        "rate": count / wall,
        "elements": count,
        "mpfeed": os.path.dirname(mpfeed.__file__),
    }


def run_child(tree: Path, kind: str, elements: int, warmup: int) -> dict[str, Any]:
    """One repetition in a fresh interpreter whose `mpfeed` is ``tree``'s."""
    env = {**os.environ, "PYTHONPATH": str(tree), "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--elements",
        str(elements),
        "--warmup",
        str(warmup),
    ]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        return {"error": tail[0][:200]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["mpfeed"]).resolve() != (tree / "mpfeed").resolve():
        return {"error": f"imported mpfeed from {result['mpfeed']}, not from {tree}"}
    return result


def short_commit(tree: Path, ref: str = "HEAD") -> str:
    done = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", ref], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"not a commit in {tree}: {ref!r} ({done.stderr.strip()})")
    return done.stdout.strip()


def measure_cpu(trees: dict[str, Path], reps: int, elements: int, warmup: int) -> dict[str, dict]:
    """Every (tree, kind) row, ``reps`` repetitions, interleaved: rep 1 of each row, then rep 2, ..."""
    rows = {(label, kind): [] for label in trees for kind in KINDS}  # type: dict[tuple[str, str], list]
    dead: set[tuple[str, str]] = set()
    for rep in range(reps):
        for kind in KINDS:
            for label, tree in trees.items():
                if (label, kind) in dead:
                    continue
                result = run_child(tree, kind, elements, warmup)
                rows[label, kind].append(result)
                shown = result.get("error") or f"{result['cpu_us']:.2f} us/element, {result['rate']:,.0f}/s"
                print(f"# rep {rep + 1}/{reps} {label} {kind}: {shown}", file=sys.stderr, flush=True)
                if "error" in result and rep == 0:
                    dead.add((label, kind))  # e.g. an old commit without random-access sources
    return {f"{label} {kind}": summarize(reps_) for (label, kind), reps_ in rows.items()}


def summarize(reps: list[dict]) -> dict[str, Any]:
    ok = [r for r in reps if "error" not in r]
    if not ok:
        return {"error": reps[0]["error"] if reps else "not run"}
    cpu = [r["cpu_us"] for r in ok]
    rate = [r["rate"] for r in ok]
    return {
        "cpu_us": statistics.median(cpu),
        "cpu_us_min": min(cpu),
        "cpu_us_max": max(cpu),
        "rate": statistics.median(rate),
        "rate_min": min(rate),
        "rate_max": max(rate),
        "reps": len(ok),
        "errors": [r["error"] for r in reps if "error" in r],
        "raw_cpu_us": cpu,
    }


def cpu_table(rows: dict[str, dict], labels: list[str]) -> str:
    header = (
        f"{'row':<14} {'mpfeed':<12} {'source':<14} {'us CPU/elem':>11} {'min-max':>13} {'elem/s':>9} reps"
    )
    lines = [header, "-" * len(header)]
    for kind in KINDS:
        for label in labels:
            row = rows[f"{label} {kind}"]
            if "error" in row:
                lines.append(f"{'consumer-cpu':<14} {label:<12} {kind:<14} error: {row['error'][:60]}")
                continue
            spread = f"{row['cpu_us_min']:.2f}-{row['cpu_us_max']:.2f}"
            lines.append(
                f"{'consumer-cpu':<14} {label:<12} {kind:<14} {row['cpu_us']:>11.2f} {spread:>13} "
                f"{row['rate']:>9,.0f} {row['reps']}"
            )
    if len(labels) == 2:
        for kind in KINDS:
            a, b = rows[f"{labels[0]} {kind}"], rows[f"{labels[1]} {kind}"]
            if "cpu_us" in a and "cpu_us" in b:
                lines.append(
                    f"{kind}: {labels[0]} takes {a['cpu_us'] / b['cpu_us'] - 1:+.1%} consumer CPU per "
                    f"element against {labels[1]} (medians)"
                )
    return "\n".join(lines)


# -- consumer-memory ---------------------------------------------------------------------------------------


def measure_memory(records: int, ordered: bool) -> dict[str, Any]:
    """One epoch of ``records`` tiny random-access records iterated directly: RSS and traced memory at
    the checkpoints, and state_dict(consumed=...) timed a few records before the end."""
    import mpfeed
    from mpfeed import progress

    me = psutil.Process()
    marks = {max(1, int(records * share)): share for share in CHECKPOINTS}
    near_end = records - 10  # the 100% reading and the state_dict timings, before the epoch is over
    marks[near_end] = marks.pop(records)
    rss_before = me.memory_info().rss
    points: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    with mpfeed.Feeder(workloads.IndexedItems("tiny", records), workers=WORKERS, ordered=ordered) as feeder:
        tracemalloc.start()
        try:
            iterator = iter(feeder)
            next(iterator)
            rss_start, traced_start = me.memory_info().rss, tracemalloc.get_traced_memory()[0]
            started = time.perf_counter()
            for taken in range(2, records + 1):
                next(iterator)
                if taken in marks:
                    traced, peak = tracemalloc.get_traced_memory()
                    points.append(
                        {
                            "share": marks[taken],
                            "records": taken,
                            "rss": me.memory_info().rss,
                            "traced": traced,
                            "traced_peak": peak,
                            "tracemalloc_overhead": tracemalloc.get_tracemalloc_memory(),
                            "elapsed_s": time.perf_counter() - started,
                        }
                    )
                    print(f"# {marks[taken]:.0%} of the epoch: {points[-1]}", file=sys.stderr, flush=True)
                if taken == near_end:
                    tracemalloc.stop()  # the timings below without tracing's cost
                    timings = time_state_dict(feeder, taken, progress.HISTORY)
                    tracemalloc.start()
            for _ in iterator:
                raise RuntimeError(f"the epoch of {records} records gave more")
        finally:
            tracemalloc.stop()
    first, last = points[0], points[-1]
    return {
        "records": records,
        "ordered": ordered,
        "history": progress.HISTORY,
        "rss_before_feeder": rss_before,
        "rss_after_first": rss_start,
        "traced_after_first": traced_start,
        "points": points,
        "growth_per_record_rss": (last["rss"] - first["rss"]) / (last["records"] - first["records"]),
        "growth_per_record_traced": (last["traced"] - first["traced"]) / (last["records"] - first["records"]),
        "state_dict_ms": timings,
    }


def time_state_dict(feeder: Any, taken: int, history: int) -> dict[str, float]:
    """Median milliseconds of state_dict() and of state_dict(consumed=...) at ``taken`` records, 1,000
    behind and a whole window behind (as far back as the feeder remembers)."""
    timings = {"state_dict()": _median_ms(feeder.state_dict)}
    for consumed in dict.fromkeys((taken, max(0, taken - 1000), taken - min(history, taken) + 1)):
        timings[f"consumed={consumed}"] = _median_ms(lambda c=consumed: feeder.state_dict(consumed=c))
    return timings


def _median_ms(call: Any) -> float:
    seconds = []
    for _ in range(STATE_DICT_CALLS):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds) * 1e3


def memory_table(memory: dict[str, Any]) -> str:
    mib = 1 << 20
    kind = "ordered" if memory["ordered"] else "first-ready"
    lines = [
        f"consumer-memory: random-access tiny, {kind}, {memory['records']:,} records in one epoch, "
        f"{WORKERS} workers, iterated directly (HISTORY = {memory['history']:,})",
        f"  RSS before the feeder {memory['rss_before_feeder'] / mib:.1f} MiB, after the first element "
        f"{memory['rss_after_first'] / mib:.1f} MiB; traced after the first element "
        f"{memory['traced_after_first'] / mib:.2f} MiB",
        f"  {'at':>5} {'records':>10} {'RSS MiB':>8} {'RSS growth':>11} {'traced MiB':>11} {'peak MiB':>9}",
    ]
    for point in memory["points"]:
        lines.append(
            f"  {point['share']:>5.0%} {point['records']:>10,} {point['rss'] / mib:>8.1f} "
            f"{(point['rss'] - memory['rss_after_first']) / mib:>+10.1f}M "
            f"{point['traced'] / mib:>11.2f} {point['traced_peak'] / mib:>9.2f}"
        )
    lines.append(
        f"  from 10% to 100%: RSS {memory['growth_per_record_rss']:+.3f} B/record, traced "
        f"{memory['growth_per_record_traced']:+.4f} B/record"
    )
    for name, ms in memory["state_dict_ms"].items():
        lines.append(f"  {name:<28} {ms:8.3f} ms (median of {STATE_DICT_CALLS})")
    return "\n".join(lines)


# -- the run -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in seconds (figures not to quote)")
    parser.add_argument("--only", choices=("cpu", "memory"), default=None, help="one row only")
    parser.add_argument("--against", metavar="COMMIT", default=None, help="consumer-cpu A/B against COMMIT")
    parser.add_argument("--reps", type=int, default=None, help="consumer-cpu repetitions per row (7)")
    parser.add_argument("--elements", type=int, default=None, help="consumer-cpu elements per rep (200,000)")
    parser.add_argument("--warmup", type=int, default=None, help="elements before the timing starts (2,000)")
    parser.add_argument("--records", type=int, default=None, help="consumer-memory epoch (3,000,000)")
    parser.add_argument("--unordered", action="store_true", help="consumer-memory first-ready, not ordered")
    parser.add_argument("--child", choices=KINDS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else (200 if args.quick else 2_000)
    elements = args.elements or (2_000 if args.quick else 200_000)
    if args.child:
        print(json.dumps(consumer_cpu(args.child, elements, warmup)))
        return 0
    reps = args.reps or (1 if args.quick else 7)
    records = args.records or (20_000 if args.quick else 3_000_000)

    sys.path.insert(1, str(ROOT))  # this repository's mpfeed, whatever is installed (children: PYTHONPATH)
    from benchlib import report

    info = report.machine(tensorflow=False)
    label = info.get("mpfeed_commit") or "this tree"
    if info.get("mpfeed_modified"):
        label += "+"
    trees = {label: ROOT}
    document: dict[str, Any] = {"machine": info, "options": vars(args)}
    print(
        f"# {info['cpu_model']}, {info['usable_cores']} usable cores; other processes may share them: "
        "medians and min-max over interleaved repetitions",
        file=sys.stderr,
    )
    output = []
    if args.only in (None, "cpu"):
        other = None
        if args.against:
            commit = short_commit(ROOT, args.against)
            other = Path(tempfile.mkdtemp(prefix=f"mpfeed-{commit}-"))
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), commit],
                check=True,
                capture_output=True,
            )
            trees[commit] = other
        try:
            rows = measure_cpu(trees, reps, elements, warmup)
        finally:
            if other is not None:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], check=False
                )
                shutil.rmtree(other, ignore_errors=True)
        document["consumer_cpu"] = {
            "workers": WORKERS,
            "elements": elements,
            "warmup": warmup,
            "trees": {name: str(tree) for name, tree in trees.items()},
            "rows": rows,
        }
        output.append(
            f"consumer-cpu: tiny iterated directly, ordered, {WORKERS} workers, {elements:,} elements "
            f"per rep after {warmup:,}, {reps} interleaved reps, a fresh process each; the consumer's "
            "process CPU time over elements\n" + cpu_table(rows, list(trees))
        )
    if args.only in (None, "memory"):
        memory = measure_memory(records, ordered=not args.unordered)
        document["consumer_memory"] = memory
        output.append(memory_table(memory))
    report.warn_if_engine_changed(info)
    base = report.write_results("consumer-costs", document)
    print("\n\n".join(output))
    print(f"results: {base.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
