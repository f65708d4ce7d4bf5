"""Training with Keras: the loop owns the epoch and the position, the feeder follows.

Keras counts epochs and steps of its own, and tf.data prefetches ahead of the model, so the feeder can
neither infer the epoch from passes over its iterator nor take what it handed out for what the model
consumed. These callbacks tell it both:

- `EpochSync(feeder)`: the feeder's epoch follows Keras's (``fit(initial_epoch=k)`` trains epoch k on the
  feeder's epoch k, whatever peeks, strategies or validation passes came before);
- `BackupAndRestore(feeder, backup_dir, ...)`: Keras's callback, with the feeder's exact position saved
  beside the model and restored with it, atomically; a restart trains on exactly the stream the
  uninterrupted run would have;
- `PyDataset(feeder)`: a `keras.utils.PyDataset` over a batching feeder, for Keras on any backend.

How many feeder records make one Keras step, and whether the feeder's epochs follow Keras's or run as
one stream (``.repeat()`` with ``steps_per_epoch``), is read off the dataset ``fit`` trains on when
training begins (`Plan`). This module imports Keras, never TensorFlow.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import threading
from dataclasses import dataclass
from typing import Any

import keras

from .feeder import Feeder

__all__ = ["BackupAndRestore", "EpochSync", "Plan", "PyDataset"]

# tf.data transformations that pass every record through, one for one (by class name: this module does
# not import TensorFlow).
_ONE_FOR_ONE = {
    "_MapDataset",
    "_ParallelMapDataset",
    "_PrefetchDataset",
    "_OptionsDataset",
    "_MaxIntraOpParallelismDataset",
    "_PrivateThreadPoolDataset",
    "_ModelDataset",
}
_BATCHES = {"_BatchDataset", "_ParallelBatchDataset", "_PaddedBatchDataset"}
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_log = logging.getLogger("mpfeed")


@dataclass(frozen=True)
class Plan:
    """How Keras's steps map onto the feeder's records, read off the dataset ``fit`` trains on."""

    records_per_step: int
    """Feeder records in one step: the ``batch`` after ``dataset()``, or 1 (a batching feeder)."""
    drop_remainder: bool
    """Whether that batch drops an epoch's short last one."""
    stream: str | None
    """None: one pass of the feeder per Keras epoch. ``"across"``: ``.repeat()`` before the batch, so
    batches run on across the feeder's epochs; ``"within"``: ``.batch()`` before ``.repeat()``, so each
    feeder epoch ends with its own short batch. Keras's epochs then are ``steps_per_epoch`` steps of one
    stream that began at the feeder's epoch 0."""


