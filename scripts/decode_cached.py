"""The `decode-cached` workload of BENCH.md: decode once (``load``), augment every epoch, with and without
mpfeed's shared cache of loaded samples (``cache_bytes``), beside tf.data's
``map(decode).cache().map(augment)``.

The source (`workloads.DecodedImages`) has ``load(i)``, the `decode` workload's JPEG decoded and resized
to 224x224, and ``augment(sample, rng)``, a random 192x192 crop flipped at random. Every mpfeed row is
``Feeder(source, workers=2, shuffle=True, cache_bytes=...)`` iterated through ``dataset()`` by a Python
loop that touches every element, for two epochs; a row's rate is one epoch's elements after its first,
over the time from its first element to its end. Rows:

- ``epoch 1, no cache`` and ``epoch 2, no cache``: what mpfeed did before the cache;
- ``epoch 2, cache holds all``: ``cache_bytes`` the whole data set (index included); beside it, the same
  feeder's epoch 1 (which fills the cache: every sample written into fresh shared pages) and epoch 3
  (every worker has by then read every page of the cache once);
- ``epoch 2, cache holds half``: half the data set's records, beside the index;
- ``tf.data cache(), epoch 2``: ``Dataset.range(n).map(decode).cache().map(augment)``, both maps the same
  numpy work through ``tf.numpy_function``, ``num_parallel_calls=AUTOTUNE``, its second pass;
- ``augment-only ceiling``: the same feeder and ``dataset()`` over `workloads.HeldImages`, whose ``load``
  returns a sample each worker decoded once and holds: ``augment``, the transport and the consumer.

Repetitions are interleaved (every repetition runs every row once, in an order rotated between
repetitions); the table gives medians with the min-max spread. Targets: a cache that holds everything
runs epoch 2 at >= 90% of the ceiling and >= 3x the uncached epoch 2; half of it at >= 90% of the model
``1 / (0.5 x load + augment)``, with ``augment = 1 / ceiling`` and ``load = 1 / uncached epoch 2 -
augment``, per element. Memory: the cache's proportional share of resident memory (PSS, from each
process's ``/proc/<pid>/smaps``), summed over the consumer and every worker, against ``cache_bytes``,
with 1, 2 and 4 workers.

    python scripts/decode_cached.py             # ~2 minutes on 2 cores
    python scripts/decode_cached.py --quick     # smoke run, ~30 s
    python scripts/decode_cached.py --curve     # epoch 2's rate against cache_bytes (make scale runs it)
    python scripts/bench.py --workloads decode-cached   # the same, from make bench

Output: progress on stderr, the tables on stdout, JSON (with what ``report()`` said) under
``bench-results/``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchlib.harness import settle, touch  # noqa: E402
from benchlib.workloads import DecodedImages, HeldImages, decode_item  # noqa: E402

import mpfeed  # noqa: E402

WORKERS = 2
SEED = 0
UNCACHED, ALL, HALF, PEER, CEILING = "no cache", "cache holds all", "cache holds half", "tf.data", "ceiling"
ROWS = {
    "epoch 1, no cache": (UNCACHED, 0),
    "epoch 2, no cache": (UNCACHED, 1),
    "epoch 1, cache holds all": (ALL, 0),
    "epoch 2, cache holds all": (ALL, 1),
    "epoch 3, cache holds all": (ALL, 2),
    "epoch 2, cache holds half": (HALF, 1),
    "tf.data cache(), epoch 2": (PEER, 1),
    "augment-only ceiling": (CEILING, 1),
}
CURVE_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
MEMORY_WORKERS = (1, 2, 4)


def record_bytes() -> int:
    """The bytes one loaded sample takes in the cache (every sample of this workload has the same)."""
    from mpfeed.layout import Encoder, flatten

    return Encoder().prepare([flatten(decode_item(0))], 0, False).nbytes


def cache_size(n: int, fraction: float, workers: int = WORKERS) -> int | None:
    """``cache_bytes`` for a cache that holds ``fraction`` of ``n`` samples (None for 0: no cache)."""
    from mpfeed.cache import overhead_bytes

    if fraction <= 0:
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    wanted = overhead_bytes(n, workers) + int(fraction * n) * record_bytes()
    return -(-wanted // page) * page


def cache_pss(pids: list[int]) -> int:
    """The cache's proportional share of resident memory, summed over these processes (from smaps)."""
    total = 0
    for pid in pids:
        inside = False
        try:
            with open(f"/proc/{pid}/smaps") as smaps:
                for line in smaps:
                    fields = line.split()
                    if "-" in fields[0] and not fields[0].endswith(":"):
                        inside = "mpfeed-cache-" in line
                    elif inside and fields[0] == "Pss:":
                        total += int(fields[1]) * 1024
        except OSError:
            pass
    return total


