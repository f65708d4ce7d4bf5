"""What the Ray backend costs before the first element, and how fast it notices a lost node.

On a local cluster (a head and two worker nodes on loopback, as the tests make): Ray's installed size,
the cluster's start, a `Feeder` with N actors from its creation to its first element (against the local
engine's), and, with a node removed while its actors produce, the time until the consumer gets
`WorkerDiedError`. Every figure is the median of ``--reps`` runs, with the spread.

    python scripts/ray_costs.py            # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # bind to loopback

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import mpfeed  # noqa: E402

STORE_BYTES = 200 * 2**20


def slow_items(n, delay, shard):
    for i in range(shard.index, n, shard.count):
        time.sleep(delay)
        yield np.full(4, i), i


def installed_mib(package: str) -> float:
    root = Path(__import__(package).__file__).parent
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20


def first_element_s(workers: int, backend) -> float:
    started = time.perf_counter()
    with mpfeed.Feeder(slow_items, args=(10_000, 0.0), workers=workers, backend=backend) as feeder:
        next(iter(feeder))
        return time.perf_counter() - started


def node_loss_s(cluster: Cluster) -> float:
    """From remove_node() to the consumer's WorkerDiedError, while the node's two actors produce."""
    node = cluster.add_node(num_cpus=2, object_store_memory=STORE_BYTES, resources={"doomed": 2})
    cluster.wait_for_nodes()
    backend = mpfeed.RayBackend(resources={"doomed": 1})
    with mpfeed.Feeder(slow_items, args=(10**6, 0.005), workers=2, backend=backend) as feeder:
        stream = iter(feeder)
        for _ in range(50):
            next(stream)
        removed = []
        remover = threading.Thread(
            target=lambda: (removed.append(time.perf_counter()), cluster.remove_node(node))
        )
        remover.start()
        try:
            for _ in stream:
                pass
        except mpfeed.WorkerDiedError:
            noticed = time.perf_counter()
        remover.join()
    return noticed - removed[0]


def spread(values: list[float], unit: float = 1.0, fmt: str = "{:.2f}") -> str:
    scaled = [v * unit for v in values]
    return f"{fmt.format(statistics.median(scaled))} ({fmt.format(min(scaled))}-{fmt.format(max(scaled))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8])
    options = parser.parse_args()
    print(f"ray {ray.__version__}: {installed_mib('ray'):.0f} MiB installed", flush=True)
    starts = []
    for _ in range(options.reps):
        began = time.perf_counter()
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 0, "object_store_memory": STORE_BYTES, "include_dashboard": False},
        )
        for _ in range(2):
            cluster.add_node(num_cpus=8, object_store_memory=STORE_BYTES)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": os.path.dirname(__file__)}})
        starts.append(time.perf_counter() - began)
        if len(starts) < options.reps:
            ray.shutdown()
            cluster.shutdown()
    print(f"a 3-node local cluster up and connected: {spread(starts)} s", flush=True)
    try:
        print("\nworkers   first element, Ray actors   first element, local processes")
        for workers in options.workers:
            remote = [
                first_element_s(workers, mpfeed.RayBackend(scheduling_strategy="SPREAD"))
                for _ in range(options.reps)
            ]
            local = [first_element_s(workers, None) for _ in range(options.reps)]
            print(f"{workers:>7}   {spread(remote):>24} s   {spread(local):>28} s", flush=True)
        losses = [node_loss_s(cluster) for _ in range(options.reps)]
        print(f"\na node removed mid-stream: WorkerDiedError after {spread(losses, 1000, '{:.0f}')} ms")
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
