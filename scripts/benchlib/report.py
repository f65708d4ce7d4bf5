"""The report: medians, spreads and ratios of a run, the table on stdout, the machine and the mpfeed that
ran, and the JSON and PNG plot under ``bench-results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

import mpfeed

from .harness import usable_cores
from .limits import LIMIT_ROWS, limit_of
from .plan import Plan
from .workloads import element_bytes

RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench-results"


def summarize(plan: Plan) -> dict:
    """Median and spread of every row, the limit of every workload, and the ratios."""
    cores = usable_cores()
    summary = {}
    for workload in plan.workloads:
        measured = plan.results.get(workload.name, {})
        rows: dict[str, dict] = {}
        for name, reps in measured.items():
            ok = [r for r in reps if "error" not in r]
            if not ok:
                rows[name] = {"error": reps[0]["error"]}
                continue
            row = {"reps": len(ok)}
            for key in ("rate", "startup_s", "first_s"):
                values = [r[key] for r in ok if key in r]
                if values:
                    row[key] = statistics.median(values)
                    row[key + "_min"], row[key + "_max"] = min(values), max(values)
            consumed = {r["consumed"] for r in ok if "consumed" in r}
            if consumed:
                row["consumed"] = ", ".join(sorted(consumed))
            errors = [r["error"] for r in reps if "error" in r]
            if errors:
                row["errors"] = errors
            rows[name] = row
        limit_name, limit = limit_of(workload, rows, plan.workers[workload.name], cores)
        if workload.limit in ("ideal-io", "ideal-cpu") and limit:
            rows["ideal"] = {"rate": limit}
        contenders = [
            row["rate"]
            for name, row in rows.items()
            if "rate" in row and not name.startswith("mpfeed") and name not in LIMIT_ROWS
        ]
        best = max(contenders) if contenders else None
        for name, row in rows.items():
            if "rate" in row and name not in LIMIT_ROWS:
                row["vs_best"] = row["rate"] / best if best else None
                row["vs_limit"] = row["rate"] / limit if limit else None
        summary[workload.name] = {
            "workers": plan.workers[workload.name],
            "limit": limit_name,
            "limit_rate": limit,
            "best_other_rate": best,
            "element_bytes": element_bytes(workload),
            "rows": rows,
        }
    return summary


ROW_ORDER = [
    "from_generator",
    "thread-queue",
    "tf-map",
    "keras-pydataset",
    "mp-pool",
    "torch-dataloader",
    "grain",
]


def ordered_rows(rows: dict) -> list[str]:
    first = [n for n in ROW_ORDER if n in rows]
    mine = sorted(n for n in rows if n.startswith("mpfeed"))
    limits = [
        n
        for n in ("ideal", "one-core", "memcpy", "memcpy-preallocated", "from_generator-ceiling")
        if n in rows
    ]
    return first + mine + limits + [n for n in rows if n not in first + mine + limits]


def table(summary: dict) -> str:
    header = (
        f"{'workload':<15} {'row':<23} {'elem/s':>10} {'min-max':>19} {'MB/s':>8} "
        f"{'start s':>8} {'first s':>8} {'x best':>7} {'vs limit':>8} consumed"
    )
    lines = [header, "-" * len(header)]
    for name, entry in summary.items():
        limit = entry["limit_rate"]
        limit_text = f"{limit:,.0f}/s" if limit else "n/a"
        lines.append(f"{name} ({entry['workers']} workers; limit: {entry['limit']} = {limit_text})")
        for row_name in ordered_rows(entry["rows"]):
            row = entry["rows"][row_name]
            if "rate" not in row:
                lines.append(f"{'':<15} {row_name:<23} error: {row.get('error', '?')[:70]}")
                continue
            spread = f"{row['rate_min']:,.0f}-{row['rate_max']:,.0f}" if "rate_min" in row else ""
            mbs = row["rate"] * entry["element_bytes"] / 1e6
            lines.append(
                f"{'':<15} {row_name:<23} {row['rate']:>10,.0f} {spread:>19} {mbs:>8,.0f} "
                f"{_num(row.get('startup_s'), 3):>8} {_num(row.get('first_s'), 3):>8} "
                f"{_num(row.get('vs_best'), 2, 'x'):>7} {_num(row.get('vs_limit'), 0, '%', 100):>8} "
                f"{row.get('consumed', '')}".rstrip()
            )
    return "\n".join(lines)


def _num(value: float | None, digits: int, suffix: str = "", scale: float = 1) -> str:
    return "" if value is None else f"{value * scale:.{digits}f}{suffix}"


def machine(tensorflow: bool = True) -> dict:
    """The machine, the versions and the mpfeed that ran; ``tensorflow=False`` leaves TensorFlow, Keras
    and Pillow unimported and unreported (a run without them: `straggler`)."""
    model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    frameworks = {}
    if tensorflow:
        import PIL
        import tensorflow as tf

        frameworks = {
            "tensorflow": tf.__version__,
            "keras": metadata.version("keras"),
            "pillow": PIL.__version__,
        }
    return {
        "usable_cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        **frameworks,
        "mpfeed": mpfeed.__version__,
        **engine_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def engine_version() -> dict:
    """Which mpfeed ran: where it was imported from, its git commit, and a digest of its sources."""
    package = Path(mpfeed.__file__).resolve().parent
    sources = b"".join(path.read_bytes() for path in sorted(package.glob("*.py")))

    def git(*args: str) -> str | None:
        done = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    return {
        "mpfeed_path": str(package),
        "mpfeed_commit": commit,
        "mpfeed_modified": bool(git("status", "--porcelain", "--", ".")) if commit else None,
        "mpfeed_sources_sha256": hashlib.sha256(sources).hexdigest()[:16],
    }


def warn_if_engine_changed(info: dict) -> None:
    """Note in ``info``, and say, when mpfeed's sources changed since ``info`` was taken."""
    now = engine_version()
    if now["mpfeed_sources_sha256"] != info["mpfeed_sources_sha256"]:
        info["warning"] = "mpfeed's sources changed during the run: figures may mix two versions"
        print(f"WARNING: {info['warning']}", file=sys.stderr)