def total_pss(pids: list[int]) -> int:
    """Every page these processes map, each shared page counted once in all (smaps_rollup's Pss)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                total += next(int(line.split()[1]) * 1024 for line in rollup if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total


def timed_pass(elements: Any) -> float:
    """One pass: elements after the first, over the seconds from the first to the end."""
    iterator = iter(elements)
    touch(next(iterator), False)
    started = time.perf_counter()
    count = sum(touch(element, False) for element in iterator)
    return count / (time.perf_counter() - started)


def feeder_run(source: Any, cache_bytes: int | None, workers: int = WORKERS, epochs: int = 2) -> dict:
    """A feeder's epochs through ``dataset()``: each one's rate, then its stats, report and memory."""
    feeder = mpfeed.Feeder(source, workers=workers, seed=SEED, shuffle=True, cache_bytes=cache_bytes)
    try:
        dataset = feeder.dataset()
        rates = [timed_pass(dataset) for _ in range(epochs)]
        stats = feeder.stats()
        pids = [os.getpid()] + [w.pid for w in stats.workers]
        return {
            "rates": rates,
            "cache_bytes": cache_bytes,
            "cache": {
                "hits": stats.cache_hits,
                "misses": stats.cache_misses,
                "bytes": stats.cache_bytes,
                "entries": stats.cache_entries,
            },
            "cache_pss": cache_pss(pids),
            "workers_pss": total_pss(pids[1:]),
            "report": feeder.report(),
        }
    finally:
        feeder.close()
        settle()


def peer_run(n: int) -> dict:
    from benchlib.contenders import tf_decode_cache_augment

    dataset = tf_decode_cache_augment(n)
    return {"rates": [timed_pass(dataset) for _ in range(2)]}


def runs(n: int) -> dict[str, Any]:
    """What each kind of run builds, by name."""
    return {
        UNCACHED: lambda: feeder_run(DecodedImages(n), None),
        ALL: lambda: feeder_run(DecodedImages(n), cache_size(n, 1.0), epochs=3),
        HALF: lambda: feeder_run(DecodedImages(n), cache_size(n, 0.5)),
        PEER: lambda: peer_run(n),
        CEILING: lambda: feeder_run(HeldImages(n), None),
    }


def schedule(n: int, reps: int, progress: Any) -> dict[str, list[dict]]:
    """Every kind of run once a repetition, in an order rotated between repetitions."""
    kinds = runs(n)
    names = list(kinds)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            progress.set_postfix_str(name)
            results[name].append(kinds[name]())
            progress.update()
    return results


def summarize(results: dict[str, list[dict]]) -> dict:
    rows = {}
    for row, (kind, epoch) in ROWS.items():
        rates = [run["rates"][epoch] for run in results[kind]]
        rows[row] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "rates": rates}
    medians = {row: figures["median"] for row, figures in rows.items()}
    reps = range(len(results[UNCACHED]))
    per_rep = [{row: figures["rates"][rep] for row, figures in rows.items()} for rep in reps]
    targets = {
        name: {"medians": ratio(medians), "per_rep": [ratio(r) for r in per_rep]}
        for name, ratio in TARGETS.items()
    }
    return {"rows": rows, "model_half": half_model(medians), "targets": targets}


def half_model(rates: dict[str, float]) -> float:
    """The model for half: ``1 / (0.5 x load + augment)`` per element, with ``augment = 1 / ceiling`` and
    ``load = 1 / uncached - augment``."""
    augment_s = 1 / rates["augment-only ceiling"]
    load_s = max(1 / rates["epoch 2, no cache"] - augment_s, 0.0)
    return 1 / (0.5 * load_s + augment_s)


TARGETS = {
    "all / ceiling (>= 0.90)": lambda r: r["epoch 2, cache holds all"] / r["augment-only ceiling"],
    "all / uncached epoch 2 (>= 3)": lambda r: r["epoch 2, cache holds all"] / r["epoch 2, no cache"],
    "half / model 1/(0.5 load + augment) (>= 0.90)": lambda r: r["epoch 2, cache holds half"] / half_model(r),
}


def table(summary: dict, n: int) -> str:
    lines = [f"decode-cached: {n} elements, {WORKERS} workers, dataset() in a Python loop (elements/s)"]
    lines.append(f"{'row':<28} {'median':>8} {'min-max':>15}")
    for row, figures in summary["rows"].items():
        spread = f"{figures['min']:.0f}-{figures['max']:.0f}"
        lines.append(f"{row:<28} {figures['median']:>8.0f} {spread:>15}")
    lines.append(f"{'model for half':<28} {summary['model_half']:>8.0f}")
    lines.append("targets: ratio of the medians; in brackets, each repetition's own ratio")
    for name, value in summary["targets"].items():
        each = ", ".join(f"{ratio:.2f}" for ratio in value["per_rep"])
        lines.append(f"  {name}: {value['medians']:.2f}  [{each}]")
    return "\n".join(lines)


def memory(n: int, worker_counts: tuple[int, ...]) -> list[dict]:
    """The cache's PSS, all processes together, with a cache that holds all, for each worker count."""
    rows = []
    size = cache_size(n, 1.0, max(worker_counts))
    for workers in worker_counts:
        run = feeder_run(DecodedImages(n), size, workers=workers, epochs=1)
        rows.append({"workers": workers, **{k: run[k] for k in ("cache_bytes", "cache_pss", "workers_pss")}})
    return rows


