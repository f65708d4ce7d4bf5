"""The `straggler` workload of docs/benchmarks.md: uneven costs, and how much of the workers' combined rate
each loader still delivers.

Every element waits like I/O (``time.sleep``, 4 ms as a rule) and is 64 bytes and an int64 label; 8
workers make them. Three patterns (`workloads.straggler_cost`): `half-speed`, one worker at half speed;
`lognormal`, costs lognormal with sigma 1 and mean 4 ms; `one-in-100`, one element in each 100 50x
slower (200 ms). Each pattern runs ordered (source order) and unordered (first ready), with these rows:

- ``mpfeed``: `mpfeed.Feeder` over a random-access source (`workloads.StragglerItems`, ``len`` and
  ``[i]``); in `lognormal` ordered also with ``depth=8``.
- ``mpfeed-generator``: `mpfeed.Feeder` over the same work as a generator with fixed strided shards
  (`workloads.straggler_shard`).
- ``torch-dataloader``: PyTorch's ``DataLoader(num_workers=8, batch_size=None, in_order=...)`` over the
  random-access source, when torch is installed.

Beside them, the ceilings (`no-wait`): each loader, first ready, over the same elements at no cost: what
its own per-element overhead allows on this machine.

Every row is iterated directly, by a Python loop over the loader (no TensorFlow), and measured by
`harness.measure`: start-up, time to first element, and the steady-state rate after a warm-up. ``ideal``
is the workers' combined rate, the sum over workers of 1 / their mean cost; each repetition's share of
ideal uses the mean cost of the elements its window measured (the ideal line of the table gives the
long-run mean), since lognormal costs vary by a few percent from one window of a few thousand elements to
the next. Repetitions are interleaved (`harness.run_schedule`); the table gives the median with the
min-max spread, the share of ideal, and the targets beside it.

    python scripts/straggler.py              # ~3 minutes on 2 cores with torch (~1 a repetition)
    python scripts/straggler.py --quick      # smoke run
    python scripts/bench.py --workloads straggler   # the same, from make bench

Output: progress on stderr, the table on stdout, JSON and a PNG plot under ``bench-results/``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

from benchlib.harness import Pipeline, Timing, measure, run_schedule
from benchlib.report import figure_grid, machine, save_figure, warn_if_engine_changed, write_results
from benchlib.workloads import (
    NO_WAIT,
    STRAGGLER_LENGTH,
    STRAGGLER_PATTERNS,
    STRAGGLER_SLEEP_S,
    STRAGGLER_WORKERS,
    StragglerItems,
    straggler_cost,
    straggler_shard,
)

import mpfeed

DEPTH = 4  # elements each worker may have ready ahead: mpfeed's default depth, torch's prefetch_factor
IDEAL_SAMPLE = 20_000  # the mean cost behind `ideal` is taken over elements 0 .. IDEAL_SAMPLE - 1
SLEEP_PROBES = 200  # time.sleep(4 ms) calls timed for the note on its real length
ORDERS = ("ordered", "unordered")
CONTENDERS = ("mpfeed", "torch-dataloader")  # what --contenders chooses among

# The shares of ideal that mpfeed's random-access rows aim at: (pattern, order, row) -> share.
TARGETS = {
    ("half-speed", "ordered", "mpfeed"): 0.90,
    ("half-speed", "unordered", "mpfeed"): 0.95,
    ("lognormal", "ordered", "mpfeed depth=8"): 0.85,
    ("lognormal", "unordered", "mpfeed"): 0.95,
    ("one-in-100", "unordered", "mpfeed"): 0.95,
}


# -- the rows ------------------------------------------------------------------------------------------------


def feeder_pipeline(feeder: mpfeed.Feeder) -> Pipeline:
    def notes() -> dict:
        stats = feeder.stats()
        return {"wait_s": stats.wait_s, "items_per_worker": [w.items for w in stats.workers]}

    return Pipeline(feeder, close=feeder.close, notes=notes)


def mpfeed_random_access(pattern: str, ordered: bool, workers: int, depth: int = DEPTH) -> Pipeline:
    return feeder_pipeline(
        mpfeed.Feeder(StragglerItems(pattern), workers=workers, depth=depth, ordered=ordered)
    )


def mpfeed_generator(pattern: str, ordered: bool, workers: int) -> Pipeline:
    source = functools.partial(straggler_shard, pattern)
    return feeder_pipeline(
        mpfeed.Feeder(source, args=(STRAGGLER_LENGTH,), workers=workers, depth=DEPTH, ordered=ordered)
    )


def torch_dataloader(pattern: str, ordered: bool, workers: int) -> Pipeline:
    """``DataLoader(StragglerItems, batch_size=None, num_workers=N, in_order=ordered)``, ``DEPTH``
    elements in flight per worker, started the way its users get it (fork on Linux)."""
    import torch.utils.data

    with warnings.catch_warnings():  # forked workers inherit these filters
        warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)  # 8 sleepers, 2 cores
        loader = torch.utils.data.DataLoader(
            StragglerItems(pattern),
            batch_size=None,
            num_workers=workers,
            prefetch_factor=DEPTH,
            in_order=ordered,
        )
        iterator = iter(loader)  # starts the workers
    return Pipeline(iterator, close=iterator._shutdown_workers)


@dataclass(frozen=True)
class Row:
    pattern: str
    order: str
    name: str
    contender: str
    build: Callable[[str, bool, int], Pipeline]

    @property
    def key(self) -> str:
        return f"{self.order} {self.name}"

    @property
    def target(self) -> float | None:
        return TARGETS.get((self.pattern, self.order, self.name))


def rows(contenders: tuple[str, ...] = CONTENDERS) -> list[Row]:
    torch = importlib.util.find_spec("torch") is not None
    made = []
    for pattern in STRAGGLER_PATTERNS:
        for order in ORDERS:
            made.append(Row(pattern, order, "mpfeed", "mpfeed", mpfeed_random_access))
            if pattern == "lognormal" and order == "ordered":
                deep = functools.partial(mpfeed_random_access, depth=8)
                made.append(Row(pattern, order, "mpfeed depth=8", "mpfeed", deep))
            made.append(Row(pattern, order, "mpfeed-generator", "mpfeed", mpfeed_generator))
            if torch:
                made.append(Row(pattern, order, "torch-dataloader", "torch-dataloader", torch_dataloader))
    # The ceilings: the same elements at no cost, first ready, through each loader's own machinery.
    made.append(Row(NO_WAIT, "unordered", "mpfeed", "mpfeed", mpfeed_random_access))
    made.append(Row(NO_WAIT, "unordered", "mpfeed-generator", "mpfeed", mpfeed_generator))
    if torch:
        made.append(Row(NO_WAIT, "unordered", "torch-dataloader", "torch-dataloader", torch_dataloader))
    return [row for row in made if row.contender in contenders]


# -- the limits ----------------------------------------------------------------------------------------------


@functools.cache
def mean_cost(pattern: str) -> float:
    """The mean full-speed cost of elements 0 .. IDEAL_SAMPLE - 1 (exact for the two fixed patterns; for
    `lognormal`, the mean of the very draws the workers make, within about 1% of 4 ms)."""
    return statistics.fmean(straggler_cost(pattern, i) for i in range(IDEAL_SAMPLE))


@functools.cache
def window_cost(pattern: str, first: int, end: int) -> float:
    """The mean full-speed cost of elements ``first .. end - 1``: what one window measured. With costs as
    heavy-tailed as `lognormal`, a window of a few thousand elements costs a few percent more or less than
    the long-run mean, and the rate it measured is compared with the ideal for those very elements."""
    return statistics.fmean(straggler_cost(pattern, i) for i in range(first, end))


def ideal(pattern: str, workers: int, window: tuple[int, int] | None = None) -> float | None:
    """The workers' combined rate: the sum over workers of 1 / mean cost (in `half-speed`, one worker's
    mean cost is twice the others'), over the elements of ``window`` when given, else the long-run sample;
    None for the no-wait ceilings."""
    if pattern == NO_WAIT:
        return None
    cost = mean_cost(pattern) if window is None else window_cost(pattern, *window)
    rates = [1 / cost] * workers
    if pattern == "half-speed":
        rates[0] /= 2
    return sum(rates)


def sleep_length(seconds: float = STRAGGLER_SLEEP_S, probes: int = SLEEP_PROBES) -> float:
    """How long ``time.sleep(seconds)`` really lasts here, on average: the kernel's timer slack and the
    wake-up add to every wait, so no loader reaches the nominal ideal exactly."""
    started = time.perf_counter()
    for _ in range(probes):
        time.sleep(seconds)
    return (time.perf_counter() - started) / probes


# -- the run and the report ----------------------------------------------------------------------------------


def schedule(plan: list[Row], workers: int, timing: Timing) -> dict:
    """pattern -> [(row key, thunk)], for `harness.run_schedule`."""
    groups: dict[str, list] = {}
    for row in plan:
        ordered = row.order == "ordered"
        thunk = functools.partial(
            measure, functools.partial(row.build, row.pattern, ordered, workers), timing, workers
        )
        groups.setdefault(row.pattern, []).append((row.key, thunk))
    return groups


def summarize(plan: list[Row], results: dict, workers: int) -> dict:
    summary: dict = {}
    for row in plan:
        limit = ideal(row.pattern, workers)
        entry = summary.setdefault(row.pattern, {"ideal": limit, "rows": {}})
        if limit:
            entry["mean_cost_s"] = mean_cost(row.pattern)
        reps = results.get(row.pattern, {}).get(row.key, [])
        ok = [r for r in reps if "error" not in r]
        out: dict = {"order": row.order, "row": row.name, "reps": len(ok), "target": row.target}
        if not ok:
            out["error"] = reps[0]["error"] if reps else "not run"
        else:
            for key in ("rate", "startup_s", "first_s"):
                values = [r[key] for r in ok]
                out[key] = statistics.median(values)
                out[key + "_min"], out[key + "_max"] = min(values), max(values)
            if limit:  # each repetition against the ideal for the elements its window measured
                shares = [r["rate"] / (ideal(row.pattern, workers, tuple(r["window"])) or limit) for r in ok]
                out["vs_ideal"] = statistics.median(shares)
                out["vs_ideal_min"], out["vs_ideal_max"] = min(shares), max(shares)
            if row.target is not None:
                out["met"] = out["vs_ideal"] >= row.target
            errors = [r["error"] for r in reps if "error" in r]
            if errors:
                out["errors"] = errors
        entry["rows"][row.key] = out
    return summary


def describe_limit(pattern: str, limit: float | None, workers: int) -> str:
    if limit is None:
        return f"{pattern} (ceilings: the same elements at no cost, each loader's own per-element overhead)"
    cost_ms = mean_cost(pattern) * 1e3
    if pattern == "half-speed":
        costs = f"{workers - 1} workers at {cost_ms:.2f} ms, 1 at {2 * cost_ms:.2f} ms"
    else:
        costs = f"{workers} workers at a mean {cost_ms:.3f} ms"
    return f"{pattern} (ideal {limit:,.0f}/s: {costs})"


def table(summary: dict, workers: int) -> str:
    header = (
        f"{'pattern':<11} {'order':<10} {'row':<17} {'elem/s':>7} {'min-max':>12} {'% ideal':>8} "
        f"{'min-max':>8} {'target':>7} {'':<6} {'start s':>7} {'first s':>7}"
    )
    lines = [header, "-" * len(header)]
    for pattern, entry in summary.items():
        lines.append(describe_limit(pattern, entry["ideal"], workers))
        for row in entry["rows"].values():
            lead = f"{'':<11} {row['order']:<10} {row['row']:<17}"
            if "rate" not in row:
                lines.append(f"{lead} error: {row['error'][:70]}")
                continue
            target = f">={row['target']:.0%}" if row["target"] is not None else ""
            verdict = ("met" if row["met"] else "MISSED") if "met" in row else ""
            share = spread = ""
            if "vs_ideal" in row:
                share = f"{row['vs_ideal']:.0%}"
                spread = f"{row['vs_ideal_min'] * 100:.0f}-{row['vs_ideal_max']:.0%}"
            lines.append(
                f"{lead} {row['rate']:>7,.0f} {row['rate_min']:>5,.0f}-{row['rate_max']:<6,.0f} "
                f"{share:>8} {spread:<8} "
                f"{target:>7} {verdict:<6} {row['startup_s']:>7.2f} {row['first_s']:>7.2f}"
                + (f"  ({len(row['errors'])} failed)" if "errors" in row else "")
            )
    return "\n".join(lines)


def plot(summary: dict, path: str, title: str) -> None:
    figure, axes = figure_grid(1, len(summary), (5.2, 3.8))
    for ax, (pattern, entry) in zip(axes.flat, summary.items()):
        measured = {key: row for key, row in entry["rows"].items() if "rate" in row}
        names = list(measured)
        rates = [measured[n]["rate"] for n in names]
        low = [measured[n]["rate"] - measured[n]["rate_min"] for n in names]
        high = [measured[n]["rate_max"] - measured[n]["rate"] for n in names]
        colors = ["tab:orange" if measured[n]["row"].startswith("mpfeed") else "tab:blue" for n in names]
        ax.barh(names, rates, xerr=[low, high], color=colors, capsize=2)
        if entry["ideal"]:
            ax.axvline(entry["ideal"], color="tab:red", linestyle="--", label="ideal")
            ax.legend(loc="lower right", fontsize=7)
        ax.invert_yaxis()
        ax.set_title(pattern, fontsize=10)
        ax.set_xlabel("elements/s (median, min-max)", fontsize=8)
        ax.tick_params(labelsize=7)
    save_figure(figure, title, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows (a smoke run)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    parser.add_argument("--workers", type=int, default=STRAGGLER_WORKERS, help="workers (default 8)")
    parser.add_argument(
        "--contenders", default=",".join(CONTENDERS), help=f"comma-separated, of {', '.join(CONTENDERS)}"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    chosen = tuple(n.strip() for n in args.contenders.split(",") if n.strip())
    unknown = set(chosen) - set(CONTENDERS)
    if unknown:
        raise SystemExit(f"unknown straggler contenders {sorted(unknown)}; choose from {list(CONTENDERS)}")
    timing = Timing(duration_s=0.3, warmup_s=0.1) if args.quick else Timing(duration_s=2.0, warmup_s=0.5)
    plan = rows(chosen)
    if any(row.contender == "torch-dataloader" for row in plan):
        import torch.utils.data  # noqa: F401  (loaded once here, not in the first torch row's start-up)
    info = machine(tensorflow=False)
    if importlib.util.find_spec("torch") is not None:
        info["torch"] = metadata.version("torch")
    info["sleep_4ms_s"] = sleep_length()
    info["load_before"] = os.getloadavg()
    for pattern in STRAGGLER_PATTERNS:
        mean_cost(pattern)  # computed once, before the run
    print(
        f"# straggler: {len(plan)} rows x {args.reps} reps, {args.workers} workers; {info['cpu_model']}, "
        f"{info['usable_cores']} usable cores",
        file=sys.stderr,
    )
    started = time.perf_counter()
    results: dict = {}
    durations = run_schedule(schedule(plan, args.workers, timing), args.reps, results, desc="straggler")
    warn_if_engine_changed(info)
    info["load_after"] = os.getloadavg()
    summary = summarize(plan, results, args.workers)

    document = {
        "machine": info,
        "options": vars(args),
        "timing": vars(timing),
        "rep_s": durations,
        "summary": summary,
        "raw": results,
    }
    base = write_results("straggler", document)
    title = f"mpfeed straggler: {info['cpu_model']}, {info['usable_cores']} cores, {args.workers} workers"
    plot(summary, str(base.with_suffix(".png")), title)

    engine = f"{info['mpfeed_commit']}{' (modified)' if info['mpfeed_modified'] else ''}"
    print(f"# {info['cpu_model']}, {info['usable_cores']} usable cores, {info['date']}")
    print(f"# mpfeed {engine} from {info['mpfeed_path']}; torch {info.get('torch', 'not installed')}")
    print(f"# python {' '.join(sys.argv)}   ({time.perf_counter() - started:.0f} s)")
    print(
        f"# {args.reps} interleaved reps of {len(plan)} rows, {statistics.fmean(durations):.0f} s each "
        f"({', '.join(f'{d:.0f}' for d in durations)} s); window {timing.duration_s} s after "
        f"{timing.warmup_s} s of warm-up; consumed by a Python loop, no TensorFlow"
    )
    print(
        f"# load average (1, 5, 15 min) {'/'.join(f'{x:.1f}' for x in info['load_before'])} before, "
        f"{'/'.join(f'{x:.1f}' for x in info['load_after'])} after: other work on the machine slows the waits"
    )
    print(
        f"# time.sleep({STRAGGLER_SLEEP_S * 1e3:.0f} ms) lasts {info['sleep_4ms_s'] * 1e3:.3f} ms here: "
        f"the most any loader can reach is about {STRAGGLER_SLEEP_S / info['sleep_4ms_s']:.0%} of ideal"
    )
    print(table(summary, args.workers))
    print(f"\nresults: {base}.json, {base}.png")


if __name__ == "__main__":
    main()
