"""The figures other pages quote, rendered from the data `make results` stores in docs/results-data/.

A page quotes measured figures only inside a block that this module writes:

    <!-- make results: headline -->
    ...
    <!-- /make results -->

`scripts/results.py` fills every block of README.md and docs/*.md after a full run (and alone with
``--render``); the suite checks that each block is what its stored data renders, so no figure outside
docs/results.md is copied by hand. Only the standard library: it runs without the benchmark's imports.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

BLOCK = re.compile(r"(<!-- make results: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /make results -->)", re.S)

# The workloads of the headline table, in its order, each with what one element costs (docs/benchmarks.md).
HEADLINE = {
    "python": "~5 ms of Python holding the GIL",
    "decode": "a JPEG decoded and resized",
    "decode-batched": "the same, 64 to a batch",
    "io": "a 10 ms wait",
    "tiny": "10 floats, no work (mpfeed with `batch_size=256`)",
}
MPFEED_ROW = {"tiny": "mpfeed-b256"}  # the mpfeed row each workload's table shows; else `mpfeed`
LOADERS = {
    "from_generator": "`from_generator`",
    "thread-queue": "a thread and a queue",
    "tf-map": "tf.data `map`",
    "keras-pydataset": "Keras `PyDataset`",
    "mp-pool": "`multiprocessing.Pool`",
    "torch-dataloader": "PyTorch `DataLoader`",
    "grain": "Grain",
}
TIE = 0.99  # loaders within 1% of the best are named beside it: a repetition's noise is larger


class ResultsDataError(Exception):
    """The stored data lacks what a block quotes: run `make results` (or the step that makes it)."""


def load(data: Path, name: str) -> dict:
    path = data / f"{name}.json"
    if not path.exists():
        raise ResultsDataError(f"{path} is missing: `make results` writes it (step `{name}`)")
    return json.loads(path.read_text())


def provenance(document: dict) -> str:
    """`commit 94e2728, 2026-12-05`: the commit measured (marked when its files were modified) and the day."""
    machine = document["machine"]
    modified = " with uncommitted changes" if machine.get("mpfeed_modified") else ""
    return f"commit {machine['mpfeed_commit']}{modified}, {machine['date'][:10]}"


def where(document: dict) -> str:
    machine = document["machine"]
    cores, model = machine["usable_cores"], machine["cpu_model"]
    return f"a {cores}-core {model} machine (TensorFlow {machine['tensorflow']})"


def rate(value: float) -> str:
    return f"{value:,.0f}"


def headline(data: Path) -> str:
    """The README's table: per workload, `from_generator`, the best other loader, mpfeed through
    `dataset()` and this machine's limit, from `make bench`'s summary."""
    bench = load(data, "bench")
    summary = bench["summary"]
    failed = sorted(
        {
            LOADERS.get(name, name)
            for workload in summary.values()
            for name, row in workload["rows"].items()
            if "error" in row and name in LOADERS
        }
    )
    reps = max(row.get("reps", 0) for w in summary.values() for row in w["rows"].values())
    lines = [
        f"Elements per second on {where(bench)}, each figure the median of {reps} interleaved "
        f"repetitions of `make bench` at {provenance(bench)}, written here by `make results` "
        "([docs/results.md](docs/results.md) holds every row, with its spread)."
        + (f" {', '.join(failed)} failed in this run: see its rows there." if failed else ""),
        "",
        "| workload: what one element costs | workers | `from_generator` | best other loader "
        "| mpfeed `dataset()` | of this machine's limit |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, costs in HEADLINE.items():
        if name not in summary:
            raise ResultsDataError(f"`make bench` stored no `{name}` workload")
        workload = summary[name]
        rows = workload["rows"]
        others = {n: rows[n]["rate"] for n in LOADERS if n != "from_generator" and "rate" in rows.get(n, {})}
        best = max(others.values())
        tied = ", ".join(
            LOADERS[n] for n, r in sorted(others.items(), key=lambda kv: -kv[1]) if r >= TIE * best
        )
        mpfeed = rows[MPFEED_ROW.get(name, "mpfeed")]["rate"]
        limit = workload["limit_rate"] if workload["limit"] == "ideal" else None
        share = f"{mpfeed / limit:.0%} of {rate(limit)}" if limit else ""
        lines.append(
            f"| `{name}`: {costs} | {workload['workers']} | {rate(rows['from_generator']['rate'])} "
            f"| {rate(best)} ({tied}) | {rate(mpfeed)} | {share} |"
        )
    return "\n".join(lines)


def decode_once(data: Path) -> str:
    """The README's paragraph on the cache: epoch 2 with and without it, and the curve."""
    cached, curve = load(data, "decode-cached"), load(data, "decode-cached-curve")
    rows = {name: row["median"] for name, row in cached["summary"]["rows"].items()}
    points = curve["curve"]["points"]
    by_fraction = ", ".join(rate(p["median"]) for p in points)
    fractions = ", ".join(f"{p['fraction']:.0%}" for p in points)
    return (
        f"**Decode once** (`cache_bytes`, [docs/cache.md](docs/cache.md)): {cached['elements']:,} JPEGs "
        f"decoded in `load(i)`, cropped and flipped in `augment`, {cached['workers']} workers, through "
        f"`dataset()` (`make bench`'s `decode-cached` rows, {provenance(cached)}): epoch 2 ran at "
        f"{rate(rows['epoch 2, no cache'])}/s without a cache, "
        f"{rate(rows['epoch 2, cache holds all'])}/s with one that holds everything "
        f"({rows['epoch 2, cache holds all'] / rows['epoch 2, no cache']:.1f}x; the augment-only ceiling "
        f"is {rate(rows['augment-only ceiling'])}/s, tf.data's `map(decode).cache().map(augment)` "
        f"{rate(rows['tf.data cache(), epoch 2'])}/s) and {rate(rows['epoch 2, cache holds half'])}/s with "
        f"one that holds half (the model `1 / (0.5 load + augment)` says "
        f"{rate(cached['summary']['model_half'])}/s). Epoch 2 against `cache_bytes` (`make scale`, "
        f"{provenance(curve)}): {by_fraction}/s for a cache of {fractions} of the data set. The "
        "cache's memory, its PSS summed over every process, over its budget: "
        + ", ".join(f"{m['cache_pss'] / m['cache_bytes']:.3f} with {m['workers']}" for m in cached["memory"])
        + " workers."
    )


