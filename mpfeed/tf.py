"""The tf.data face of a feeder. The only module of mpfeed that imports TensorFlow; workers never load it.

TensorFlow aliases a 64-byte-aligned numpy array instead of copying it, so tensors made from a feeder's
views point into the ring; the feeder returns a slot only when the last such tensor is gone.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from .errors import ClosedError
from .layout import flatten, leaf_paths, unflatten

if TYPE_CHECKING:
    from .feeder import Feeder


def infer_signature(element: Any, batched: bool = False) -> Any:
    """A `tf.TensorSpec` nest for an element (lists become tuples: tf.data has no list structures).

    With ``batched``, the leading axis is left unknown (the last batch of a shard may be smaller)."""
    treedef, leaves = flatten(element)
    paths = leaf_paths(treedef)
    specs = [_leaf_spec(leaf, path, batched) for leaf, path in zip(leaves, paths)]
    return _lists_to_tuples(unflatten(treedef, specs))


def _leaf_spec(leaf: Any, path: str, batched: bool) -> tf.TensorSpec:
    if isinstance(leaf, (bytes, str)):
        return tf.TensorSpec((), tf.string)
    if isinstance(leaf, np.ndarray) and leaf.dtype == object:  # a batch of bytes or str
        return tf.TensorSpec((None,), tf.string)
    if isinstance(leaf, bool):
        return tf.TensorSpec((), tf.bool)
    if isinstance(leaf, int):
        return tf.TensorSpec((), tf.int64)
    if isinstance(leaf, float):
        return tf.TensorSpec((), tf.float64)
    array = np.asarray(leaf)
    try:
        dtype = tf.as_dtype(array.dtype)
    except TypeError as error:
        raise TypeError(f"{path} has dtype {array.dtype}, which TensorFlow cannot hold: {error}") from None
    shape = (None, *array.shape[1:]) if batched and array.ndim else array.shape
    return tf.TensorSpec(shape, dtype)


def check_signature(element: Any, signature: Any) -> None:
    """`TypeError` naming the first leaf of ``element`` that ``signature`` does not accept."""
    try:
        tf.nest.assert_same_structure(signature, element, check_types=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"the element's structure does not match output_signature: {error}") from None
    for path, spec, leaf in _leaves_with_specs(signature, element, "element"):
        if isinstance(leaf, (bytes, str)) or (isinstance(leaf, np.ndarray) and leaf.dtype == object):
            dtype, shape = tf.string, np.shape(leaf)
        else:
            array = np.asarray(leaf)
            dtype, shape = tf.as_dtype(array.dtype), array.shape
        if dtype != spec.dtype or not spec.shape.is_compatible_with(shape):
            raise TypeError(
                f"{path} has shape {tuple(shape)} and dtype {dtype.name}, but output_signature expects {spec}"
            )


def _leaves_with_specs(signature: Any, element: Any, path: str):
    if isinstance(signature, dict):
        for key, spec in signature.items():
            yield from _leaves_with_specs(spec, element[key], f"{path}[{key!r}]")
    elif isinstance(signature, (tuple, list)):
        for index, (spec, child) in enumerate(zip(signature, element)):
            yield from _leaves_with_specs(spec, child, f"{path}[{index}]")
    else:
        yield path, signature, element


def _lists_to_tuples(node: Any) -> Any:
    if isinstance(node, (list, tuple)):
        return tuple(_lists_to_tuples(child) for child in node)
    if isinstance(node, dict):
        return {key: _lists_to_tuples(child) for key, child in node.items()}
    return node


def _has_lists(node: Any) -> bool:
    if isinstance(node, list):
        return True
    if isinstance(node, tuple):
        return any(_has_lists(child) for child in node)
    if isinstance(node, dict):
        return any(_has_lists(child) for child in node.values())
    return False


def feeder_dataset(feeder: Feeder, output_signature: Any = None) -> tf.data.Dataset:
    """`tf.data.Dataset.from_generator` over ``feeder``: each pass over the dataset is one epoch.

    The generator function holds the feeder weakly (TensorFlow keeps generator functions registered after
    the dataset is gone); the returned dataset, and every dataset made from it, owns the feeder.
    """
    first = None
    if output_signature is None:
        first = feeder._peek()
        output_signature = infer_signature(first, batched=feeder._supervisor.config.batch_size is not None)
    convert = _lists_to_tuples if first is not None and _has_lists(first) else None
    feeder_ref = weakref.ref(feeder)

    def generate() -> Iterable[Any]:
        owner = feeder_ref()
        if owner is None:
            raise ClosedError("the feeder behind this dataset is gone")
        elements = iter(owner)
        del owner
        checked = False
        for element in elements:
            if convert is not None:
                element = convert(element)
            if not checked:  # TensorFlow checks each element too, but cannot name the leaf
                check_signature(element, output_signature)
                checked = True
            yield element

    dataset = tf.data.Dataset.from_generator(generate, output_signature=output_signature)
    dataset._mpfeed_feeder = feeder
    return dataset


def from_generator(
    source: Callable[..., Iterable[Any]],
    output_signature: Any = None,
    args: tuple = (),
    **feeder_options: Any,
) -> tf.data.Dataset:
    """Shaped like `tf.data.Dataset.from_generator`, but ``source`` runs in worker processes.

    ``source(*args, shard=Shard, **kwargs)`` as for `mpfeed.Feeder`, whose options (``workers``,
    ``batch_size``, ...) pass through. The dataset owns its feeder: the workers stop when it is collected.
    """
    from .feeder import Feeder

    return Feeder(source, args=args, **feeder_options).dataset(output_signature)
