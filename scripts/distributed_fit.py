"""Multi-worker training with `tf.distribute.MultiWorkerMirroredStrategy`, fed by mpfeed on every host.

Run one process per host. Each reads ``TF_CONFIG``: the whole cluster, and its own place in it. Two
workers on one machine, by hand:

    W='"cluster": {"worker": ["127.0.0.1:12345", "127.0.0.1:12346"]}, "task": {"type": "worker", "index"'
    TF_CONFIG="{$W: 0}}" python scripts/distributed_fit.py &
    TF_CONFIG="{$W: 1}}" python scripts/distributed_fit.py

On a real cluster, list every host's address in ``"worker"`` and start the same command on each host with
its own ``"index"``. The workers wait for each other when the strategy is created, then train one model
together: `strategy.distribute_datasets_from_function` calls ``dataset_fn`` once per worker with a
`tf.distribute.InputContext`, and `mpfeed.from_generator(..., input_context=ctx)` gives that worker's
pipeline its own part of every epoch (disjoint parts that together cover every element once), made by
its own mpfeed worker processes. Gradients are summed across the workers (all-reduce) at every step, so
every worker ends with the same weights.

The training loop is a custom one (`strategy.run`): Keras 3's ``model.fit`` fails under
MultiWorkerMirroredStrategy before its first step, whatever the dataset.

``--runs`` picks the input pipelines to train on, one after the other: ``shuffled`` (a random-access
source, a new order every epoch), ``ordered`` (the same source in index order) and ``generator`` (a
generator source); ``--record FILE`` writes the indices each epoch's pipeline delivered on this worker,
the losses and the final weights as JSON (tests/test_distribute.py compares the two workers' files).
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

import numpy as np

import mpfeed

if TYPE_CHECKING:
    import tensorflow as tf

LENGTH = 100  # elements per epoch, all hosts together
GLOBAL_BATCH = 16  # elements per step, all replicas together
SEED = 7  # every host must shuffle with the same seed: they split one permutation between them
TRUE_WEIGHTS = np.linspace(-1.0, 1.0, 8, dtype=np.float32)


def example(index: int) -> dict:
    """Element ``index``: 8 features, their target, and the index itself (to see which host got what)."""
    x = np.random.default_rng(index).normal(size=8).astype(np.float32)
    return {"x": x, "y": np.float32(x @ TRUE_WEIGHTS), "index": np.int64(index)}


class Regression:
    """A random-access source: mpfeed's workers call ``source[i]`` for the positions they are handed."""

    def __len__(self) -> int:
        return LENGTH

    def __getitem__(self, index: int) -> dict:
        return example(index)


def regression(length: int, shard: mpfeed.Shard):
    """A generator source: shards are numbered across every host's pipeline, so strides split the data."""
    for index in range(shard.index, length, shard.count):
        yield example(index)


def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    """This host's input pipeline: its part of every epoch, in batches of one replica's share."""
    batch_size = ctx.get_per_replica_batch_size(GLOBAL_BATCH)
    return mpfeed.from_generator(
        Regression(), input_context=ctx, shuffle=True, seed=SEED, workers=2, batch_size=batch_size
    )


def ordered_dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    """The same source in index order."""
    batch_size = ctx.get_per_replica_batch_size(GLOBAL_BATCH)
    return mpfeed.from_generator(Regression(), input_context=ctx, workers=2, batch_size=batch_size)


def generator_dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    """A generator source: give every host the same ``workers``, since shards are numbered from it."""
    batch_size = ctx.get_per_replica_batch_size(GLOBAL_BATCH)
    return mpfeed.from_generator(
        regression, args=(LENGTH,), input_context=ctx, workers=2, batch_size=batch_size
    )


RUNS = {"shuffled": dataset_fn, "ordered": ordered_dataset_fn, "generator": generator_dataset_fn}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--runs", nargs="+", default=["shuffled"], choices=list(RUNS))
    parser.add_argument("--record", default=None, help="write what this worker saw here (.json)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import tensorflow as tf

    # Before any other TensorFlow call: it reads TF_CONFIG and waits for every worker of the cluster.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():  # variables made here are mirrored on every replica
        model = tf.keras.Sequential([tf.keras.Input((8,)), tf.keras.layers.Dense(1)])
        optimizer = tf.keras.optimizers.SGD(0.1)

    @tf.function
    def train_step(batch):
        def step(batch):
            with tf.GradientTape() as tape:
                error = model(batch["x"], training=True)[:, 0] - batch["y"]
                loss = tf.nn.compute_average_loss(error**2, global_batch_size=GLOBAL_BATCH)
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables))  # summed over replicas
            return loss

        return strategy.reduce("SUM", strategy.run(step, args=(batch,)), axis=None)

    task = strategy.cluster_resolver.task_id
    record: dict = {"task": task, "runs": []}
    for run in args.runs:
        dataset = strategy.distribute_datasets_from_function(RUNS[run])  # dataset_fn by default
        epochs, losses = [], []
        for _ in range(args.epochs):
            seen, total, steps = [], 0.0, 0
            for batch in dataset:  # one epoch of this host's part
                for local in strategy.experimental_local_results(batch["index"]):
                    seen += local.numpy().tolist()
                total += float(train_step(batch))
                steps += 1
            epochs.append(seen)
            losses.append(total / steps)
        print(f"worker {task}: {run}: loss per epoch {', '.join(f'{x:.4f}' for x in losses)}", flush=True)
        record["runs"].append({"run": run, "epochs": epochs, "losses": losses})
    record["weights"] = [w.numpy().tolist() for w in model.weights]
    if args.record:
        with open(args.record, "w") as file:
            json.dump(record, file)


if __name__ == "__main__":
    main()
