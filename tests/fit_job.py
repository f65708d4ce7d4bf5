"""A Keras training job that records, step by step, which elements the model trained on: the tests run it
as a subprocess, kill it, run it again, and compare the streams and the final weights with a run that was
never interrupted.

Every element carries its index; the model's ``train_step`` appends the indices of each batch it trains on
to ``--log`` (one line per step, flushed, so a SIGKILL loses nothing already trained). ``--kill-at E:S``
kills the job (SIGKILL) after step S of Keras epoch E (or the first step past it); ``--kill-in-save N``
kills it in the middle of the N-th backup (its weights written, its metadata not yet).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import numpy as np

import mpfeed


class Indexed:
    """Element i: 8 features made from i, its index, and a target; a little augmentation per epoch."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        x = np.random.default_rng(index).normal(size=8).astype(np.float32)
        noise = np.float32(mpfeed.element_rng().normal(scale=0.01))
        return {"x": x, "i": np.int64(index)}, np.float32(x.sum() / 4 + noise)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--way", choices=["backup", "checkpoint", "plain"], default="backup")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batch-in", choices=["feeder", "dataset"], default="dataset")
    parser.add_argument("--drop-remainder", action="store_true")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="with .repeat()")
    parser.add_argument("--steps-per-execution", type=int, default=1)
    parser.add_argument("--save-freq", default="5")
    parser.add_argument("--validation", action="store_true", help="validation data from a second feeder")
    parser.add_argument("--validate-on-training-data", action="store_true", help="the same dataset")
    parser.add_argument("--sync", action="store_true", help="mpfeed.keras.EpochSync (with --way plain)")
    parser.add_argument("--split-fit", action="store_true", help="one fit() for epoch 0, one for the rest")
    parser.add_argument("--delete-checkpoint", action="store_true", help="at the end of each fit()")
    parser.add_argument("--strategy", choices=["none", "mirrored"], default="none")
    parser.add_argument("--ordered", type=int, default=1)
    parser.add_argument("--start", default=None, help="E:N: load the position after N records of epoch E")
    parser.add_argument("--initial-epoch", type=int, default=0)
    parser.add_argument("--kill-at", default=None)
    parser.add_argument("--kill-in-save", type=int, default=None)
    return parser.parse_args()


def main() -> None:
    args = parse()
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend != "tensorflow":
        sys.modules["tensorflow"] = None  # type: ignore[assignment]  # as if it were not installed
    if args.strategy == "mirrored":
        import tensorflow as tf

        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()],
        )
    import keras

    import mpfeed.keras

    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    log = open(args.log, "a")

    def record(indices, replica=0) -> None:
        log.write(json.dumps([int(replica), [int(i) for i in np.asarray(indices).reshape(-1)]]) + "\n")
        log.flush()

    class Recorder(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = keras.layers.Dense(4, activation="relu")
            self.out = keras.layers.Dense(1)

        def call(self, inputs):
            return self.out(self.hidden(inputs["x"]))

        if backend == "jax":

            def train_step(self, state, data):
                import jax

                jax.debug.callback(record, data[0]["i"], ordered=True)
                return super().train_step(state, data)

        else:

            def train_step(self, data):
                replica = tf.distribute.get_replica_context().replica_id_in_sync_group
                tf.py_function(record, [data[0]["i"], replica], [])
                return super().train_step(data)

    batch_in_feeder = args.batch_in == "feeder" or backend != "tensorflow"
    feeder = mpfeed.Feeder(
        Indexed(args.length),
        workers=2,
        shuffle=True,
        seed=7,
        ordered=bool(args.ordered),
        batch_size=args.batch if batch_in_feeder else None,
        drop_remainder=args.drop_remainder and batch_in_feeder,
    )
    validation = None
    if args.validation:
        validation = mpfeed.Feeder(Indexed(48), workers=1, batch_size=args.batch)

    def build():
        model = Recorder()
        model.compile(
            keras.optimizers.SGD(0.05),
            "mse",
            steps_per_execution=args.steps_per_execution,
            jit_compile=False,
        )
        model({"x": np.zeros((1, 8), np.float32), "i": np.zeros((1,), np.int64)})
        return model

    if args.strategy == "mirrored":
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            model = build()
    else:
        model = build()

    if backend == "tensorflow":
        data = feeder.dataset()
        if not batch_in_feeder:
            if args.steps_per_epoch:
                data = data.repeat()
            data = data.batch(args.batch, drop_remainder=args.drop_remainder)
        elif args.steps_per_epoch:
            data = data.repeat()
        data = data.prefetch(3)
        validation_data = validation.dataset() if validation is not None else None
    else:
        data = mpfeed.keras.PyDataset(feeder)
        validation_data = mpfeed.keras.PyDataset(validation) if validation is not None else None

    class Kill(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            # the first step at or past the one asked for (steps_per_execution reports every n-th)
            epoch, step = map(int, args.kill_at.split(":")) if args.kill_at else (-1, 0)
            if self.epoch == epoch and batch >= step:
                os.kill(os.getpid(), signal.SIGKILL)

    callbacks: list = []
    initial_epoch = args.initial_epoch
    if args.start:  # as a tf.train.Checkpoint with mpfeed.tf.FeederState restores it, before fit()
        epoch, consumed = map(int, args.start.split(":"))
        feeder.load_state_dict(feeder.state_dict(consumed=consumed, epoch=epoch))
    save_freq = args.save_freq if args.save_freq == "epoch" else int(args.save_freq)
    if args.way == "backup":
        backup = mpfeed.keras.BackupAndRestore(
            feeder, args.dir, save_freq=save_freq, delete_checkpoint=args.delete_checkpoint
        )
        callbacks.append(backup)
        if args.kill_in_save is not None:
            saves = [0]
            save_weights = model.save_weights

            def save_then_die(*a, **k):
                save_weights(*a, **k)
                saves[0] += 1
                if saves[0] == args.kill_in_save:
                    os.kill(os.getpid(), signal.SIGKILL)

            model.save_weights = save_then_die
    elif args.way == "checkpoint":
        os.makedirs(args.dir, exist_ok=True)
        done = sorted(
            int(name.split(".")[0]) for name in os.listdir(args.dir) if name.endswith(".weights.h5")
        )
        if done:
            model.load_weights(os.path.join(args.dir, f"{done[-1]}.weights.h5"))
            initial_epoch = done[-1]
        path = os.path.join(args.dir, "{epoch}.weights.h5")
        callbacks += [
            mpfeed.keras.EpochSync(feeder),
            keras.callbacks.ModelCheckpoint(path, save_weights_only=True),
        ]
    if args.sync:
        callbacks.append(mpfeed.keras.EpochSync(feeder))
    if args.validate_on_training_data:
        validation_data = data
    callbacks.append(Kill())
    fits = [(initial_epoch, args.epochs)]
    if args.split_fit:
        fits = [(initial_epoch, initial_epoch + 1), (initial_epoch + 1, args.epochs)]
    for first, end in fits:
        model.fit(
            data,
            epochs=end,
            steps_per_epoch=args.steps_per_epoch,
            initial_epoch=first,
            validation_data=validation_data,
            callbacks=callbacks,
            verbose=0,
        )
    log.close()
    if args.weights:
        np.savez(args.weights, *[np.asarray(w) for w in model.get_weights()])
    print("tensorflow imported:", sys.modules.get("tensorflow") is not None, flush=True)
    feeder.close()
    if validation is not None:
        validation.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