def memory_table(rows: list[dict], n: int) -> str:
    held = n * record_bytes()
    lines = [f"memory: a cache that holds all {n} samples ({held / 2**20:.1f} MiB of records)"]
    header = f"{'workers':>7} {'cache_bytes':>12} {'cache PSS':>10} {'PSS/budget':>10} {'workers PSS':>12}"
    lines.append(header)
    for row in rows:
        mib = row["cache_bytes"] / 2**20, row["cache_pss"] / 2**20, row["workers_pss"] / 2**20
        lines.append(
            f"{row['workers']:>7} {mib[0]:>9.1f} MiB {mib[1]:>6.1f} MiB "
            f"{row['cache_pss'] / row['cache_bytes']:>10.3f} {mib[2]:>8.1f} MiB"
        )
    return "\n".join(lines)


# -- the curve: epoch 2's rate against cache_bytes (part of make scale) ---------------------------------


def cache_curve(n: int, reps: int, progress: Any, fractions: tuple[float, ...] = CURVE_FRACTIONS) -> dict:
    """Epoch 2's rate for caches that hold each fraction of the data set, interleaved repetitions."""
    results: dict[float, list[float]] = {fraction: [] for fraction in fractions}
    for rep in range(reps):
        order = list(fractions[rep % len(fractions) :] + fractions[: rep % len(fractions)])
        for fraction in order:
            progress.set_postfix_str(f"cache {fraction:.0%}")
            run = feeder_run(DecodedImages(n), cache_size(n, fraction))
            results[fraction].append(run["rates"][1])
            progress.update()
    return {
        "n": n,
        "points": [
            {
                "fraction": fraction,
                "cache_bytes": cache_size(n, fraction) or 0,
                "median": statistics.median(rates),
                "min": min(rates),
                "max": max(rates),
            }
            for fraction, rates in results.items()
        ],
    }


