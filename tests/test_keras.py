"""Keras owns the epoch: real `model.fit` jobs (tests/fit_job.py) are killed with SIGKILL at random steps,
in the last batch of an epoch and in the middle of a backup's write, run again, and must train on exactly
the element stream of a run that was never interrupted, and end with exactly its weights."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("keras")

JOB = Path(__file__).resolve().parent / "fit_job.py"
LENGTH, BATCH = 200, 16
_RUN_TIMEOUT_S = 240


def _run(tmp_path: Path, name: str, *args: str, backend: str = "tensorflow") -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "KERAS_BACKEND": backend,
    }
    command = [
        sys.executable,
        str(JOB),
        "--dir",
        str(tmp_path / name),
        "--log",
        str(tmp_path / f"{name}.log"),
    ]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=_RUN_TIMEOUT_S, env=env)


def _steps(path: Path, replicas: int) -> list[tuple[int, ...]]:
    """The batches trained on, one per step (a step's replicas each log their part)."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    steps = []
    for start in range(0, len(lines), replicas):
        parts = sorted(lines[start : start + replicas])
        steps.append(tuple(i for _, part in parts for i in part))
    return steps


def _backup_point(directory: Path, steps_per_epoch: int) -> int:
    """Steps trained at the newest whole backup (what a restart goes on from)."""
    backups = list(directory.glob("checkpoint-*"))
    if not backups:  # killed before the first backup: a restart begins again
        return 0
    newest = max(backups, key=lambda p: int(p.name.rpartition("-")[2]))
    meta = json.loads((newest / "training.json").read_text())
    return meta["epoch"] * steps_per_epoch + meta["steps"]


def _weights(path: Path) -> list[np.ndarray]:
    with np.load(path) as saved:
        return [saved[name] for name in saved.files]


def _preempted(tmp_path: Path, kills: list[list[str]], args: list[str], per_epoch: int, **kw):
    """Run the job, killing it as each of ``kills`` says, then to the end: the stream that made the final
    weights (what each restart went on from, then what it trained) and those weights."""
    replicas = 2 if "mirrored" in args else 1
    effective: list[tuple[int, ...]] = []
    seen = 0
    for number, kill in enumerate([*kills, []]):
        if number:
            effective = effective[: _backup_point(tmp_path / "killed", per_epoch)]
        final = [] if kill else ["--weights", str(tmp_path / "resumed.npz")]
        result = _run(tmp_path, "killed", *args, *kill, *final, **kw)
        expected = -signal.SIGKILL if kill else 0
        assert result.returncode == expected, f"run {number} ({kill}): {result.stderr[-4000:]}"
        assert "ran out of data" not in result.stderr, result.stderr[-2000:]
        steps = _steps(tmp_path / "killed.log", replicas)
        effective += steps[seen:]
        seen = len(steps)
    return effective, _weights(tmp_path / "resumed.npz")


def _uninterrupted(tmp_path: Path, args: list[str], **kw):
    result = _run(tmp_path, "whole", *args, "--weights", str(tmp_path / "whole.npz"), **kw)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ran out of data" not in result.stderr, result.stderr[-2000:]
    replicas = 2 if "mirrored" in args else 1
    return _steps(tmp_path / "whole.log", replicas), _weights(tmp_path / "whole.npz"), result


def _kills(seed: int, per_epoch: int, epochs: int, count: int) -> list[list[str]]:
    """Kills at a random step of the first epochs, in the middle of a backup's write (the first or second
    of the next run), and, with three, in the last batch of the last epoch."""
    rng = random.Random(seed)
    chosen = [
        ["--kill-at", f"{rng.randrange(2)}:{rng.randrange(1, per_epoch - 1)}"],
        ["--kill-in-save", str(rng.randrange(1, 3))],
        ["--kill-at", f"{epochs - 1}:{per_epoch - 1}"],
    ]
    return chosen[:count]


SCENARIOS = {
    # name: (job arguments, Keras steps per epoch, kills)
    "batch after dataset(), short last batch": ([], 13, 3),
    "first-ready feeder batches, drop_remainder, steps_per_execution=2": (
        ["--batch-in", "feeder", "--drop-remainder", "--ordered", "0", "--steps-per-execution", "2"]
        + ["--save-freq", "4"],
        12,
        2,
    ),
    "repeat() with steps_per_epoch": (["--steps-per-epoch", "7", "--epochs", "4"], 7, 2),
    # (a py_function that logs the replica inside steps_per_execution's loop fails under a strategy)
    "MirroredStrategy over two CPUs, validation from a second feeder": (
        ["--strategy", "mirrored", "--validation"],
        13,
        2,
    ),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_backup_and_restore_resumes_a_killed_fit_on_the_very_same_stream(tmp_path, scenario):
    args, per_epoch, count = SCENARIOS[scenario]
    seed = random.randrange(1 << 30)
    whole, expected_weights, _ = _uninterrupted(tmp_path, args)
    epochs = int(args[args.index("--epochs") + 1]) if "--epochs" in args else 3
    assert len(whole) == per_epoch * epochs
    kills = _kills(seed, per_epoch, epochs, count)
    effective, weights = _preempted(tmp_path, kills, args, per_epoch)
    if "--ordered" in args:  # first ready: which record comes first depends on the workers' timing
        for epoch in range(epochs):
            part = slice(epoch * per_epoch, (epoch + 1) * per_epoch)
            trained = sorted(i for step in effective[part] for i in step)
            assert trained == sorted(i for step in whole[part] for i in step), f"seed {seed}, {kills}"
        assert len(effective) == len(whole)
        print(f"{scenario}, kills {kills}: every epoch's elements trained once, {len(whole)} steps")
        return
    same = sum(a == b for a, b in zip(effective, whole))
    gap = max(float(np.abs(got - want).max()) for got, want in zip(weights, expected_weights))
    print(f"{scenario}, kills {kills}: {same} of {len(whole)} steps identical, weights differ by {gap}")
    assert effective == whole, f"seed {seed}, kills {kills}: {same} of {len(whole)} steps identical"
    for got, want in zip(weights, expected_weights):
        np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}, kills {kills}")
    if "--steps-per-epoch" not in args:  # one pass per epoch: each is the whole data set, shuffled anew
        orders = [sum(whole[e * per_epoch : (e + 1) * per_epoch], ()) for e in range(epochs)]
        expected = LENGTH - LENGTH % BATCH if "--drop-remainder" in args else LENGTH
        assert all(len(set(order)) == len(order) == expected for order in orders)
        assert len({order for order in orders}) == epochs


def test_a_backup_killed_mid_write_leaves_the_last_whole_one(tmp_path):
    """Keras's own callback, saving every step, left a file that failed to open at every restart."""
    result = _run(tmp_path, "job", "--save-freq", "1", "--kill-in-save", "5")
    assert result.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == [".writing-4", "checkpoint-3"]
    result = _run(tmp_path, "job", "--save-freq", "1", "--weights", str(tmp_path / "w.npz"))
    assert result.returncode == 0, result.stderr[-4000:]
    left = sorted(p.name for p in (tmp_path / "job").iterdir())
    assert len(left) == 1 and left[0].startswith("checkpoint-"), left  # the staged write was cleared


def test_model_checkpoint_with_initial_epoch_trains_each_epoch_on_its_own_order(tmp_path):
    """Old code: Keras epoch k got the feeder's epoch k-1 order (a restarted feeder counts from 0)."""
    args = ["--way", "checkpoint"]
    whole, expected_weights, _ = _uninterrupted(tmp_path, args)
    killed = _run(tmp_path, "killed", *args, "--kill-at", "1:5")
    assert killed.returncode == -signal.SIGKILL
    resumed = _run(tmp_path, "killed", *args, "--weights", str(tmp_path / "resumed.npz"))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    steps = _steps(tmp_path / "killed.log", 1)
    effective = steps[:13] + steps[13 + 6 :]  # epoch 1 is redone from its start, from epoch 1's weights
    assert effective == whole
    for got, want in zip(_weights(tmp_path / "resumed.npz"), expected_weights):
        np.testing.assert_array_equal(got, want)


def test_a_position_loaded_before_fit_survives_the_peek_of_a_strategy(tmp_path):
    """Old code: under MirroredStrategy Keras pulls one batch from a fresh iterator before training; the
    feeder counted that pass as an epoch, so a loaded position (epoch 1, element 96) was lost and the job
    trained a whole epoch 2 instead of the rest of epoch 1."""
    args = ["--way", "plain", "--strategy", "mirrored", "--epochs", "2", "--length", "600"]
    whole, _, _ = _uninterrupted(tmp_path, args)
    result = _run(tmp_path, "resumed", *args, "--start", "1:96", "--initial-epoch", "1")
    assert result.returncode == 0, result.stderr[-4000:]
    assert _steps(tmp_path / "resumed.log", 2) == whole[38 + 96 // BATCH :]


def test_validation_on_the_training_data_shifts_no_epoch(tmp_path):
    """Validating on the training feeder's own dataset opens a pass of its own after each epoch; with
    EpochSync the epochs trained on are those of a run without validation."""
    args = ["--way", "plain", "--sync"]
    whole, _, _ = _uninterrupted(tmp_path, args)
    result = _run(tmp_path, "validated", *args, "--validate-on-training-data")
    assert result.returncode == 0, result.stderr[-4000:]
    assert _steps(tmp_path / "validated.log", 1) == whole


@pytest.mark.parametrize("way", ["plain", "backup"])
def test_two_fit_calls_in_one_process_train_as_one(tmp_path, way):
    # (a backup left by the first fit() would be restored by the second, as Keras's own does: the
    # first one deletes it when it ends, Keras's default)
    args = ["--way", way, "--sync"] if way == "plain" else ["--way", way, "--delete-checkpoint"]
    whole, expected_weights, _ = _uninterrupted(tmp_path, args)
    result = _run(tmp_path, "split", *args, "--split-fit", "--weights", str(tmp_path / "split.npz"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert _steps(tmp_path / "split.log", 1) == whole
    for got, want in zip(_weights(tmp_path / "split.npz"), expected_weights):
        np.testing.assert_array_equal(got, want)


def test_keras_on_jax_trains_from_a_py_dataset_without_tensorflow_and_resumes_exactly(tmp_path):
    args = ["--save-freq", "4"]
    whole, expected_weights, result = _uninterrupted(tmp_path, args, backend="jax")
    assert "tensorflow imported: False" in result.stdout  # the job makes it unimportable
    assert len(whole) == 39 and all(len(step) == BATCH for step in whole[:12])
    orders = [sum(whole[e * 13 : (e + 1) * 13], ()) for e in range(3)]
    assert all(sorted(order) == list(range(LENGTH)) for order in orders)
    kills = [["--kill-at", "0:6"], ["--kill-in-save", "3"]]
    effective, weights = _preempted(tmp_path, kills, args, 13, backend="jax")
    assert effective == whole
    for got, want in zip(weights, expected_weights):
        np.testing.assert_array_equal(got, want)


def _keras_page_scripts(tmp_path: Path) -> dict[str, Path]:
    """docs/keras.md's scripts, beside the quick start's source, as files."""
    from test_readme import README, ROOT, quick_start_files

    scripts = {}
    for block in re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "keras.md").read_text(), re.S):
        name = re.fullmatch(r"# (\w+\.py)", block.splitlines()[0])
        assert name, f"each script names its file on its first line: {block.splitlines()[0]!r}"
        scripts[name.group(1)] = tmp_path / name.group(1)
        scripts[name.group(1)].write_text(block)
    (tmp_path / "points.py").write_text(quick_start_files(README.read_text())["points.py"])
    return scripts


def _script_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONUNBUFFERED": "1",
    }


def test_the_keras_page_scripts_run_as_written_and_resume(tmp_path):
    scripts = _keras_page_scripts(tmp_path)
    assert list(scripts) == ["fit.py", "preemptible.py", "resume_from_checkpoint.py"]

    def run(name: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, name],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env=_script_env(),
        )

    result = run("fit.py")
    assert result.returncode == 0 and "Epoch 3/3" in result.stdout, result.stderr[-3000:]
    assert "63/63" in result.stdout  # Keras knows the steps: the dataset declares its length

    # Killed once the last epoch is under way, then run again: it goes on from a backup of a later epoch.
    job = subprocess.Popen(
        [sys.executable, "preemptible.py"], cwd=tmp_path, stdout=subprocess.PIPE, text=True, env=_script_env()
    )
    assert job.stdout is not None
    for line in job.stdout:
        if "Epoch 3/3" in line:
            job.kill()
            break
    job.stdout.close()
    assert job.wait(timeout=60) == -signal.SIGKILL
    result = run("preemptible.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Epoch 1/3" not in result.stdout and "Epoch 3/3" in result.stdout, result.stdout[-3000:]

    result = run("resume_from_checkpoint.py")
    assert result.returncode == 0 and "Epoch 3/3" in result.stdout, result.stderr[-3000:]
    (tmp_path / "epoch-3.weights.h5").unlink()  # as if killed in the last epoch
    result = run("resume_from_checkpoint.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Epoch 2/3" not in result.stdout and "Epoch 3/3" in result.stdout, result.stdout[-3000:]
