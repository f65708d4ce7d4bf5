"""The `autotune` workload of docs/benchmarks.md: ``workers="auto"`` against fixed worker counts, in one run.

Every row is `mpfeed.Feeder` over a random-access source (`workloads.AutotuneItems`: ``workers="auto"``
adjusts only those), iterated directly by a Python loop that touches every element (no TensorFlow).
Three groups:

- ``io``: each element sleeps 10 ms (224x224x3 uint8 + int64 label). ``auto`` (``max_workers`` left at
  its default, 32 here) against fixed 8, 16 and 32. Target: auto >= 85% of the best fixed count.
- ``python``: ~5 ms of GIL-holding pure Python per element (the same element). ``auto`` against
  ``workers=2`` (1 and 3 for context). Targets: auto >= 90% of 2 workers, and auto never more than
  usable cores + 1 workers.
- ``consumer-bound``: the consumer sleeps 20 ms after each element; the source costs 1 ms of CPU.
  Target: auto ends with <= 2 active workers; its rate is reported against fixed 2.

Fixed rows are measured by `harness.measure` (start-up, time to first element, and the rate over a
window after a warm-up). An ``auto`` row is measured by `measure_auto`: the window opens once the worker
count has settled, that is once it has not changed for ``quiet_s`` (8 s: longer than the longest pause the
policy takes between two steps of one search, the 5 s rest after an undone trial plus the two intervals
that judge a trial), or 20 s after the feeder started, whichever comes first, and the window lasts as
long as a fixed row's. Its settle time is the last change's ``at_s``, window included; a change during
the window shows in the table. Repetitions are interleaved (`harness.run_schedule`); the table gives
medians with the min-max spread, the ratio of medians against the reference row, and the per-repetition
ratios (each auto run against the reference run of the same repetition) as its spread.

    python scripts/autotune_bench.py            # ~4 minutes on 2 cores (84 s a repetition)
    python scripts/autotune_bench.py --quick    # smoke run: 1 repetition, short windows, 4 s cap
    python scripts/bench.py --workloads autotune   # the same, from make bench

Output: progress on stderr, the table on stdout, JSON and a PNG plot under ``bench-results/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from benchlib.harness import Pipeline, Timing, measure, run_schedule, touch, usable_cores
from benchlib.report import figure_grid, machine, save_figure, warn_if_engine_changed, write_results
from benchlib.workloads import CHEAP_COST_S, IO_SLEEP_S, AutotuneItems

import mpfeed

AUTO = "auto"
CONSUMER_SLEEP_S = {"consumer-bound": 0.020}  # the consumer's own work per element, by group
FIXED = {"io": (8, 16, 32), "python": (1, 2, 3), "consumer-bound": (2,)}
REFERENCE = {"io": None, "python": 2, "consumer-bound": 2}  # None: the best fixed count (by median rate)
TARGET_SHARE = {"io": 0.85, "python": 0.90}  # auto's rate over the reference's, at least
CONSUMER_BOUND_MAX_ACTIVE = 2  # consumer-bound: auto's final active count, at most
CHECK_S = 0.1  # how often measure_auto reads the feeder's stats before its window opens
DESCRIBE = {
    "io": f"each element sleeps {IO_SLEEP_S * 1e3:.0f} ms; 224x224x3 uint8 + int64 label",
    "python": "~5 ms of GIL-holding Python per element; as io's element",
    "consumer-bound": (
        f"the consumer sleeps {CONSUMER_SLEEP_S['consumer-bound'] * 1e3:.0f} ms per element, the source "
        f"costs {CHEAP_COST_S * 1e3:.0f} ms of CPU; as io's element"
    ),
}


@dataclass(frozen=True)
class AutoTiming:
    window_s: float  # the steady-state window, once open
    quiet_s: float  # the count has not changed for this long: settled, the window opens
    cap_s: float  # the window opens this long after the feeder started, settled or not


FULL = (Timing(duration_s=3.0, warmup_s=2.0), AutoTiming(window_s=3.0, quiet_s=8.0, cap_s=20.0))
QUICK = (Timing(duration_s=0.5, warmup_s=0.3), AutoTiming(window_s=0.5, quiet_s=2.0, cap_s=4.0))


# -- the rows ------------------------------------------------------------------------------------------------


def consumer(feeder: mpfeed.Feeder, sleep_s: float) -> Iterator:
    """The feeder's elements, with the consumer's own work (a sleep) after each: the time between two
    calls for elements, which the feeder counts as the training step."""
    for element in feeder:
        yield element
        time.sleep(sleep_s)


def fixed_pipeline(group: str, workers: int) -> Pipeline:
    feeder = mpfeed.Feeder(AutotuneItems(group), workers=workers)
    sleep_s = CONSUMER_SLEEP_S.get(group)

    def notes() -> dict:
        stats = feeder.stats()
        return {"active_workers": stats.active_workers, "wait_fraction": stats.recent_wait_fraction}

    return Pipeline(consumer(feeder, sleep_s) if sleep_s else feeder, close=feeder.close, notes=notes)


def measure_auto(group: str, timing: AutoTiming) -> dict:
    """Start-up, time to first element and the rate of ``Feeder(..., workers="auto")`` over a window that
    opens once the worker count has settled (no change for ``timing.quiet_s``) or ``timing.cap_s`` after
    the feeder started (both on `FeederStats.elapsed_s`'s clock), with the tuner's changes."""
    sleep_s = CONSUMER_SLEEP_S.get(group, 0.0)
    started = time.perf_counter()
    feeder = mpfeed.Feeder(AutotuneItems(group), workers=AUTO)
    built = time.perf_counter()
    try:
        initial = feeder.stats().active_workers
        iterator = iter(feeder)
        count = touch(next(iterator), False)
        first = time.perf_counter()
        if sleep_s:
            time.sleep(sleep_s)
        window_start, window_count, opened_at_s, opened_by = None, 0, 0.0, ""
        next_check = now = first
        for element in iterator:
            count += touch(element, False)
            if sleep_s:
                time.sleep(sleep_s)
            now = time.perf_counter()
            if window_start is None:
                if now < next_check:
                    continue
                next_check = now + CHECK_S
                stats = feeder.stats()
                last = stats.worker_changes[-1].at_s if stats.worker_changes else 0.0
                if stats.elapsed_s - last >= timing.quiet_s:
                    opened_by = "settled"
                elif stats.elapsed_s >= timing.cap_s:
                    opened_by = "cap"
                if opened_by:
                    window_start, window_count, opened_at_s = now, count, stats.elapsed_s
            elif now - window_start >= timing.window_s:
                break
        if window_start is None:
            raise RuntimeError(f"the pipeline ended after {count} elements, before the window opened")
        rate = (count - window_count) / (now - window_start)
        del iterator
        stats = feeder.stats()
    finally:
        feeder.close()
    changes = [dataclasses.asdict(change) for change in stats.worker_changes]
    return {
        "rate": rate,
        "startup_s": built - started,
        "first_s": first - started,
        "elements": count,
        "consumed": "python loop",
        "initial_workers": initial,
        "final_workers": stats.active_workers,
        "max_workers_seen": max([initial, *(c["after"] for c in changes)]),
        "settle_s": changes[-1]["at_s"] if changes else 0.0,
        "window_opened_s": opened_at_s,
        "window_opened_by": opened_by,
        "changes_in_window": sum(c["at_s"] > opened_at_s for c in changes),
        "changes": changes,
        "wait_fraction": stats.recent_wait_fraction,
    }


def row_name(workers: int | str) -> str:
    return AUTO if workers == AUTO else f"fixed {workers}"


def schedule(groups: list[str], timing: Timing, auto_timing: AutoTiming) -> dict:
    """group -> [(row name, thunk)], for `harness.run_schedule`."""
    made: dict[str, list[tuple[str, Callable[[], dict]]]] = {}
    for group in groups:
        rows = made.setdefault(group, [])
        rows.append((AUTO, functools.partial(measure_auto, group, auto_timing)))
        for workers in FIXED[group]:
            build = functools.partial(fixed_pipeline, group, workers)
            rows.append((row_name(workers), functools.partial(measure, build, timing, workers)))
    return made


# -- the report ----------------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(groups: list[str], results: dict, cores: int) -> dict:
    summary: dict = {}
    for group in groups:
        measured = results.get(group, {})
        rows: dict = {}
        for name in [AUTO, *(row_name(w) for w in FIXED[group])]:
            reps = measured.get(name, [])
            ok = [r for r in reps if "error" not in r]
            row: dict = {"reps": len(ok)}
            if not ok:
                row["error"] = reps[0]["error"] if reps else "not run"
                rows[name] = row
                continue
            for key in ("rate", "startup_s", "first_s"):
                stats = spread([r[key] for r in ok])
                row[key], row[key + "_min"], row[key + "_max"] = stats["median"], stats["min"], stats["max"]
            if name == AUTO:
                row["settle_s"] = spread([r["settle_s"] for r in ok])
                for key in ("final_workers", "max_workers_seen", "window_opened_by", "changes_in_window"):
                    row[key] = [r[key] for r in ok]
                row["changes"] = [len(r["changes"]) for r in ok]
            errors = [r["error"] for r in reps if "error" in r]
            if errors:
                row["errors"] = errors
            rows[name] = row
        fixed = {n: r for n, r in rows.items() if n != AUTO and "rate" in r}
        if REFERENCE[group] is None:
            reference = max(fixed, key=lambda n: fixed[n]["rate"]) if fixed else None
        else:
            reference = row_name(REFERENCE[group])
        entry: dict = {"what": DESCRIBE[group], "reference": reference, "rows": rows}
        auto = rows[AUTO]
        if reference in fixed and "rate" in auto:
            entry["vs_reference"] = auto["rate"] / fixed[reference]["rate"]
            paired = [
                a["rate"] / b["rate"]
                for a, b in zip(measured.get(AUTO, []), measured.get(reference, []))
                if "rate" in a and "rate" in b
            ]
            if paired:
                entry["vs_reference_paired"] = spread(paired)
        verdicts = {}
        if group in TARGET_SHARE and "vs_reference" in entry:
            verdicts[f"auto >= {TARGET_SHARE[group]:.0%} of {reference}"] = (
                entry["vs_reference"] >= TARGET_SHARE[group]
            )
        if group == "python" and "max_workers_seen" in auto:
            verdicts[f"auto never above cores + 1 = {cores + 1}"] = max(auto["max_workers_seen"]) <= cores + 1
        if group == "consumer-bound" and "final_workers" in auto:
            verdicts[f"auto settles at <= {CONSUMER_BOUND_MAX_ACTIVE} workers"] = (
                max(auto["final_workers"]) <= CONSUMER_BOUND_MAX_ACTIVE
            )
        entry["targets"] = verdicts
        summary[group] = entry
    return summary


def table(summary: dict) -> str:
    header = (
        f"{'group':<15} {'row':<9} {'elem/s':>7} {'min-max':>13} {'vs ref':>7} {'min-max':>9} "
        f"{'settle s':>8} {'min-max':>10} {'active':>9} {'max':>3} {'changes':>8} {'window':>23} "
        f"{'start s':>7} {'first s':>7}"
    )
    lines = [header, "-" * len(header)]
    for group, entry in summary.items():
        lines.append(f"{group} ({entry['what']}; reference: {entry['reference']})")
        for name, row in entry["rows"].items():
            lead = f"{'':<15} {name:<9}"
            if "rate" not in row:
                lines.append(f"{lead} error: {row['error'][:80]}")
                continue
            text = f"{lead} {row['rate']:>7,.0f} {row['rate_min']:>6,.0f}-{row['rate_max']:<6,.0f}"
            if name == AUTO:
                ratio = f"{entry['vs_reference']:.0%}" if "vs_reference" in entry else ""
                paired = entry.get("vs_reference_paired")
                paired_text = f"{paired['min'] * 100:.0f}-{paired['max']:.0%}" if paired else ""
                settle = row["settle_s"]
                text += (
                    f" {ratio:>7} {paired_text:>9} {settle['median']:>8.1f} "
                    f"{settle['min']:>4.1f}-{settle['max']:<5.1f} "
                    f"{'/'.join(map(str, row['final_workers'])):>9} {max(row['max_workers_seen']):>3} "
                    f"{'/'.join(map(str, row['changes'])):>8} "
                    f"{'/'.join(row['window_opened_by']):>23}"
                )
            else:
                text += f" {'':>7} {'':>9} {'':>8} {'':>10} {'':>9} {'':>3} {'':>8} {'':>23}"
            text += f" {row['startup_s']:>7.2f} {row['first_s']:>7.2f}"
            if "errors" in row:
                text += f"  ({len(row['errors'])} failed)"
            lines.append(text)
        for what, met in entry["targets"].items():
            lines.append(f"{'':<15} target: {what}: {'met' if met else 'MISSED'}")
    return "\n".join(lines)


def describe_changes(results: dict) -> str:
    """Every auto run's changes: ``before->after @ at_s``, an undone trial marked ``(undone)``."""
    lines = []
    for group, measured in results.items():
        for rep, run in enumerate(measured.get(AUTO, []), 1):
            if "error" in run:
                lines.append(f"{group} rep {rep}: error: {run['error'][:80]}")
                continue
            steps = [
                f"{c['before']}->{c['after']} @{c['at_s']:.1f}"
                + (" (undone)" if c["reason"].startswith("undone") else "")
                for c in run["changes"]
            ]
            lines.append(
                f"{group} rep {rep}: {', '.join(steps) or 'no change'}; window from "
                f"{run['window_opened_s']:.1f} s ({run['window_opened_by']}), "
                f"{run['changes_in_window']} change(s) in it; final {run['final_workers']}"
            )
    return "\n".join(lines)


def plot(summary: dict, results: dict, path: str, title: str) -> None:
    count = len(summary)
    figure, axes = figure_grid(2, count, (5.0, 3.3))
    from matplotlib.ticker import MaxNLocator

    for column, (group, entry) in enumerate(summary.items()):
        ax = axes[0][column]
        measured = {n: r for n, r in entry["rows"].items() if "rate" in r}
        names = list(measured)
        rates = [measured[n]["rate"] for n in names]
        low = [measured[n]["rate"] - measured[n]["rate_min"] for n in names]
        high = [measured[n]["rate_max"] - measured[n]["rate"] for n in names]
        colors = ["tab:orange" if n == AUTO else "tab:blue" for n in names]
        ax.barh(names, rates, xerr=[low, high], color=colors, capsize=2)
        ax.invert_yaxis()
        ax.set_title(group, fontsize=10)
        ax.set_xlabel("elements/s (median, min-max)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax = axes[1][column]
        for rep, run in enumerate(results.get(group, {}).get(AUTO, []), 1):
            if "error" in run:
                continue
            times = [0.0] + [c["at_s"] for c in run["changes"]] + [run["window_opened_s"]]
            counts = [run["initial_workers"]] + [c["after"] for c in run["changes"]]
            counts.append(counts[-1])
            ax.step(times, counts, where="post", label=f"rep {rep}")
            ax.axvline(run["window_opened_s"], color="tab:gray", linestyle=":", linewidth=0.8)
        ax.set_xlabel("seconds since the feeder started (dotted: window opens)", fontsize=8)
        ax.set_ylabel("active workers (auto)", fontsize=8)
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    save_figure(figure, title, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows, a 4 s cap and 1 repetition")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3; 1 quick)")
    parser.add_argument(
        "--groups", default=",".join(FIXED), help=f"comma-separated, of {', '.join(FIXED)} (default: all)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = set(groups) - set(FIXED)
    if unknown:
        raise SystemExit(f"unknown autotune groups {sorted(unknown)}; choose from {list(FIXED)}")
    reps = args.reps or (1 if args.quick else 3)
    timing, auto_timing = QUICK if args.quick else FULL
    cores = usable_cores()
    info = machine(tensorflow=False)
    info["load_before"] = os.getloadavg()
    plan = schedule(groups, timing, auto_timing)
    print(
        f"# autotune: {sum(map(len, plan.values()))} rows x {reps} reps; {info['cpu_model']}, "
        f"{cores} usable cores",
        file=sys.stderr,
    )
    started = time.perf_counter()
    results: dict = {}
    durations = run_schedule(plan, reps, results, desc="autotune")
    warn_if_engine_changed(info)
    info["load_after"] = os.getloadavg()
    summary = summarize(groups, results, cores)

    document = {
        "machine": info,
        "options": vars(args),
        "timing": vars(timing),
        "auto_timing": vars(auto_timing),
        "rep_s": durations,
        "summary": summary,
        "raw": results,
    }
    base = write_results("autotune", document)
    title = f"mpfeed workers='auto': {info['cpu_model']}, {cores} cores"
    plot(summary, results, str(base.with_suffix(".png")), title)

    engine = f"{info['mpfeed_commit']}{' (modified)' if info['mpfeed_modified'] else ''}"
    print(f"# {info['cpu_model']}, {cores} usable cores, {info['date']}")
    print(f"# mpfeed {engine} from {info['mpfeed_path']}, sources {info['mpfeed_sources_sha256']}")
    print(f"# python {' '.join(sys.argv)}   ({time.perf_counter() - started:.0f} s)")
    print(
        f"# {reps} interleaved reps, {statistics.fmean(durations):.0f} s each "
        f"({', '.join(f'{d:.0f}' for d in durations)} s); fixed rows: window {timing.duration_s} s after "
        f"{timing.warmup_s} s of warm-up; auto rows: window {auto_timing.window_s} s, opened once the count "
        f"has not changed for {auto_timing.quiet_s} s (settled) or at {auto_timing.cap_s} s (cap); "
        "consumed by a Python loop, no TensorFlow"
    )
    print(
        f"# load average (1, 5, 15 min) {'/'.join(f'{x:.1f}' for x in info['load_before'])} before, "
        f"{'/'.join(f'{x:.1f}' for x in info['load_after'])} after"
    )
    print(
        "# vs ref: auto's median over the reference's (min-max: auto over the reference in the same "
        "repetition); settle s: the last change's at_s; active: the final count per repetition; max: the "
        "most active workers seen; window: what opened it per repetition"
    )
    if args.quick:
        print(
            f"# --quick: a smoke run; auto rows get {auto_timing.cap_s} s, not 20, to settle, so the targets "
            "below say nothing about the policy"
        )
    print(table(summary))
    print()
    print(describe_changes(results))
    print(f"\nresults: {base}.json, {base}.png")


if __name__ == "__main__":
    main()