def curve_table(curve: dict) -> str:
    lines = [f"epoch 2 against cache_bytes: {curve['n']} elements, {WORKERS} workers (elements/s)"]
    lines.append(f"{'holds':>6} {'cache_bytes':>14} {'median':>8} {'min-max':>12}")
    for point in curve["points"]:
        spread = f"{point['min']:.0f}-{point['max']:.0f}"
        size = f"{point['cache_bytes'] / 2**20:.1f} MiB"
        lines.append(f"{point['fraction']:>6.0%} {size:>14} {point['median']:>8.0f} {spread:>12}")
    return "\n".join(lines)


def plot_curve(curve: dict, path: Any, title: str) -> None:
    from benchlib.report import figure_grid, save_figure

    figure, axes = figure_grid(1, 1, (5.0, 3.5))
    axis = axes[0][0] if hasattr(axes[0], "__len__") else axes[0]
    points = curve["points"]
    x = [p["cache_bytes"] / 2**20 for p in points]
    axis.errorbar(
        x,
        [p["median"] for p in points],
        yerr=[[p["median"] - p["min"] for p in points], [p["max"] - p["median"] for p in points]],
        marker="o",
        capsize=3,
    )
    axis.set_xlabel("cache_bytes (MiB)")
    axis.set_ylabel("epoch 2, elements/s")
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    save_figure(figure, title, path)


# -- the command line ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer elements, one repetition")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3; 1 quick)")
    parser.add_argument("--elements", type=int, default=None, help="the data set (default 1000; 300 quick)")
    parser.add_argument("--curve", action="store_true", help="only the curve of epoch 2 against cache_bytes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from benchlib.report import machine, warn_if_engine_changed, write_results
    from tqdm import tqdm

    args = parse_args(argv)
    n = args.elements or (300 if args.quick else 1000)
    reps = args.reps or (1 if args.quick else 3)
    info = machine()
    started = time.perf_counter()
    document: dict[str, Any] = {"machine": info, "options": vars(args), "elements": n, "workers": WORKERS}
    if args.curve:
        with tqdm(total=reps * len(CURVE_FRACTIONS), desc="cache curve", file=sys.stderr) as progress:
            document["curve"] = curve = cache_curve(n, reps, progress)
        text = curve_table(curve)
    else:
        counts = MEMORY_WORKERS[:2] if args.quick else MEMORY_WORKERS
        with tqdm(total=reps * len(runs(n)), desc="decode-cached", file=sys.stderr) as progress:
            results = schedule(n, reps, progress)
        document["memory"] = rows = memory(n, counts)
        document["summary"] = summary = summarize(results)
        document["reports"] = {kind: results[kind][-1].get("report") for kind in (ALL, HALF)}
        document["raw"] = results
        text = "\n\n".join([table(summary, n), memory_table(rows, n)])
        text += "\n\nreport(), cache holds half:\n" + str(document["reports"][HALF])
    warn_if_engine_changed(info)
    base = write_results("decode-cached-curve" if args.curve else "decode-cached", document)
    if args.curve:
        title = f"epoch 2 against cache_bytes: {info['cpu_model']}"
        plot_curve(document["curve"], base.with_suffix(".png"), title)
    cores = f"{info['usable_cores']} usable cores"
    print(f"# {info['cpu_model']}, {cores}, TF {info['tensorflow']}, {info['date']}")
    engine = f"{info['mpfeed_commit']}{' (modified)' if info['mpfeed_modified'] else ''}"
    print(f"# mpfeed {engine} from {info['mpfeed_path']}")
    print(f"# python {' '.join(sys.argv)}   ({time.perf_counter() - started:.0f} s)")
    print(text)
    print(f"\nresults: {base}.json")


if __name__ == "__main__":
    main()
