"""Module-level sources for the cache tests (workers import them by name): JPEGs decoded with Pillow in
``load``, cropped and flipped at random in ``augment``."""

from __future__ import annotations

import io
import os
import signal
import time

import numpy as np
from PIL import Image

CROP = 32


def make_jpegs(count: int, seed: int = 0, size: tuple[int, int] = (64, 48)) -> list[bytes]:
    """``count`` JPEGs of smooth random pictures (quality 90), each different."""
    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(count):
        small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        picture = Image.fromarray(small).resize(size, Image.BILINEAR)
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


class Jpegs:
    """``load(i)`` decodes JPEG i (and notes the call in ``log``, a file every worker appends to);
    ``augment`` takes a random 32x32 crop, flips it at random and keeps the label."""

    def __init__(self, jpegs: list[bytes], log: str | None = None) -> None:
        self.jpegs = jpegs
        self.log = log

    def __len__(self) -> int:
        return len(self.jpegs)

    def load(self, index: int) -> dict:
        if self.log is not None:
            fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, f"{index} {os.getpid()}\n".encode())
            finally:
                os.close(fd)
        image = np.asarray(Image.open(io.BytesIO(self.jpegs[index])).convert("RGB"))
        return {"image": image, "label": index, "name": f"image-{index}.jpg"}

    def augment(self, sample: dict, rng: np.random.Generator) -> tuple:
        image = sample["image"]
        top = int(rng.integers(0, image.shape[0] - CROP + 1))
        left = int(rng.integers(0, image.shape[1] - CROP + 1))
        crop = image[top : top + CROP, left : left + CROP]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        return np.ascontiguousarray(crop), sample["label"], sample["name"]


class _KillsWhenWritten(np.ndarray):
    """An array whose bytes cannot be read: the process that tries (to write a record of it) is killed."""

    def tobytes(self, order="C"):  # noqa: ARG002 - numpy's signature
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


class KilledMidWrite(Jpegs):
    """As `Jpegs`, but sample ``victim`` kills its worker while the record is written into the cache."""

    def __init__(self, jpegs: list[bytes], victim: int) -> None:
        super().__init__(jpegs)
        self.victim = victim

    def load(self, index: int) -> dict:
        sample = super().load(index)
        if index == self.victim:
            sample["image"] = sample["image"].view(_KillsWhenWritten)
        return sample


class _SleepsWhenWritten(np.ndarray):
    """An array whose record takes a minute to write: the writer says so on stdout, then sleeps."""

    def tobytes(self, order="C"):  # noqa: ARG002 - numpy's signature
        print("writing", flush=True)
        time.sleep(60)
        raise AssertionError("a test kills the writer long before")


def in_write(how: str, shape: tuple[int, ...] = (48, 64, 3)) -> dict:
    """A sample whose record write kills (``how="killed"``) or stalls (``"stalled"``) its writer."""
    kind = _KillsWhenWritten if how == "killed" else _SleepsWhenWritten
    return {"image": np.zeros(shape, dtype=np.uint8).view(kind), "label": 0, "name": "stalled"}


class LoadsObjects(Jpegs):
    """``load`` returns a sample with a leaf that mpfeed cannot carry (augment would turn it into one)."""

    def load(self, index: int) -> dict:
        sample = super().load(index)
        sample["name"] = {index}
        return sample
