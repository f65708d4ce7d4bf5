"""POSIX rings (named segments in /dev/shm) against memfd rings, side by side.

Each round makes one ring of each kind, in alternating order, and times:

- create: `Ring.create` (space checks, ``posix_fallocate`` of every page, ``mmap``);
- attach: a worker process that is already running maps it: `Ring.attach` by name for POSIX (which also
  removes the name), `Ring.attach_fd` on an fd received with SCM_RIGHTS for memfd; timed in the worker;
- hand-off: the same as the consumer sees it: send the name or the fd, the worker attaches and answers;
- worker's first write: the worker fills every slot of the fresh mapping (its page faults included);
- consumer's first read: the consumer copies every slot out through `Ring.slot_view` (its faults included);
- write / read: the same copies again, in the consumer, once the pages are mapped;
- close: `Ring.close` (close_fd or unlink, and unmap) in the consumer.

The first round warms up and is not counted; the table gives the median of the others and their range.

    python scripts/ring_memory.py                      # 8 slots x 8 MiB, 9 rounds
    python scripts/ring_memory.py --depth 4 --slot-mib 32 --rounds 15
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import numpy as np

from mpfeed.ring import Ring, shm_free_bytes

KINDS = ("posix", "memfd")

WORKER = """
import socket, sys, time
import numpy as np
from mpfeed.ring import Ring

sock = socket.socket(fileno=int(sys.argv[1]))
while True:
    message, fds, _, _ = socket.recv_fds(sock, 4096, 1)
    if not message:
        break
    kind, name, depth, slot_bytes = message.decode().split()
    depth, slot_bytes = int(depth), int(slot_bytes)
    start = time.perf_counter()
    if kind == "posix":
        ring = Ring.attach(name, depth, slot_bytes)
    else:
        ring = Ring.attach_fd(fds[0], depth, slot_bytes)
    attached = time.perf_counter() - start
    sock.sendall(repr(attached).encode())
    sock.recv(16)  # go ahead and write
    source = np.full(slot_bytes, 7, np.uint8)
    start = time.perf_counter()
    for i in range(depth):
        np.copyto(ring.slot(i), source)
    written = time.perf_counter() - start
    ring.close()
    sock.sendall(repr(written).encode())
"""


def one_round(kind: str, worker: socket.socket, depth: int, slot_bytes: int, scratch: np.ndarray) -> dict:
    size = depth * slot_bytes
    times: dict[str, float] = {}
    start = time.perf_counter()
    ring = Ring.create(depth, slot_bytes, memory=kind)
    times["create"] = time.perf_counter() - start
    assert ring.kind == kind, ring.kind

    start = time.perf_counter()
    if kind == "posix":
        socket.send_fds(worker, [f"posix {ring.name} {depth} {slot_bytes}".encode()], [])
    else:
        socket.send_fds(worker, [f"memfd - {depth} {slot_bytes}".encode()], [ring.fd])
    times["attach"] = float(worker.recv(64))
    times["handoff"] = time.perf_counter() - start
    ring.unlink()  # what the supervisor does once the worker has attached: close_fd, or remove the name

    worker.sendall(b"go")
    times["worker first write"] = size / float(worker.recv(64))
    start = time.perf_counter()
    for i in range(depth):
        np.copyto(scratch, ring.slot_view(i))
    times["consumer first read"] = size / (time.perf_counter() - start)
    assert scratch[0] == scratch[-1] == 7

    source = np.full(slot_bytes, 9, np.uint8)
    start = time.perf_counter()
    for i in range(depth):
        np.copyto(ring.slot(i), source)
    times["write"] = size / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(depth):
        np.copyto(scratch, ring.slot_view(i))
    times["read"] = size / (time.perf_counter() - start)
    assert scratch[0] == scratch[-1] == 9

    start = time.perf_counter()
    ring.close()
    times["close"] = time.perf_counter() - start
    return times


ROWS = [  # (key, label, unit, scale): times print in ms, rates in GB/s
    ("create", "create + reserve + map", "ms", 1e3),
    ("attach", "worker's attach (in the worker)", "ms", 1e3),
    ("handoff", "hand-off round trip (consumer)", "ms", 1e3),
    ("worker first write", "worker's first write", "GB/s", 1e-9),
    ("consumer first read", "consumer's first read", "GB/s", 1e-9),
    ("write", "write, pages mapped", "GB/s", 1e-9),
    ("read", "read, pages mapped", "GB/s", 1e-9),
    ("close", "close", "ms", 1e3),
]


def cell(values: list[float], scale: float) -> str:
    scaled = sorted(v * scale for v in values)
    digits = 2 if scaled[-1] < 10 else 1
    return f"{statistics.median(scaled):.{digits}f} ({scaled[0]:.{digits}f}-{scaled[-1]:.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=8, help="slots per ring (default 8)")
    parser.add_argument("--slot-mib", type=int, default=8, help="MiB per slot (default 8)")
    parser.add_argument(
        "--rounds", type=int, default=9, help="counted rounds per kind (default 9, at least 5)"
    )
    options = parser.parse_args()
    if options.rounds < 5:
        parser.error("--rounds must be at least 5")
    depth, slot_bytes = options.depth, options.slot_mib << 20
    scratch = np.ones(slot_bytes, np.uint8)  # touched, so reads do not count its page faults

    ours, theirs = socket.socketpair()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-c", WORKER, str(theirs.fileno())]
    worker_process = subprocess.Popen(command, pass_fds=(theirs.fileno(),), env=env)
    theirs.close()
    results: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    try:
        for round_index in range(options.rounds + 1):
            order = KINDS if round_index % 2 == 0 else KINDS[::-1]
            for kind in order:
                times = one_round(kind, ours, depth, slot_bytes, scratch)
                if round_index:  # round 0 warms up
                    results[kind].append(times)
    finally:
        ours.close()  # the worker reads an empty message and ends
        worker_process.wait(timeout=30)

    shmem_thp = "?"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as file:
            shmem_thp = file.read().strip()
    except OSError:
        pass
    print(
        f"rings of {depth} x {options.slot_mib} MiB, {options.rounds} rounds per kind, interleaved; "
        f"median (min-max)\nLinux {platform.release()}, Python {platform.python_version()}, "
        f"numpy {np.__version__}, {os.cpu_count()} CPUs, /dev/shm free {shm_free_bytes() or 0:,} bytes, "
        f"shmem THP: {shmem_thp}\n"
    )
    widths = (34, 4, 22, 22, 13)
    print(
        "| "
        + " | ".join(f"{t:<{w}}" for t, w in zip(("measure", "unit", *KINDS, "memfd / posix"), widths))
        + " |"
    )
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for key, label, unit, scale in ROWS:
        columns = {kind: [times[key] for times in results[kind]] for kind in KINDS}
        ratio = statistics.median(columns["memfd"]) / statistics.median(columns["posix"])
        print(
            f"| {label:<34} | {unit:<4} | {cell(columns['posix'], scale):<22} "
            f"| {cell(columns['memfd'], scale):<22} | {ratio:13.2f} |"
        )


if __name__ == "__main__":
    main()
