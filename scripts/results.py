"""`make results`: every figure of the documentation measured again, at one commit, into docs/results.md.

Runs each measurement the docs quote (`make bench`, which runs the straggler and autotune tables too,
`make scale`, `make scale-ray`, the resume latency, what Ray costs, the diagnosis' overhead and the
JPEG-decoding job) one after another, and writes one page: beside each table the machine (cores, CPU
model), the command and the commit. Every command imports the mpfeed of this repository, whatever is
installed. The full run takes most of an hour on 2 cores and wants the machine to itself.

    python scripts/results.py                  # everything, into docs/results.md
    python scripts/results.py --quick          # smoke run of the same (short windows), into bench-results/
    python scripts/results.py --only scale,decode-images --out /tmp/results.md

A measurement that fails is written as such, with the end of its error output, and the run goes on; the
command exits non-zero at the end when any failed.

Each step's JSON is kept in docs/results-data/ (``<step>.json``), and a full run then rewrites the
figures README.md and docs/*.md quote, inside their `<!-- make results: ... -->` blocks, from that data
(`benchlib/figures.py`); ``--render`` does only that, from the data already stored.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import figures

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
ERROR_TAIL_CHARS = 3000  # how much of a failed command's error output the page keeps


@dataclass(frozen=True)
class Step:
    """One measurement: its section of the page, the make target (if any) it stands for, and its
    arguments to `python`, full and quick."""

    name: str
    title: str
    what: str
    target: str | None
    full: tuple[str, ...]
    quick: tuple[str, ...]


STEPS = (
    Step(
        "bench",
        "`make bench`",
        "Every workload against every contender and this machine's limits, after the straggler and "
        "autotune tables (PyTorch's DataLoader and Grain appear when `make bench-peers` installed them).",
        "make bench",
        ("scripts/bench.py",),
        ("scripts/bench.py", "--quick"),
    ),
    Step(
        "scale",
        "`make scale`",
        "Throughput against the worker count, mpfeed's own costs per element, and how many cores one "
        "consumer keeps fed.",
        "make scale",
        ("scripts/scale.py",),
        ("scripts/scale.py", "--quick"),
    ),
    Step(
        "scale-ray",
        "`make scale-ray`",
        "The Ray backend on a local 3-node cluster, beside local workers and Ray Data's `to_tf`, and what "
        "one record costs.",
        "make scale-ray",
        ("scripts/scale_ray.py",),
        ("scripts/scale_ray.py", "--quick"),
    ),
    Step(
        "resume-latency",
        "Resume latency",
        "The first element after a resume deep into a shuffled epoch, against a cold start.",
        None,
        ("scripts/resume_latency.py",),
        ("scripts/resume_latency.py", "--length", "10000", "--reps", "2"),
    ),
    Step(
        "ray-costs",
        "What Ray costs before the first element",
        "Ray's installed size, a local cluster's start, the first element with 1, 4 and 8 actors against "
        "local workers, and how fast a lost node is noticed.",
        None,
        ("scripts/ray_costs.py",),
        ("scripts/ray_costs.py", "--reps", "1", "--workers", "1"),
    ),
    Step(
        "diagnosis",
        "The diagnosis",
        "What the timing behind `report()` costs the consumer per call, with tiny elements.",
        None,
        ("scripts/diagnosis_overhead.py",),
        ("scripts/diagnosis_overhead.py",),
    ),
    Step(
        "consumer-costs",
        "What the consumer costs",
        "The consumer's CPU per element with tiny elements iterated directly, beside the same rows for "
        "the mpfeed of commit b3ed56b (A/B, interleaved), and its memory over a 3-million-record epoch.",
        None,
        ("scripts/consumer_costs.py", "--against", "b3ed56b"),
        ("scripts/consumer_costs.py", "--quick"),
    ),
    Step(
        "decode-images",
        "A whole job: decoding JPEGs while a model trains",
        "JPEGs decoded and augmented in mpfeed's workers feeding a small Keras model, against plain "
        "`from_generator` and the model alone.",
        None,
        ("scripts/decode_images.py", "--steps", "120"),
        ("scripts/decode_images.py", "--steps", "10"),
    ),
)


def run_git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def commit() -> str:
    """The commit measured, marked when mpfeed's or the scripts' files differ from it."""
    sha = run_git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = run_git("status", "--porcelain", "--", "mpfeed", "scripts")
    return f"{sha} (with uncommitted changes)" if dirty else sha


def machine() -> str:
    """The CPU model, the cores this process may use and the machine's logical CPUs, and Python."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {usable} usable cores of {os.cpu_count()} logical, Python {platform.python_version()}"


def command_line(step: Step, quick: bool) -> str:
    arguments = " ".join(step.quick if quick else step.full)
    if step.target and not quick:
        return f"{step.target} (python {arguments})"
    return f"python {arguments}"