CACHE_ROWS = {  # decode_cached.py's row names, as docs/cache.md's table words them
    "epoch 1, no cache": "epoch 1, no cache",
    "epoch 2, no cache": "epoch 2, no cache",
    "epoch 1, cache holds all": "epoch 1, cache holds all (filling it)",
    "epoch 2, cache holds all": "**epoch 2, cache holds all**",
    "epoch 3, cache holds all": "epoch 3, cache holds all",
    "epoch 2, cache holds half": "epoch 2, cache holds half",
    "tf.data cache(), epoch 2": "tf.data `map(decode).cache().map(augment)`, epoch 2",
    "augment-only ceiling": "augment-only ceiling",
}


def mib(size: float) -> str:
    return f"{size / 2**20:,.1f} MiB"


def table(header: Iterable[str], align: str, rows: Iterable[Iterable[str]]) -> list[str]:
    """A Markdown table; ``align`` gives each column's alignment, ``l`` or ``r``."""
    rule = ["---" if a == "l" else "---:" for a in align]
    return ["| " + " | ".join(cells) + " |" for cells in (list(header), rule, *map(list, rows))]


def cache_measured(data: Path) -> str:
    """docs/cache.md's tables: the `decode-cached` rows and targets, the cache's memory, the curve."""
    cached, curve = load(data, "decode-cached"), load(data, "decode-cached-curve")
    summary = cached["summary"]
    lines = [
        f"`make bench` at {provenance(cached)}, on {where(cached)}, "
        f"{len(summary['rows']['epoch 2, no cache']['rates'])} interleaved repetitions (`make results` "
        "wrote these tables; [results.md](results.md#make-bench) has the run's other tables):",
        "",
    ]
    lines += table(
        ("row", "elements/s, median", "min-max"),
        "lrr",
        (
            (
                label,
                rate(summary["rows"][name]["median"]),
                f"{rate(summary['rows'][name]['min'])}-{rate(summary['rows'][name]['max'])}",
            )
            for name, label in CACHE_ROWS.items()
            if name in summary["rows"]
        ),
    )
    lines.append("")
    lines += table(
        ("target", "ratio of medians", "each repetition's own ratio"),
        "lrl",
        (
            (
                name.replace(
                    "model 1/(0.5 load + augment)",
                    f"model `1 / (0.5 load + augment)` = {rate(summary['model_half'])}/s",
                ),
                f"{target['medians']:.2f}",
                ", ".join(f"{r:.2f}" for r in target["per_rep"]),
            )
            for name, target in summary["targets"].items()
        ),
    )
    lines += [
        "",
        "Memory: the cache's proportional share of resident memory (PSS, from `/proc/<pid>/smaps`), summed "
        f"over the consumer and every worker, with a cache that holds all {cached['elements']:,} samples:",
        "",
    ]
    lines += table(
        (
            "workers",
            "cache_bytes",
            "cache PSS, all processes",
            "PSS / cache_bytes",
            "workers' PSS, everything",
        ),
        "rrrrr",
        (
            (
                str(m["workers"]),
                mib(m["cache_bytes"]),
                mib(m["cache_pss"]),
                f"{m['cache_pss'] / m['cache_bytes']:.3f}",
                mib(m["workers_pss"]),
            )
            for m in cached["memory"]
        ),
    )
    points = curve["curve"]["points"]
    empty, full = points[0], points[-1]
    if empty["fraction"] != 0 or full["fraction"] != 1:
        raise ResultsDataError("the cache curve must run from an empty cache to one that holds all")
    augment = 1 / full["median"]
    load_cost = 1 / empty["median"] - augment
    lines += [
        "",
        f"Epoch 2 against `cache_bytes` (`make scale`, part 3: `python scripts/decode_cached.py --curve`, "
        f"{provenance(curve)}); the model is `1 / ((1 - f) x load + augment)` for a cache that holds a "
        "fraction `f`, with `load` and `augment` from the 0% and 100% points:",
        "",
    ]
    model_rows = []
    for point in points:
        model = 1 / ((1 - point["fraction"]) * load_cost + augment)
        inner = 0 < point["fraction"] < 1
        model_rows.append(
            (
                f"{point['fraction']:.0%}",
                mib(point["cache_bytes"]) if point["cache_bytes"] else "none",
                f"{rate(point['median'])} ({rate(point['min'])}-{rate(point['max'])})",
                rate(model) if inner else "",
                f"{point['median'] / model:.2f}" if inner else "",
            )
        )
    lines += table(
        ("cache holds", "cache_bytes", "epoch 2, elements/s (min-max)", "model", "measured / model"),
        "rrrrr",
        model_rows,
    )
    return "\n".join(lines)


