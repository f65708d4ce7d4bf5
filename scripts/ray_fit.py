"""Train a Keras model on a Ray cluster's input workers: mpfeed's Ray backend, end to end.

Decodes and augments JPEGs in Ray actors (one per CPU the cluster offers, spread over its nodes), and
trains a small model on them with ``model.fit``. With ``--address`` it joins your cluster (every node
needs mpfeed, numpy and Pillow installed, and this file: ``runtime_env`` ships it); without, it starts a
local one, a head and two worker nodes on this machine, as a demonstration.

    python scripts/ray_fit.py                        # a local 3-node cluster, a few steps
    python scripts/ray_fit.py --address auto         # the cluster this machine belongs to (ray start)
"""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np
from PIL import Image

import mpfeed


class Photos:
    """A random-access source: element i is a JPEG decoded, randomly cropped and flipped, and its label.
    The JPEGs are made in memory here; a real job would read ``self.paths[i]``."""

    def __init__(self, count: int, size: int = 160):
        self.count, self.size = count, size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        rng = mpfeed.element_rng()  # the same crop for the same (seed, epoch, index), on any node
        pixels = np.random.default_rng(index).integers(0, 255, (self.size, self.size, 3), dtype=np.uint8)
        encoded = io.BytesIO()
        Image.fromarray(pixels).save(encoded, format="JPEG")
        image = np.asarray(Image.open(io.BytesIO(encoded.getvalue())).convert("RGB"))
        top, left = rng.integers(0, self.size - 128, size=2)
        crop = image[top : top + 128, left : left + 128]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        return {"image": np.ascontiguousarray(crop), "label": index % 4}


def local_cluster():
    """A head (no CPUs of its own) and two worker nodes on this machine."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": 200 * 2**20, "include_dashboard": False},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=2, object_store_memory=200 * 2**20)
    cluster.wait_for_nodes()
    return cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", help="a running cluster; default: start a local one")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    options = parser.parse_args()

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local cluster binds to loopback
    import ray
    import tensorflow as tf

    cluster = None if options.address else local_cluster()
    ray.init(
        address=options.address or cluster.address,
        # Ship this file to the actors: they unpickle Photos by name.
        runtime_env={"working_dir": os.path.dirname(os.path.abspath(__file__))},
    )
    try:
        backend = mpfeed.RayBackend(scheduling_strategy="SPREAD")  # one actor per CPU, over the nodes
        with mpfeed.Feeder(
            Photos(options.images), backend=backend, batch_size=options.batch, shuffle=True, seed=0
        ) as feeder:
            dataset = feeder.dataset().map(lambda b: (tf.cast(b["image"], tf.float32) / 255, b["label"]))
            steps = -(-options.images // options.batch)  # batches per epoch, for Keras's progress
            dataset = dataset.apply(tf.data.experimental.assert_cardinality(steps))
            model = tf.keras.Sequential(
                [
                    tf.keras.Input((128, 128, 3)),
                    tf.keras.layers.Conv2D(8, 3, strides=4, activation="relu"),
                    tf.keras.layers.GlobalAveragePooling2D(),
                    tf.keras.layers.Dense(4),
                ]
            )
            model.compile("adam", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            began = time.perf_counter()
            history = model.fit(dataset.prefetch(2), epochs=options.epochs, shuffle=False, verbose=2)
            took = time.perf_counter() - began
            stats = feeder.stats()
            nodes = sorted({w.node for w in stats.workers})
            print(
                f"trained {options.epochs} epochs of {options.images} images in {took:.1f} s "
                f"({stats.items / took:,.0f} images/s) from {len(stats.workers)} actors on nodes {nodes}; "
                f"final loss {history.history['loss'][-1]:.3f}"
            )
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


if __name__ == "__main__":
    main()
