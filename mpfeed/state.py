"""The feeder's position as a small JSON-ready dict (`Feeder.state_dict`), and the check that a saved
position belongs to a feeder configured the same way (`check_state`).

A position is the epoch, and how far into it the feeder has handed out records:
- random access: ``position`` (every task below it was delivered) and ``done`` (tasks delivered beyond
  it, which first-ready delivery leaves, as a bitmask); a task is one element, or one batch;
- generator sources: ``starts``, the records each worker had delivered, and ``cursor``, the worker whose
  record comes next in round-robin order.
"""

from __future__ import annotations

from typing import Any

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
        raise ValueError(
            "this state comes from a feeder configured differently, so its position means something "
            "else here: " + "; ".join(differences)
        )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
