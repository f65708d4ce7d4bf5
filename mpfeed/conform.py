"""Converting elements to a signature's dtypes in the workers, as `tf.data.Dataset.from_generator` does.

The target is a nest of tuples and dicts whose leaves are numpy dtypes (``object`` for a string tensor),
made from an ``output_signature`` by `mpfeed.tf`: workers never see a TensorFlow object. Each leaf of
the target takes whatever the element holds at that place, a nested list or tuple included, and converts
it with tf.data's own rule: ``np.asarray(value).astype(dtype)`` for numbers (out-of-range ints wrap,
floats truncate toward zero, text is parsed), ``np.asarray(value, dtype=bool)`` for bools. Converted in
the worker, a leaf reaches TensorFlow already in its dtype, so the consumer still hands it over without
a copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .layout import Treedef, flatten, leaf_paths, unflatten

_TEXT = (bytes, str)
_TEXT_KINDS = ("S", "U")


def conform_items(items: list[tuple[Treedef, list]], target: Any) -> list[tuple[Treedef, list]]:
    """Flattened elements (as a worker makes them) converted to ``target``: the signature's structure
    (tuples and dicts in its key order), each leaf in its dtype. `TypeError` names the first leaf that
    tf.data would refuse too."""
    target_treedef, dtypes = _flat(target)
    conformed = []
    for treedef, leaves in items:
        if treedef == target_treedef:  # the common case: already the signature's structure
            out = []
            for index, (leaf, dtype) in enumerate(zip(leaves, dtypes)):
                if type(leaf) is np.ndarray and leaf.dtype == dtype:
                    out.append(leaf)
                else:
                    out.append(convert_leaf(leaf, dtype, index, target_treedef))
            conformed.append((treedef, out))
        else:
            conformed.append(flatten(conform(unflatten(treedef, leaves), target)))
    return conformed


def conform(element: Any, target: Any, path: str = "element") -> Any:
    """``element`` converted to ``target`` (see `conform_items`)."""
    if isinstance(target, dict):
        if not isinstance(element, dict) or set(element) != set(target):
            raise _mismatch(element, target, path)
        return {key: conform(element[key], child, f"{path}[{key!r}]") for key, child in target.items()}
    if isinstance(target, tuple):
        # tf.data takes a tuple (a namedtuple too) where its signature has one, never a list: a list is
        # a tensor to it.
        if not isinstance(element, tuple) or len(element) != len(target):
            raise _mismatch(element, target, path)
        pairs = enumerate(zip(element, target))
        return tuple(conform(child, spec, f"{path}[{index}]") for index, (child, spec) in pairs)
    return convert_leaf(element, target, path)


_FLAT_TARGETS: dict[int, tuple[Any, Treedef, list]] = {}


def _flat(target: Any) -> tuple[Treedef, list]:
    """`flatten` of a target, remembered: a worker converts every element to the same one."""
    known = _FLAT_TARGETS.get(id(target))
    if known is None or known[0] is not target:
        if len(_FLAT_TARGETS) > 8:
            _FLAT_TARGETS.clear()
        known = _FLAT_TARGETS[id(target)] = (target, *flatten(target))
    return known[1], known[2]


def convert_leaf(value: Any, dtype: np.dtype, path: str | int, treedef: Treedef = None) -> Any:
    """One leaf converted to ``dtype`` as tf.data converts it (``FuncRegistry._convert``); strings stay
    bytes or str, which TensorFlow converts itself. ``path`` names the leaf in errors (or is its index
    among the leaves of ``treedef``, named only when needed)."""
    if not isinstance(path, str):
        try:
            return convert_leaf(value, dtype, "")
        except TypeError:
            return convert_leaf(value, dtype, leaf_paths(treedef)[path])
    if dtype.kind == "O":
        return _text(value, path)
    try:
        if dtype.kind in "iufc":  # np.issubdtype(dtype, np.number), quicker
            array = np.asarray(value, order="C").astype(dtype, copy=False)
        else:
            array = np.asarray(value, dtype=dtype, order="C")
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{path} is {_show(value)}, which tf.data cannot convert to a {dtype.name} tensor either: {error}"
        ) from None
    return array


def _text(value: Any, path: str) -> Any:
    """A string leaf: bytes and str as they are (a list of them becomes a numpy text array)."""
    if isinstance(value, _TEXT) or (isinstance(value, np.ndarray) and value.dtype.kind in _TEXT_KINDS):
        return value
    array = np.asarray(value, dtype=object)
    items = array.ravel().tolist()
    if all(isinstance(item, str) for item in items):
        return np.asarray(array.tolist(), dtype=str)
    if items and all(isinstance(item, bytes) for item in items) and not any(i.endswith(b"\0") for i in items):
        return np.asarray(array.tolist(), dtype=bytes)
    raise TypeError(
        f"{path} is {_show(value)}, but output_signature expects a string tensor there: yield bytes or str, "
        "or a list of only str or only bytes (bytes ending in NUL can't travel in a list: yield them alone)"
    )


def _mismatch(element: Any, target: Any, path: str) -> TypeError:
    return TypeError(
        f"{path} is {_sketch(element)}, but output_signature has {_sketch(target)} there; the structures "
        "must match (a tuple for a tuple, a dict with the same keys for a dict; a list is one tensor)"
    )


def _sketch(node: Any, depth: int = 0) -> str:
    """The structure of an element or a target, leaves as their type (or dtype)."""
    if depth > 3:
        return "..."
    if isinstance(node, dict):
        return "{" + ", ".join(f"{key!r}: {_sketch(child, depth + 1)}" for key, child in node.items()) + "}"
    if isinstance(node, tuple):
        inner = ", ".join(_sketch(child, depth + 1) for child in node)
        return f"({inner},)" if len(node) == 1 else f"({inner})"
    if isinstance(node, list):
        return "a list of " + str(len(node))
    if isinstance(node, np.dtype):
        return "string" if node.kind == "O" else node.name
    if isinstance(node, np.ndarray):
        return f"array{node.shape} of {node.dtype}"
    return type(node).__name__


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