class EpochSync(keras.callbacks.Callback):
    """Keeps the feeder's epoch equal to Keras's: ``fit(..., callbacks=[mpfeed.keras.EpochSync(feeder)])``.

    With it, ``fit(initial_epoch=k)`` (after restoring a `ModelCheckpoint`) trains epoch k on the feeder's
    epoch k, and a peek (Keras under a `tf.distribute` strategy takes one batch before training), a
    ``take`` or validation on the same feeder shift nothing. With ``.repeat()`` and ``steps_per_epoch``,
    Keras epoch ``e`` step ``s`` trains on the stream's records from ``(e * steps_per_epoch + s) *
    records_per_step`` on, the stream starting at the feeder's epoch 0.
    """

    def __init__(self, feeder: Feeder) -> None:
        super().__init__()
        if not isinstance(feeder, Feeder):
            raise TypeError(f"EpochSync takes a mpfeed.Feeder, got {type(feeder).__name__}")
        self.feeder = feeder
        self.plan: Plan | None = None
        self._epoch = 0
        self._placed = False

    def on_train_begin(self, logs: Any = None) -> None:
        self.plan = _read_plan(self.feeder)
        self._placed = False

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch = epoch
        plan = self._require_plan()
        if plan.stream is None:
            self.feeder.set_epoch(epoch)
        elif not self._placed:  # one stream for the whole fit(): place it once, where this epoch begins
            self.place(epoch, 0)
        self._placed = True

    def resumed(self) -> None:
        """A position was loaded for this fit(): with one stream, that is where it goes on."""
        if self._require_plan().stream is not None:
            self._placed = True

    def place(self, epoch: int, steps: int) -> None:
        """Make the feeder's next pass start where Keras epoch ``epoch`` stands after ``steps`` steps."""
        feeder_epoch, consumed = self.position(epoch, steps)
        self.feeder.set_epoch(feeder_epoch)
        if consumed:
            self.feeder.load_state_dict(self.feeder.state_dict(consumed=consumed, epoch=feeder_epoch))

    def position(self, epoch: int, steps: int) -> tuple[int, int]:
        """``(feeder epoch, records of it consumed)`` once Keras epoch ``epoch`` has run ``steps`` steps."""
        plan = self._require_plan()
        per_step = plan.records_per_step
        if plan.stream is None:
            return epoch, steps * per_step
        records = len(self.feeder)
        keras_steps = self.params.get("steps")
        if not keras_steps:
            raise ValueError("with .repeat(), fit() needs steps_per_epoch")
        step = epoch * keras_steps + steps  # steps since the stream began
        if plan.stream == "across":
            passed, consumed = divmod(step * per_step, records)
            return passed, consumed
        per_epoch = records // per_step if plan.drop_remainder else -(-records // per_step)
        passed, within = divmod(step, per_epoch)
        return passed, min(within * per_step, records)

    def steps_done(self, end_step: int) -> int:
        """Steps of the current Keras epoch done after the execution that ended at ``end_step`` (an
        execution of ``steps_per_execution`` steps stops early at the end of a finite epoch)."""
        done = end_step + 1
        steps = self.params.get("steps")
        if self._require_plan().stream is None and steps:
            done = min(done, steps)
        return done

    def _require_plan(self) -> Plan:
        if self.plan is None:
            self.plan = _read_plan(self.feeder)
        return self.plan


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras's `BackupAndRestore`, with the feeder's exact position saved beside the model.

    ``model.fit(feeder.dataset(), epochs=n, callbacks=[mpfeed.keras.BackupAndRestore(feeder, "backup/")])``:
    after a preemption (a SIGKILL at any step, during a backup's write too), the same call trains on from
    the last backup, on exactly the records the uninterrupted run would have, none repeated and none
    skipped, with later epochs whole: the interrupted epoch goes on from the step it had reached (Keras's
    own callback redoes it from step 0), and the feeder from the records the model had consumed. Keras's
    arguments keep their meaning; ``save_freq`` counts steps. It includes `EpochSync`.

    Each backup is a directory written aside and renamed into place, so a kill while one is written
    leaves the previous one whole; ``double_checkpoint=True`` keeps the one before that too.
    """

    def __init__(
        self,
        feeder: Feeder,
        backup_dir: str,
        save_freq: str | int = "epoch",
        double_checkpoint: bool = False,
        delete_checkpoint: bool = True,
    ) -> None:
        super().__init__(
            backup_dir,
            save_freq=save_freq,
            double_checkpoint=double_checkpoint,
            delete_checkpoint=delete_checkpoint,
        )
        self.feeder = feeder
        self.sync = EpochSync(feeder)
        self._skip = 0  # steps of the restored epoch done before the backup: not trained again
        self._restore_train_function: Any = None

    def set_model(self, model: Any) -> None:
        super().set_model(model)
        self.sync.set_model(model)

    def set_params(self, params: Any) -> None:
        super().set_params(params)
        self.sync.set_params(params)

    def on_train_begin(self, logs: Any = None) -> None:
        self.sync.on_train_begin(logs)
        if not self.model.built:
            raise ValueError(
                "To use BackupAndRestore, the model must be built before fit(): call it on a batch or "
                "build it with keras.Input"
            )
        self._skip = 0
        for name in os.listdir(self.backup_dir) if os.path.isdir(self.backup_dir) else []:
            if name.startswith(".writing-"):  # a backup a kill interrupted: never renamed into place
                shutil.rmtree(os.path.join(self.backup_dir, name), ignore_errors=True)
        backups = _backups(self.backup_dir)
        for directory in reversed(backups):  # the newest first; an older one if it cannot be read
            try:
                self._restore(directory)
                return
            except (OSError, ValueError, KeyError) as error:
                if directory == backups[0]:
                    raise
                _log.warning("backup %s could not be restored (%s); trying an older one", directory, error)

    def _restore(self, directory: str) -> None:
        with open(os.path.join(directory, "training.json")) as file:
            meta = json.load(file)
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        self.model.load_weights(os.path.join(directory, "model.weights.h5"))
        epoch, steps = int(meta["epoch"]), int(meta["steps"])
        self.model._initial_epoch = epoch
        self._current_epoch = epoch
        self.feeder.load_state_dict(meta["feeder"])
        self.sync.resumed()
        if steps:
            self._skip_steps(steps)

    def _skip_steps(self, steps: int) -> None:
        """Make the first ``steps`` steps of the restored epoch no-ops that take no data: they were trained
        before the backup, and Keras numbers the epoch's steps from 0 again. (Keras's train function pulls
        each step's data itself, on every backend, so a step that does not run it takes none.)"""
        per_call = max(1, int(getattr(self.model, "steps_per_execution", 1) or 1))
        if steps % per_call:
            raise ValueError(f"a backup after {steps} steps does not fit steps_per_execution={per_call}")
        model, calls = self.model, [steps // per_call]
        original = model.train_function
        jax = keras.backend.backend() == "jax"

        def skipped(*args: Any) -> Any:
            calls[0] -= 1
            if calls[0] <= 0:
                model.train_function = original
            return ({}, args[0]) if jax else {}

        def restore() -> None:
            if model.train_function is skipped:
                model.train_function = original

        model.train_function = skipped
        self._skip = steps
        self._restore_train_function = restore

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.sync.on_epoch_begin(epoch, logs)
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if batch < self._skip:  # a step done before the backup
            return
        if self._should_save_on_batch(batch):
            steps = self.sync.steps_done(batch)
            if steps == self.params.get("steps"):  # the epoch's last step: the next one's start
                self._save(self._epoch + 1, 0)
            else:
                self._save(self._epoch, steps)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._skip = 0
        self._current_epoch = epoch + 1
        self._last_batch_seen = 0
        if self.save_freq == "epoch":
            self._save(epoch + 1, 0)

    def on_train_end(self, logs: Any = None) -> None:
        if self._restore_train_function is not None:
            self._restore_train_function()
        super().on_train_end(logs)

    def _save(self, epoch: int, steps: int) -> None:
        """Write a backup aside, then rename it into place: the last whole backup survives any kill."""
        feeder_epoch, consumed = self.sync.position(epoch, steps)
        meta = {
            "epoch": epoch,
            "steps": steps,
            "feeder": self.feeder.state_dict(consumed=consumed, epoch=feeder_epoch),
        }
        os.makedirs(self.backup_dir, exist_ok=True)
        existing = _backups(self.backup_dir)
        number = _number(existing[-1]) + 1 if existing else 0
        staging = os.path.join(self.backup_dir, f".writing-{number}")
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        weights = os.path.join(staging, "model.weights.h5")
        self.model.save_weights(weights)
        with open(weights, "rb") as file:  # on disk before the rename, should the machine go down
            os.fsync(file.fileno())
        with open(os.path.join(staging, "training.json"), "w") as file:
            json.dump(meta, file)
            file.flush()
            os.fsync(file.fileno())
        _fsync_directory(staging)
        os.replace(staging, os.path.join(self.backup_dir, f"checkpoint-{number}"))
        _fsync_directory(self.backup_dir)
        keep = 2 if self.double_checkpoint else 1
        for old in existing[: max(0, len(existing) + 1 - keep)]:
            shutil.rmtree(old, ignore_errors=True)


class PyDataset(keras.utils.PyDataset):
    """A `keras.utils.PyDataset` over a batching feeder (``batch_size`` set), for Keras on any backend:
    ``model.fit(mpfeed.keras.PyDataset(feeder), epochs=n)`` with ``KERAS_BACKEND=jax`` never imports
    TensorFlow.

    ``len()`` is the feeder's batches per epoch, and each Keras epoch trains on the feeder's epoch of the
    same number (with `EpochSync` or `BackupAndRestore`, which this works with as on TensorFlow), every
    element once. mpfeed owns the order and the workers: the index Keras asks for, Keras's ``shuffle``
    and its worker options change nothing, since batch ``i`` of the epoch is simply the next one.
    """

    def __init__(self, feeder: Feeder) -> None:
        super().__init__(workers=1, use_multiprocessing=False)
        if not isinstance(feeder, Feeder):
            raise TypeError(f"PyDataset takes a mpfeed.Feeder, got {type(feeder).__name__}")
        if feeder.batch_size is None:
            raise ValueError(
                "PyDataset hands Keras one record per step, so the feeder must batch: "
                "mpfeed.Feeder(..., batch_size=B)"
            )
        self.feeder = feeder
        self._batches = len(feeder)
        self._lock = threading.Lock()
        self._iterator: Any = None

    @property
    def num_batches(self) -> int:
        return self._batches

    def __len__(self) -> int:
        return self._batches

    def __getitem__(self, index: int) -> Any:
        with self._lock:
            if self._iterator is None:
                self._iterator = iter(self.feeder)
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise IndexError("the feeder's epoch has no more batches") from None
        return tuple(batch) if isinstance(batch, list) else batch

    def on_epoch_begin(self) -> None:
        with self._lock:
            self._iterator = None

    def on_epoch_end(self) -> None:
        with self._lock:
            self._iterator = None


def _read_plan(feeder: Feeder) -> Plan:
    """Find the dataset ``fit`` trains on (a local of Keras's ``fit``: Keras hands callbacks no
    reference to it) and read the plan off it."""
    adapter = _training_adapter()
    if adapter is None:
        raise RuntimeError("mpfeed.keras callbacks work inside model.fit(), which was not found on the stack")
    dataset = getattr(adapter, "py_dataset", None)
    if isinstance(dataset, PyDataset):
        _require(dataset.feeder is feeder, "fit() trains on a PyDataset of another feeder")
        return Plan(1, False, None)
    dataset = getattr(adapter, "_dataset", None)
    if dataset is None:
        raise TypeError(
            "fit() trains on neither feeder.dataset() nor mpfeed.keras.PyDataset(feeder), so mpfeed cannot "
            f"count what the model consumed (got {type(adapter).__name__})"
        )
    batches: list[tuple[int, bool]] = []
    ops: list[str] = []
    node = dataset
    while getattr(node, "_mpfeed_feeder", None) is None:
        name = type(node).__name__
        if name in _BATCHES:
            batches.append((int(node._batch_size), bool(node._drop_remainder)))
            ops.append("batch")
        elif name == "_RepeatDataset":
            _require(int(node._count) == -1, "mpfeed counts steps through .repeat() only without a count")
            ops.append("repeat")
        elif name not in _ONE_FOR_ONE:
            raise ValueError(
                f"the dataset fit() trains on applies {name.strip('_')} after feeder.dataset(), so mpfeed "
                "cannot tell which records a step consumed: keep to map, batch, repeat and prefetch after "
                "it (shuffle with Feeder(shuffle=True), filter in the source)"
            )
        node = getattr(node, "_input_dataset", None)
        if node is None:
            raise TypeError("the dataset fit() trains on was not made by this feeder's dataset()")
    _require(node._mpfeed_feeder is feeder, "fit() trains on the dataset of another feeder")
    _require(len(batches) <= 1, "mpfeed counts steps through at most one .batch() after feeder.dataset()")
    size, drop = batches[0] if batches else (1, False)
    stream = None
    if "repeat" in ops:
        _require(ops.count("repeat") == 1, "mpfeed counts steps through at most one .repeat()")
        # ops run from the model down to the feeder: a repeat listed after the batch lies below it.
        stream = "across" if "batch" in ops and ops.index("repeat") > ops.index("batch") else "within"
        if not batches:
            stream = "across"
        try:
            len(feeder)
        except TypeError:
            raise ValueError(
                "with .repeat(), mpfeed places Keras's steps in the feeder's epochs by their length, which a "
                "generator source has not: use a random-access source, or one pass per epoch"
            ) from None
    return Plan(size, drop, stream)


def _training_adapter() -> Any:
    frame: Any = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "fit":
            iterator = frame.f_locals.get("epoch_iterator")
            adapter = getattr(iterator, "data_adapter", None)
            if adapter is not None:
                return adapter
        frame = frame.f_back
    return None


def _backups(directory: str) -> list[str]:
    """The whole backups in ``directory``, oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    numbered = sorted((_number(name), name) for name in names if _CHECKPOINT.match(name))
    return [os.path.join(directory, name) for _, name in numbered]


def _number(path: str) -> int:
    return int(os.path.basename(path).rpartition("-")[2])


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