def figure_grid(rows: int, columns: int, cell: tuple[float, float]) -> tuple[Any, Any]:
    """A headless matplotlib figure and its axes, always rows x columns, each ``cell`` inches (w, h)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, columns, figsize=(cell[0] * columns, cell[1] * rows), squeeze=False)


def save_figure(figure: Any, title: str, path: Path) -> None:
    """Title the figure, write it as a PNG and free it."""
    import matplotlib.pyplot as plt

    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot(summary: dict, path: Path, title: str) -> None:
    count = len(summary)
    columns = min(3, count)
    rows = -(-count // columns)
    figure, axes = figure_grid(rows, columns, (5.2, 3.6))
    for ax, (name, entry) in zip(axes.flat, summary.items()):
        names = [n for n in ordered_rows(entry["rows"]) if "rate_min" in entry["rows"][n]]
        rates = [entry["rows"][n]["rate"] for n in names]
        low = [entry["rows"][n]["rate"] - entry["rows"][n]["rate_min"] for n in names]
        high = [entry["rows"][n]["rate_max"] - entry["rows"][n]["rate"] for n in names]
        colors = [
            "tab:orange" if n.startswith("mpfeed") else "tab:gray" if n in LIMIT_ROWS else "tab:blue"
            for n in names
        ]
        ax.barh(names, rates, xerr=[low, high], color=colors, capsize=2)
        if rates and max(rates) > 50 * min(rates):
            ax.set_xscale("log")
        if entry["limit_rate"]:
            ax.axvline(entry["limit_rate"], color="tab:red", linestyle="--", label=entry["limit"])
            ax.legend(loc="best", fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{name} ({entry['workers']} workers)", fontsize=10)
        ax.set_xlabel("elements/s (median, min-max)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    save_figure(figure, title, path)


def plot_scaling(summary: dict, path: Path, title: str) -> None:
    """Rate and efficiency against the worker (or actor) count, one column per workload: `make scale`'s
    and `make scale-ray`'s figure."""
    columns = len(summary)
    figure, axes = figure_grid(2, columns, (5, 3.5))
    for column, (name, entry) in enumerate(summary.items()):
        counts = list(entry["ideal"])
        top, bottom = axes[0][column], axes[1][column]
        top.plot(counts, [entry["ideal"][c] for c in counts], "k--", label="ideal")
        for contender, cells in entry["rows"].items():
            xs = [c for c in counts if c in cells]
            style = "o-" if contender.startswith("mpfeed") else ".-"
            top.plot(xs, [cells[c]["rate"] for c in xs], style, label=contender)
            bottom.plot(xs, [100 * (cells[c]["efficiency"] or 0) for c in xs], style, label=contender)
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(counts, [str(c) for c in counts])
            ax.set_xlabel("workers")
            ax.grid(alpha=0.3)
        top.set_yscale("log")
        top.set_title(name)
        top.set_ylabel("elements/s")
        bottom.set_ylabel("% of ideal")
        bottom.set_ylim(0, 110)
        top.legend(fontsize=7)
    save_figure(figure, title, path)


def write_results(prefix: str, document: dict, default: Callable[[Any], Any] = str) -> Path:
    """Write a run's JSON under bench-results/ as ``<prefix>-<date>-<time>.json``, with the command that
    made it; returns the path without its suffix, for the plot beside it."""
    RESULTS_DIR.mkdir(exist_ok=True)
    base = RESULTS_DIR / f"{prefix}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    document = {"command": " ".join(sys.argv), **document}
    base.with_suffix(".json").write_text(json.dumps(document, indent=1, default=default))
    return base


def save(plan: Plan, summary: dict, info: dict, args: argparse.Namespace, prefix: str = "bench") -> Path:
    document = {
        "machine": info,
        "options": vars(args),
        "timing": vars(plan.timing),
        "summary": summary,
        "raw": plan.results,
    }
    base = write_results(prefix, document)
    title = f"mpfeed bench: {info['cpu_model']}, {info['usable_cores']} cores, TF {info['tensorflow']}"
    plot(summary, base.with_suffix(".png"), title)
    return base
