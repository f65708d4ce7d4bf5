"""Preemption-safe training with `model.fit` that resumes mid-epoch, exactly where the model stood.

A `tf.train.Checkpoint` holds the model, its optimizer and the feeder's position (`mpfeed.tf.FeederState`);
a callback saves it every few steps, noting how many elements of the epoch the model has consumed (tf.data
prefetches ahead, so the feeder itself has handed out more). After a preemption, run the same command
again: it restores the checkpoint, finishes the interrupted epoch from that position, then trains on.

    python scripts/resumable_fit.py --dir /tmp/run          # Ctrl-C or kill -9 it, then run it again

``--kill-at EPOCH:STEP`` makes it kill itself (SIGKILL) after that step, as a preemption would;
``--weights FILE`` saves the final weights, so that an interrupted and resumed run can be compared with
an uninterrupted one (tests/test_resumable_fit.py does).
"""

from __future__ import annotations

import argparse
import os
import signal

import numpy as np

import mpfeed


class Regression:
    """A random-access source: element i is 16 features and a target, made from i alone."""

    def __len__(self) -> int:
        return 2048

    def __getitem__(self, index: int):
        rng = np.random.default_rng(index)
        x = rng.normal(size=16).astype(np.float32)
        noise = mpfeed.element_rng().normal(scale=0.01)  # augmentation: the same for (seed, epoch, index)
        return x, np.float32(x.sum() / 4 + noise)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", required=True, help="where checkpoints go")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--save-every", type=int, default=10, help="steps between checkpoints")
    parser.add_argument("--kill-at", default=None, help="EPOCH:STEP after which to kill ourselves")
    parser.add_argument("--weights", default=None, help="save the final weights here (.npz)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import keras
    import tensorflow as tf

    import mpfeed.tf

    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    with mpfeed.Feeder(Regression(), workers=2, shuffle=True, seed=1) as feeder:
        model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.01), "mse")
        model.optimizer.build(model.trainable_variables)
        position = mpfeed.tf.FeederState(feeder)
        epoch = tf.Variable(0, dtype=tf.int64)
        consumed = tf.Variable(0, dtype=tf.int64)  # elements of that epoch the model has trained on
        checkpoint = tf.train.Checkpoint(
            model=model, optimizer=model.optimizer, feeder=position, epoch=epoch, consumed=consumed
        )
        manager = tf.train.CheckpointManager(checkpoint, args.dir, max_to_keep=2)
        if manager.latest_checkpoint:
            checkpoint.restore(manager.latest_checkpoint)  # the feeder's next pass resumes there
            print(f"resumed at epoch {int(epoch)}, after {int(consumed)} elements", flush=True)
        dataset = feeder.dataset().batch(args.batch).prefetch(4)  # after the restore: nothing made twice

        class SaveEvery(keras.callbacks.Callback):
            def __init__(self, start: int) -> None:
                super().__init__()
                self.start = start  # elements of the epoch consumed before this fit() began

            def on_epoch_begin(self, number, logs=None):
                epoch.assign(number)

            def on_train_batch_end(self, step, logs=None):
                consumed.assign(self.start + (step + 1) * args.batch)
                if (step + 1) % args.save_every == 0:
                    position.consumed = int(consumed)
                    manager.save()
                if args.kill_at == f"{int(epoch)}:{step}":
                    os.kill(os.getpid(), signal.SIGKILL)

            def on_epoch_end(self, number, logs=None):
                self.start = 0
                epoch.assign(number + 1)
                consumed.assign(0)
                position.consumed = None  # the epoch is over: the next one starts from its beginning
                manager.save()

        first = int(epoch)
        if first < args.epochs:
            # The interrupted epoch is shorter than the others: fit() it alone, so that Keras does not
            # take its length for every epoch's.
            model.fit(
                dataset,
                epochs=first + 1,
                initial_epoch=first,
                verbose=0,
                callbacks=[SaveEvery(int(consumed))],
            )
        if first + 1 < args.epochs:
            model.fit(
                dataset, epochs=args.epochs, initial_epoch=first + 1, verbose=0, callbacks=[SaveEvery(0)]
            )
        print(f"trained {args.epochs} epochs; {feeder.stats().items} elements from the feeder", flush=True)
        if args.weights:
            np.savez(args.weights, *model.get_weights())


if __name__ == "__main__":
    main()
