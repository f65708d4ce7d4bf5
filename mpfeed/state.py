"""The feeder's position as a small JSON-ready dict (`Feeder.state_dict`), and the check that a saved
position belongs to a feeder configured the same way (`check_state`).

A position is the epoch, and how far into it the feeder has handed out records:
- random access: ``position`` (every task below it was delivered) and ``done`` (tasks delivered beyond
  it, which first-ready delivery leaves, as a bitmask); a task is one element, or one batch;
- generator sources: ``starts``, the records each worker had delivered, and ``cursor``, the worker whose
  record comes next in round-robin order.
"""

from __future__ import annotations

import binascii
from typing import Any

from .dispatch import decode_done

FORMAT = 1
# What must match between the feeder that saved a state and the one that loads it.
CONFIG_FIELDS = (
    "source",
    "length",
    "workers",
    "seed",
    "shuffle",
    "batch_size",
    "drop_remainder",
    "partition",
)


def check_state(state: Any, config: dict[str, Any]) -> None:
    """`ValueError` naming what differs when ``state`` was not saved by a feeder configured as ``config``."""
    if not isinstance(state, dict) or state.get("mpfeed") != FORMAT:
        raise ValueError(f"not a state saved by Feeder.state_dict() (format {FORMAT}): {str(state)[:200]}")
    differences = [
        f"{name} is {config.get(name)!r} here but {state.get(name)!r} in the state"
        for name in CONFIG_FIELDS
        if _plain(state.get(name)) != _plain(config.get(name))
    ]
    if differences:
        hint = ""
        if state.get("seed") != config.get("seed"):
            hint = f" (a feeder made without a seed draws one at random: pass seed={state.get('seed')})"
        raise ValueError(
            "this state comes from a feeder configured differently, so its position means something "
            "else here: " + "; ".join(differences) + hint
        )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_position(state: dict[str, Any], records: int | None, workers: int) -> None:
    """`ValueError` naming the field of a saved position that can't belong to an epoch of ``records``
    records (random access) or of ``workers`` shards (generators), instead of an empty or wrong epoch."""
    epoch = state.get("epoch")
    _field(_is_count(epoch), "epoch", epoch, "an int >= 0")
    position: Any = state.get("position")
    if records is not None:
        _field(_is_count(position) and position <= records, "position", position, f"an int in [0, {records}]")
        done: Any = state.get("done")
        try:
            tasks = decode_done(position, done)
        except (TypeError, ValueError, binascii.Error, AttributeError):
            tasks = None
        _field(
            tasks is not None and all(task < records for task in tasks),
            "done",
            done,
            f"a bitmask of records after position {position} and below {records}",
        )
        return
    starts: Any = state.get("starts")
    cursor: Any = state.get("cursor")
    _field(
        isinstance(starts, list) and len(starts) == workers and all(_is_count(n) for n in starts),
        "starts",
        starts,
        f"a list of {workers} ints >= 0 (one per worker)",
    )
    _field(_is_count(cursor) and cursor < workers, "cursor", cursor, f"an int in [0, {workers})")
    _field(position == sum(starts), "position", position, f"the sum of starts ({sum(starts)})")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _field(condition: bool, name: str, value: Any, wanted: str) -> None:
    if not condition:
        raise ValueError(f"this state's {name} is {str(value)[:100]!r}, but must be {wanted}")
