"""Decode and augment a folder of JPEGs in mpfeed workers, and train a small Keras model on them.

    python scripts/decode_images.py                          # a generated sample folder
    python scripts/decode_images.py --dir ~/pictures --workers 4 --steps 100

The folder holds one subfolder per class (``cats/001.jpg``, ``dogs/002.jpg``, ...) or just JPEGs (one
class). The same job runs twice, once fed by plain `tf.data.Dataset.from_generator` and once by mpfeed,
beside the model alone on a cached batch, which shows how fast training could go if input were free.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

import mpfeed  # noqa: E402

SAMPLE_DIR = Path(tempfile.gettempdir()) / "mpfeed-sample-images"
SKIP_STEPS = 5  # the first steps trace the model and fill the pipeline: not timed


# -- what runs in the workers --------------------------------------------------------------------------------
# Workers import this file but never TensorFlow: mpfeed answers `import tensorflow` there with a stand-in.


def load_image(path: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Decode, random crop (50-100% of the area, aspect 3:4 to 4:3), random flip, resize."""
    with Image.open(path) as image:
        image = image.convert("RGB")
    width, height = image.size
    area = width * height * rng.uniform(0.5, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_w = min(width, round(math.sqrt(area * aspect)))
    crop_h = min(height, round(math.sqrt(area / aspect)))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    image = image.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))


def decode_shard(paths: list[str], labels: list[int], size: int, shard: mpfeed.Shard):
    """mpfeed's source: this worker's share of the files, in a fresh order every epoch."""
    rng = np.random.default_rng(shard.seed)
    mine = list(range(shard.index, len(paths), shard.count))
    for i in rng.permutation(mine):
        yield load_image(paths[i], size, rng), np.int64(labels[i])


# -- the two input pipelines ---------------------------------------------------------------------------------


def mpfeed_feeder(paths, labels, size, batch, workers) -> mpfeed.Feeder:
    # Workers stack whole batches in shared memory; each pass over feeder.dataset() is one epoch.
    return mpfeed.Feeder(
        decode_shard, args=(paths, labels, size), workers=workers, batch_size=batch, drop_remainder=True
    )


def plain_dataset(paths, labels, size, batch) -> tf.data.Dataset:
    def generate():
        rng = np.random.default_rng()
        for i in rng.permutation(len(paths)):
            yield load_image(paths[i], size, rng), np.int64(labels[i])

    signature = (tf.TensorSpec((size, size, 3), tf.uint8), tf.TensorSpec((), tf.int64))
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    return dataset.batch(batch, drop_remainder=True).repeat().prefetch(tf.data.AUTOTUNE)


# -- training and timing -------------------------------------------------------------------------------------


def small_model(size: int, classes: int) -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((size, size, 3), dtype="uint8"),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(64, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(classes),
        ]
    )
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def train_rate(dataset: tf.data.Dataset, size: int, classes: int, steps: int, batch: int) -> float:
    """Images per second through ``model.fit``, after the first steps."""
    times: list[float] = []
    clock = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda step, logs: times.append(time.perf_counter())
    )
    model = small_model(size, classes)
    # shuffle=False: the pipelines shuffle themselves (Keras ignores shuffle for a tf.data.Dataset).
    model.fit(dataset, steps_per_epoch=steps, epochs=1, callbacks=[clock], shuffle=False, verbose=0)
    timed = times[SKIP_STEPS - 1 :]
    return (len(timed) - 1) * batch / (timed[-1] - timed[0])


def input_rate(dataset: tf.data.Dataset, batches: int, batch: int) -> float:
    """Images per second of the pipeline alone, read by a Python loop, after the first batches."""
    iterator = iter(dataset)
    for _ in range(SKIP_STEPS):
        next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)[0].numpy()
    return batches * batch / (time.perf_counter() - started)


def verdict(share: float, input_alone: float, model_alone: float) -> str:
    if share >= 0.9:
        return "input keeps up"
    if input_alone < model_alone:
        return "input-bound: the pipeline alone is slower than the model"
    return "sharing cores: the pipeline is fast enough alone, but its workers and training compete for CPU"


# -- the folder ----------------------------------------------------------------------------------------------


def list_images(folder: Path) -> tuple[list[str], list[int], int]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"no .jpg files under {folder}")
    classes = sorted({p.parent.name for p in files})
    return [str(p) for p in files], [classes.index(p.parent.name) for p in files], len(classes)


def make_sample_folder(folder: Path, count: int = 640, classes: int = 4) -> None:
    """Smooth random pictures of about 500x375, quality 90, tinted by class."""
    rng = np.random.default_rng(0)
    for k in range(count):
        label = k % classes
        width, height = int(rng.integers(440, 560)), int(rng.integers(330, 420))
        coarse = rng.integers(0, 200, size=(9, 12, 3)).astype(np.uint8)
        coarse[..., label % 3] += np.uint8(55)
        picture = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        target = folder / f"class{label}" / f"{k:04d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        picture.save(target, quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description="Decode JPEGs in mpfeed workers while a Keras model trains.")
    parser.add_argument("--dir", type=Path, help=f"folder of JPEGs (default: a sample made in {SAMPLE_DIR})")
    parser.add_argument("--workers", type=int, default=None, help="mpfeed workers (default: usable cores)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224, help="side of the training images")
    args = parser.parse_args()

    folder = args.dir
    if folder is None:
        folder = SAMPLE_DIR
        if not any(folder.rglob("*.jpg")):
            print(f"making sample JPEGs in {folder} ...")
            make_sample_folder(folder)
    paths, labels, classes = list_images(folder)
    steps = max(args.steps, SKIP_STEPS + 2)
    print(f"{len(paths)} images, {classes} classes, batches of {args.batch}, {steps} steps per run")

    one_batch = next(iter(plain_dataset(paths, labels, args.size, args.batch)))
    cached = tf.data.Dataset.from_tensors(one_batch).repeat()
    model_alone = train_rate(cached, args.size, classes, steps, args.batch)
    print(f"model alone, on one cached batch: {model_alone:,.0f} images/s")

    def report(name: str, dataset: tf.data.Dataset) -> None:
        alone = input_rate(dataset, batches=steps, batch=args.batch)
        training = train_rate(dataset, args.size, classes, steps, args.batch)
        share = training / model_alone
        row = f"{name:<24} {alone:>9,.0f} i/s {training:>6,.0f} i/s {share:>14.0%}  "
        print(row + verdict(share, alone, model_alone))

    print(f"\n{'input pipeline':<24} {'input alone':>13} {'training':>10} {'of model alone':>15}")
    report("tf.data from_generator", plain_dataset(paths, labels, args.size, args.batch))
    with mpfeed_feeder(paths, labels, args.size, args.batch, args.workers) as feeder:
        report(f"mpfeed, {feeder.workers} workers", feeder.dataset().repeat().prefetch(2))
        print("\nmpfeed's own diagnosis, feeder.report() (its recent window is mostly the training run):")
        print(textwrap.indent(feeder.report(), "  "))


if __name__ == "__main__":
    main()
