"""The tf.data face of a feeder. The only module of mpfeed that imports TensorFlow; workers never load it.

TensorFlow aliases a 64-byte-aligned numpy array instead of copying it, so tensors made from a feeder's
views point into the ring; the feeder returns a slot only when the last such tensor is gone.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Iterator
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
    if isinstance(node, tuple) and hasattr(type(node), "_fields"):  # a namedtuple keeps its type
        return type(node)(*(_lists_to_tuples(child) for child in node))
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


_CHUNK_BYTES = 1 << 20  # small elements travel to TensorFlow in chunks of about this size
_MAX_CHUNK = 256
_COPY_BELOW_BYTES = 256 << 10  # records up to this size reach TensorFlow as copies, not views


def feeder_dataset(
    feeder: Feeder, output_signature: Any = None, chunk_size: int | None = None
) -> tf.data.Dataset:
    """`tf.data.Dataset.from_generator` over ``feeder``: each pass over the dataset is one epoch.

    Each call into a Python generator costs TensorFlow a fixed overhead, so small elements are stacked
    into chunks of ``chunk_size`` (default: about 1 MiB, at most 256 elements) that the dataset unbatches
    in the graph; an element of 1 MiB or more goes alone, as a zero-copy view. ``chunk_size=1`` hands
    every element over as a view. Only elements of fixed, non-empty shapes and no strings are chunked
    (TensorFlow 2.21's unbatch crashes on zero-size dimensions). A batched feeder's batches go as they are:
    by default those (and unchunked elements) of up to 256 KiB go as copies, which free their slots at once.

    The generator function holds the feeder weakly (TensorFlow keeps generator functions registered after
    the dataset is gone); the returned dataset, and every dataset made from it, owns the feeder. A
    partitioned feeder's dataset turns TensorFlow's auto-sharding off: it is one host's part already.
    """
    batched = feeder._supervisor.config.batch_size is not None
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    if output_signature is None:
        output_signature = infer_signature(feeder._peek(), batched=batched)
    chunkable = not batched and _fixed_size(output_signature)
    if chunk_size is not None and chunk_size > 1 and not chunkable:
        raise ValueError(
            "chunk_size needs elements of fixed, non-empty shapes without strings, and an unbatched feeder"
        )
    # TensorFlow lets go of the arrays it aliased only at a later generator call, which keeps slots from
    # their workers: unless views were asked for, a small record is cheaper to copy than that wait.
    copy_below = 0
    if chunk_size is None:
        chunk_size = _auto_chunk_size(output_signature) if chunkable else 1
        copy_below = _COPY_BELOW_BYTES if chunk_size == 1 else 0
    feeder_ref = weakref.ref(feeder)
    check_shapes = _shape_checker(output_signature)

    def elements() -> Iterator[Any]:
        owner = feeder_ref()
        if owner is None:
            raise ClosedError("the feeder behind this dataset is gone")
        iterator = owner._iterate(copy_below)
        del owner
        try:
            first = next(iterator, _NOTHING)
            if first is _NOTHING:
                return
            convert = _lists_to_tuples if _has_lists(first) else None
            first = convert(first) if convert else first
            check_signature(first, output_signature)  # TensorFlow checks too, but cannot name the leaf
            yield first
            for element in iterator:
                if chunk_size == 1:
                    check_shapes(flatten(element)[1])
                yield convert(element) if convert else element
        except ClosedError:
            # Closed while this pass was under way (Ctrl-C, the end of a `with` block, interpreter exit):
            # TensorFlow may still have a call in flight, and an error here would only be printed, in
            # its thread, after the user's own exception. The pass just ends.
            return

    if chunk_size == 1:
        dataset = tf.data.Dataset.from_generator(
            lambda: _Sticky(elements()), output_signature=output_signature
        )
    else:

        def chunks() -> Iterator[Any]:
            return _Sticky(_chunked(elements(), chunk_size, check_shapes))

        chunk_signature = tf.nest.map_structure(
            lambda spec: tf.TensorSpec((None, *spec.shape), spec.dtype), output_signature
        )
        dataset = tf.data.Dataset.from_generator(chunks, output_signature=chunk_signature).unbatch()
    if feeder._supervisor.config.partition[1] > 1:
        # Already this host's part: TensorFlow's multi-worker auto-sharding (`experimental_distribute_dataset`
        # and Keras' fit apply it) would find no files to shard by, shard the elements instead, and drop
        # the rest of the part.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        dataset = dataset.with_options(options)
    dataset._mpfeed_feeder = feeder
    return dataset


_NOTHING = object()


class _Sticky:
    """An iterator whose every call after an exception raises that exception again: TensorFlow calls the
    generator again after an error, and a finished generator would end the pass as if it were complete."""

    __slots__ = ("_iterator", "_error")

    def __init__(self, iterator: Iterator[Any]) -> None:
        self._iterator = iterator
        self._error: Exception | None = None

    def __iter__(self) -> _Sticky:
        return self

    def __next__(self) -> Any:
        if self._error is not None:
            raise self._error.with_traceback(None)  # without the frames of earlier raises
        try:
            return next(self._iterator)
        except StopIteration:
            raise
        except Exception as error:
            self._error = error
            raise


def _shape_checker(signature: Any) -> Callable[[list], None]:
    """A check of an element's leaves against the signature's shapes, whose error names the leaf (what
    TensorFlow says instead shows neither the leaf nor, for chunks, the element's own shape)."""
    treedef, specs = flatten(signature)
    paths = leaf_paths(treedef)
    wanted = [None if spec.shape.rank is None else tuple(spec.shape.as_list()) for spec in specs]

    def check(leaves: list) -> None:
        for path, want, leaf in zip(paths, wanted, leaves):
            shape = np.shape(leaf)
            if want is not None and (
                len(shape) != len(want) or any(w is not None and w != n for n, w in zip(shape, want))
            ):
                if len(shape) != len(want):
                    hint = tuple(None for _ in shape)
                else:
                    hint = tuple(w if w == n else None for n, w in zip(shape, want))
                raise TypeError(
                    f"{path} has shape {shape}, but the dataset's signature says {want} (inferred from "
                    "the first element unless you gave output_signature): its shape varies between "
                    f"elements. Pass an output_signature with None where it varies, e.g. "
                    f"tf.TensorSpec(shape={hint}, ...) for {path}"
                )

    return check


def _chunked(elements: Iterator[Any], chunk_size: int, check_shapes: Callable[[list], None]) -> Iterator[Any]:
    """Stack consecutive elements into chunks, copying each into its row at once (so its slot goes back
    to its worker at once). An element of another shape ends the chunk and fails `check_shapes`, and a
    failure delivers the elements before it first."""
    treedef = chunk = None
    filled = 0
    while True:
        try:
            element = next(elements)
        except StopIteration:
            break
        except Exception:
            if chunk is not None and filled:
                yield unflatten(treedef, [column[:filled] for column in chunk])
            raise
        tree, leaves = flatten(element)
        if chunk is not None and (filled == chunk_size or not _fits(chunk, leaves)):
            yield unflatten(treedef, [column[:filled] for column in chunk])
            chunk = None
            check_shapes(leaves)
        if chunk is None:
            treedef, filled = tree, 0
            chunk = [np.empty((chunk_size, *np.shape(leaf)), dtype=np.asarray(leaf).dtype) for leaf in leaves]
        for column, leaf in zip(chunk, leaves):
            column[filled] = leaf
        filled += 1
    if chunk is not None and filled:
        yield unflatten(treedef, [column[:filled] for column in chunk])


def _fixed_size(signature: Any) -> bool:
    return all(
        spec.dtype != tf.string and spec.shape.is_fully_defined() and spec.shape.num_elements() > 0
        for spec in tf.nest.flatten(signature)
    )


def _auto_chunk_size(signature: Any) -> int:
    nbytes = sum(spec.shape.num_elements() * spec.dtype.size for spec in tf.nest.flatten(signature))
    return max(1, min(_MAX_CHUNK, _CHUNK_BYTES // nbytes))


def _fits(chunk: list, leaves: list) -> bool:
    return all(column.shape[1:] == np.shape(leaf) for column, leaf in zip(chunk, leaves))


def from_generator(
    source: Any,
    output_signature: Any = None,
    args: tuple = (),
    *,
    input_context: tf.distribute.InputContext | None = None,
    **feeder_options: Any,
) -> tf.data.Dataset:
    """Shaped like `tf.data.Dataset.from_generator`, but ``source`` runs in worker processes.

    ``source`` as for `mpfeed.Feeder` (a random-access object, or a generator function called as
    ``source(*args, shard=Shard, **kwargs)``), whose options (``workers``, ``batch_size``, ``shuffle``,
    ...) pass through. ``input_context`` (from ``strategy.distribute_datasets_from_function``) gives this
    input pipeline its own partition of the data; with ``shuffle=True`` every pipeline needs the same
    ``seed``. The dataset owns its feeder: the workers stop when it is collected.
    """
    from .feeder import Feeder

    if input_context is not None:
        if "partition" in feeder_options:
            raise ValueError("pass input_context or partition, not both")
        feeder_options["partition"] = (input_context.input_pipeline_id, input_context.num_input_pipelines)
    return Feeder(source, args=args, **feeder_options).dataset(output_signature)


class FeederState(tf.train.experimental.PythonState):
    """A feeder's position inside a `tf.train.Checkpoint`, saved and restored with the model.

    ``tf.train.Checkpoint(model=model, feeder=mpfeed.tf.FeederState(feeder))``. Set ``consumed`` to the
    number of elements of the current epoch the model has really consumed before saving (tf.data
    prefetches ahead of it); left at None, the position is what the feeder has handed out. Restoring loads
    the position, and the feeder's next iteration goes on from there.
    """

    def __init__(self, feeder: Feeder) -> None:
        self.feeder = feeder
        self.consumed: int | None = None

    def serialize(self) -> str:
        return json.dumps(self.feeder.state_dict(consumed=self.consumed))

    def deserialize(self, string_value: Any) -> None:
        text = string_value.decode() if isinstance(string_value, bytes) else str(string_value)
        self.feeder.load_state_dict(json.loads(text))