def measure(step: Step, quick: bool, plots_dir: Path, data_dir: Path) -> tuple[bool, str, float, list[Path]]:
    """Run one step from the repository root, importing this repository's mpfeed; gives whether it
    succeeded, its report (stdout, or the end of its errors), its seconds, and the plots it named on its
    `results:` lines, copied into ``plots_dir`` under stable names (``scale.png``, ``bench.png``); the
    JSON files it named go to ``data_dir`` the same way (``bench.json``, ``decode-cached.json``)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.perf_counter()
    print(f"# {step.name}: {command_line(step, quick)}", file=sys.stderr, flush=True)
    process = subprocess.Popen(
        [sys.executable, *(step.quick if quick else step.full)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    errors = bytearray()
    tee = threading.Thread(target=_tee, args=(process.stderr, errors), daemon=True)
    tee.start()
    stdout = process.stdout.read().decode(errors="replace") if process.stdout else ""
    process.wait()
    tee.join()
    done = subprocess.CompletedProcess(
        process.args, process.returncode, stdout, errors.decode(errors="replace")
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        return False, f"exit code {done.returncode}\n{done.stderr[-ERROR_TAIL_CHARS:]}", seconds, []
    report, plots = [], []
    for line in done.stdout.rstrip().splitlines():
        if line.startswith("results: "):  # files under bench-results/: keep the plots beside the page
            for path in (Path(p.strip()) for p in line[len("results: ") :].split(",")):
                stable = path.stem.rsplit("-", 2)[0] + path.suffix  # bench-<date>-<time>.png: bench.png
                if path.suffix == ".png" and path.exists():
                    plots_dir.mkdir(parents=True, exist_ok=True)
                    plots.append(plots_dir / stable)
                    shutil.copyfile(path, plots[-1])
                elif path.suffix == ".json" and path.exists():
                    data_dir.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, data_dir / stable)
            continue
        report.append(line)
    return True, "\n".join(report), seconds, plots


def _tee(stream: Any, tail: bytearray) -> None:
    """Copy a child's progress and errors to our stderr as they come, keeping their end for the page."""
    while chunk := stream.read1(65536):
        sys.stderr.buffer.write(chunk)
        sys.stderr.buffer.flush()
        tail.extend(chunk)
        del tail[: max(0, len(tail) - ERROR_TAIL_CHARS)]


def page(sections: list[str], header: str) -> str:
    return header + "\n\n" + "\n\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every step's short run (figures not to quote)")
    parser.add_argument(
        "--only", default=None, help=f"comma-separated steps: {','.join(s.name for s in STEPS)}"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default docs/results.md; quick: bench-results/"
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: rewrite the figures README.md and docs/ quote from docs/results-data/",
    )
    args = parser.parse_args(argv)
    if args.render:
        return render_pages()
    names = [n.strip() for n in args.only.split(",")] if args.only else [s.name for s in STEPS]
    unknown = set(names) - {s.name for s in STEPS}
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; choose from {[s.name for s in STEPS]}")
    out = args.out or (
        ROOT / "bench-results" / "results-quick.md" if args.quick else ROOT / "docs" / "results.md"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    plots_dir, data_dir = out.parent / "results-figures", out.parent / "results-data"

    measured, where = commit(), machine()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections, failed = [], []
    for step in (s for s in STEPS if s.name in names):
        ok, report, seconds, plots = measure(step, args.quick, plots_dir, data_dir)
        if not ok:
            failed.append(step.name)
        status = "" if ok else "**This measurement failed**; the end of its error output:\n\n"
        pictures = "".join(f"\n\n![{p.stem}]({p.parent.name}/{p.name})" for p in plots)
        sections.append(
            f"## {step.title}\n\n{step.what}\n\n"
            f"- command: `{command_line(step, args.quick)}`\n- commit: {measured}\n- machine: {where}\n"
            f"- took {seconds:.0f} s\n\n{status}```\n{report}\n```{pictures}"
        )
    if commit() != measured:
        sections.append(
            f"**The code changed during the run**: it began at {measured} and ended at {commit()}."
        )
    kind = "a quick smoke run: short windows, not figures to quote" if args.quick else "every figure"
    header = (
        "# Results\n\n"
        f"Written by `python scripts/results.py{' --quick' if args.quick else ''}` ({kind}), "
        f"begun {started}, "
        f"mpfeed at commit {measured}, on {where}. Each section gives the command that made its table. "
        "The benchmark is defined in [benchmarks.md](benchmarks.md)."
    )
    out.write_text(page(sections, header))
    print(f"wrote {out}" + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    if not args.quick and data_dir == DATA:
        return render_pages() or (1 if failed else 0)
    return 1 if failed else 0


DATA = ROOT / "docs" / "results-data"


def render_pages() -> int:
    """Rewrite every quoted figure from the stored data; non-zero when a block can't be rendered."""
    try:
        changed = figures.render_pages(ROOT, DATA)
    except figures.ResultsDataError as error:
        print(f"the quoted figures were not rewritten: {error}", file=sys.stderr)
        return 1
    names = ", ".join(str(p.relative_to(ROOT)) for p in changed) or "none changed"
    print(f"quoted figures rewritten from {DATA.relative_to(ROOT)}: {names}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
