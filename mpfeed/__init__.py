"""mpfeed: feed tf.data from slow Python code with every core.

    source[i], or                worker processes; a random-access source makes the tasks the consumer
    source(*args, shard)         hands out (dispatch), a generator its shard; never import TensorFlow
                                 (load(i) then augment(sample, rng): with cache_bytes, loaded samples
                                 stay once in memory every worker maps and augment reads; see cache)
          |  element (a nest of numpy arrays and scalars)
          v
    layout.Encoder ----------->  ring slot       one shared-memory ring per worker, depth slots,
          |                         |            64-byte-aligned leaves; free slots travel as credits
          | FILLED slot  (pipe)     |
          v                         v
    Feeder (consumer) ------->  read-only numpy views of the slot (zero copy)
          |                         |  the slot's credit returns when the last view dies
          v                         v
    Feeder.dataset() ------->  tf.data.Dataset.from_generator (TensorFlow aliases aligned arrays)

Control flows the other way: Feeder -> Supervisor -> workers (epochs, credits, stop). Processes start
through launcher (parent side) and bootstrap (child side), directly or from a fork server; the consumer
reads every pipe through a non-blocking channel, under the feeder's one lock.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    BrokenError,
    ClosedError,
    ElementError,
    MpfeedError,
    ShmSpaceError,
    SourceError,
    SupersededError,
    WorkerDiedError,
    WorkerError,
    WorkerStartError,
    WorkerTimeoutError,
)
from .shard import Shard, element_rng, element_seed, seekable

if TYPE_CHECKING:
    from .feeder import Feeder, FeederStats, WorkerStats
    from .generator_dataset import from_generator
    from .ray_backend import RayBackend

__all__ = [
    "BrokenError",
    "ClosedError",
    "ElementError",
    "Feeder",
    "FeederStats",
    "MpfeedError",
    "RayBackend",
    "Shard",
    "ShmSpaceError",
    "SourceError",
    "SupersededError",
    "WorkerDiedError",
    "WorkerError",
    "WorkerStartError",
    "WorkerStats",
    "WorkerTimeoutError",
    "element_rng",
    "element_seed",
    "from_generator",
    "seekable",
]
__version__ = "0.1.0"

# The consumer's side loads on first use. A worker imports only the modules it runs (this file runs
# whenever any of them is imported), so it starts sooner; and TensorFlow loads only when its face is used.
_CONSUMER_SIDE = {
    "Feeder": "feeder",
    "FeederStats": "feeder",
    "WorkerStats": "feeder",
    "from_generator": "generator_dataset",
    "RayBackend": "ray_backend",
}


# Submodules reachable as attributes after a plain ``import mpfeed`` (``mpfeed.tf.FeederState``), imported
# on first use: ``import mpfeed`` itself never loads TensorFlow.
_SUBMODULES = ("tf", "keras")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise  # the module is there, but what it needs is not (TensorFlow): say that
            raise AttributeError(f"module 'mpfeed' has no attribute {name!r}") from None
    module = _CONSUMER_SIDE.get(name)
    if module is None:
        raise AttributeError(f"module 'mpfeed' has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(f".{module}", __name__), name)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
