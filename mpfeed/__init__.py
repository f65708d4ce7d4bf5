"""mpfeed: feed tf.data from a slow Python generator with every core.

    source(*args, shard)         worker processes, one per shard; never import TensorFlow
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

Control flows the other way: Feeder -> Supervisor -> workers (epochs, credits, stop).
"""

from __future__ import annotations

from typing import Any

from .errors import (
    ClosedError,
    ElementError,
    MpfeedError,
    ShmSpaceError,
    SourceError,
    WorkerDiedError,
    WorkerError,
    WorkerTimeoutError,
)
from .feeder import Feeder, FeederStats, WorkerStats
from .shard import Shard

__all__ = [
    "ClosedError",
    "ElementError",
    "Feeder",
    "FeederStats",
    "MpfeedError",
    "Shard",
    "ShmSpaceError",
    "SourceError",
    "WorkerDiedError",
    "WorkerError",
    "WorkerStats",
    "WorkerTimeoutError",
    "from_generator",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # TensorFlow loads only when its face is used: `import mpfeed` stays light.
    if name == "from_generator":
        from .tf import from_generator

        return from_generator
    raise AttributeError(f"module 'mpfeed' has no attribute {name!r}")
