"""`make bench`: every workload of docs/benchmarks.md against every contender, beside the limits of
this machine.

Each measurement builds one pipeline, consumes it with a Python loop over the `tf.data.Dataset` that
touches every element (or, for the large elements of `transfer`, inside the dataset's graph, as training
consumes them: the table's last column says which), and reports three things apart: start-up (building the
pipeline: processes, pools, datasets), time to the first element (from the start of building), and the
steady-state rate (the elements that arrive after a warm-up, over a fixed time). Repetitions are
interleaved: every repetition runs every row once, in an order rotated between repetitions, and the report
gives the median with the min-max spread.

    python scripts/bench.py                      # full run, ~13 minutes on 2 cores (~14 with the peers)
    python scripts/bench.py --quick              # smoke run, about 2 minutes with the peers
    python scripts/bench.py --workloads io,tiny --contenders from_generator,mpfeed --reps 5
    python scripts/bench.py --workloads straggler   # uneven costs, ordered and first-ready
    python scripts/bench.py --workloads autotune    # workers="auto" against fixed worker counts
    python scripts/bench.py --workloads decode-cached   # load once into a shared cache, augment each epoch

The optional peers `torch-dataloader` and `grain` run when their packages are installed (`make
bench-peers`). `mp-pool`, `keras-pydataset` and `torch-dataloader` start their processes the way their
users get them by default (multiprocessing's default start method: fork on Linux with Python < 3.14);
Grain always spawns its workers.

Output: progress on stderr, a table on stdout, JSON and a PNG plot under ``bench-results/``.

`straggler` has rows of its own (random-access and generator sources, ordered and first-ready, no
TensorFlow): it runs first, as `straggler.py` in a process of its own, and prints its own table.
`autotune` (``workers="auto"`` against fixed worker counts, no TensorFlow either) runs next, the same way,
as `autotune_bench.py`; then `decode-cached` (epochs with and without ``cache_bytes``, beside tf.data's
``cache()``), as `decode_cached.py`.

This file only reads the command line; the machinery lives in the `benchlib` package (see its
`__init__.py`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchlib.harness import Timing, usable_cores  # noqa: E402
from benchlib.plan import Plan, run  # noqa: E402
from benchlib.workloads import WORKLOADS  # noqa: E402

STRAGGLER = "straggler"  # the workload that `straggler.py` runs
AUTOTUNE = "autotune"  # the workload that `autotune_bench.py` runs
DECODE_CACHED = "decode-cached"  # the workload that `decode_cached.py` runs
DEDICATED = (STRAGGLER, AUTOTUNE, DECODE_CACHED)  # workloads with runners of their own

if __name__ != "__mp_main__":
    # A spawned process (Grain's workers) imports the main script again, as __mp_main__; those workers
    # need only the workloads, so TensorFlow and Keras load in the benchmark's own process alone.
    from benchlib.report import machine, save, summarize, table, warn_if_engine_changed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows and fewer repetitions")
    parser.add_argument(
        "--workloads", default=",".join([*WORKLOADS, *DEDICATED]), help="comma-separated (default: all)"
    )
    parser.add_argument("--contenders", default=None, help="comma-separated (default: all available)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="workers for every workload (default: cores; 8 for io and straggler)",
    )
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3)")
    return parser.parse_args(argv)


def workload_names(args: argparse.Namespace) -> list[str]:
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS and n not in DEDICATED]
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; choose from {[*WORKLOADS, *DEDICATED]}")
    return names


def make_plan(args: argparse.Namespace) -> Plan:
    from benchlib.contenders import CONTENDERS, PEERS, available_contenders

    names = [n for n in workload_names(args) if n not in DEDICATED]
    contenders = available_contenders()
    if args.contenders:
        wanted = [n.strip() for n in args.contenders.split(",") if n.strip()]
        known = {c.name for c in CONTENDERS + PEERS}
        if set(wanted) - known:
            raise SystemExit(f"unknown contenders {sorted(set(wanted) - known)}; choose from {sorted(known)}")
        contenders = [c for c in contenders if c.name in wanted]
    cores = usable_cores()
    workers = {n: args.workers or (8 if n == "io" else cores) for n in names}
    timing = Timing(duration_s=0.12, warmup_s=0.05) if args.quick else Timing(duration_s=1.5, warmup_s=0.3)
    reps = args.reps or 3
    return Plan([WORKLOADS[n] for n in names], contenders, workers, reps, timing)


def run_straggler(args: argparse.Namespace) -> None:
    """`straggler.py` with the options that apply to it, in a process of its own: no TensorFlow there,
    and PyTorch's DataLoader forks a process that has not loaded it."""
    command = [sys.executable, str(Path(__file__).with_name("straggler.py")), "--reps", str(args.reps or 3)]
    if args.quick:
        command.append("--quick")
    if args.workers:
        command += ["--workers", str(args.workers)]
    if args.contenders:
        from straggler import CONTENDERS as STRAGGLER_CONTENDERS

        wanted = [n.strip() for n in args.contenders.split(",") if n.strip() in STRAGGLER_CONTENDERS]
        if not wanted:
            print(f"# straggler: none of {args.contenders} runs it; skipped", file=sys.stderr)
            return
        command += ["--contenders", ",".join(wanted)]
    subprocess.run(command, check=True)