def cache_report(data: Path) -> str:
    """The lines `report()` adds for a cache, as the bench's half-sized cache gave them."""
    cached = load(data, "decode-cached")
    report = cached["reports"]["cache holds half"].splitlines()
    lines = [line for line in report if line.startswith(("the cache", "it holds"))]
    if not lines:
        raise ResultsDataError("the stored report() of the half cache has no line about the cache")
    return "```\n" + "\n".join(lines) + "\n```"


RENDERERS: dict[str, Callable[[Path], str]] = {
    "headline": headline,
    "decode-once": decode_once,
    "cache-measured": cache_measured,
    "cache-report": cache_report,
}


def render(text: str, data: Path) -> str:
    """``text`` with every block's body rendered anew from ``data``."""

    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise ResultsDataError(f"no block is called {name!r}; known: {sorted(RENDERERS)}")
        return f"{match[1]}{RENDERERS[name](data)}\n{match[4]}"

    return BLOCK.sub(fill, text)


def pages(root: Path) -> list[Path]:
    """Every page that may quote figures: README.md and docs/*.md, results.md aside (it is the data)."""
    return [root / "README.md", *sorted(p for p in (root / "docs").glob("*.md") if p.name != "results.md")]


def render_pages(root: Path, data: Path) -> list[Path]:
    """Rewrite the blocks of every page from ``data``; gives the pages that changed."""
    changed = []
    for page in pages(root):
        text = page.read_text()
        new = render(text, data)
        if new != text:
            page.write_text(new)
            changed.append(page)
    return changed


def blocks(text: str) -> list[str]:
    """The names of a page's blocks, in order."""
    return [match["name"] for match in BLOCK.finditer(text)]