def run_autotune(args: argparse.Namespace) -> None:
    """`autotune_bench.py` in a process of its own, as `run_straggler`. Its rows are all mpfeed, at the
    worker counts it compares (``--workers`` does not apply)."""
    _run_mpfeed_only("autotune_bench.py", "autotune", args)


def run_decode_cached(args: argparse.Namespace) -> None:
    """`decode_cached.py` in a process of its own: its rows are mpfeed's epochs with and without a cache
    and tf.data's ``cache()``."""
    _run_mpfeed_only("decode_cached.py", "decode-cached", args)


def _run_mpfeed_only(script: str, name: str, args: argparse.Namespace) -> None:
    """A script whose rows are mpfeed's, in a process of its own; ``--contenders`` without mpfeed skips it."""
    command = [sys.executable, str(Path(__file__).with_name(script))]
    if args.reps:
        command += ["--reps", str(args.reps)]
    if args.quick:
        command.append("--quick")
    if args.contenders and "mpfeed" not in [n.strip() for n in args.contenders.split(",")]:
        print(f"# {name}: none of {args.contenders} runs it; skipped", file=sys.stderr)
        return
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    names = workload_names(args)
    plan = make_plan(args) if set(names) - set(DEDICATED) else None  # checks --contenders before any run
    if STRAGGLER in names:
        run_straggler(args)
    if AUTOTUNE in names:
        run_autotune(args)
    if DECODE_CACHED in names:
        run_decode_cached(args)
    if plan is None:
        return
    info = machine()
    print(
        f"# {info['cpu_model']}, {info['usable_cores']} usable cores; python {info['python']}, "
        f"TF {info['tensorflow']}, keras {info['keras']}, numpy {info['numpy']}; {info['date']}",
        file=sys.stderr,
    )
    started = time.perf_counter()
    run(plan)
    warn_if_engine_changed(info)
    summary = summarize(plan)
    base = save(plan, summary, info, args)
    print(
        f"# {info['cpu_model']}, {info['usable_cores']} usable cores, TF {info['tensorflow']}, {info['date']}"
    )
    engine = f"{info['mpfeed_commit']}{' (modified)' if info['mpfeed_modified'] else ''}"
    print(f"# mpfeed {engine} from {info['mpfeed_path']}, sources {info['mpfeed_sources_sha256']}")
    print(f"# python {' '.join(sys.argv)}   ({time.perf_counter() - started:.0f} s)")
    print(table(summary))
    print(f"\nresults: {base}.json, {base}.png")


if __name__ == "__main__":
    main()
