"""The tf.data face of a feeder. The only module of mpfeed that imports TensorFlow; workers never load it.

TensorFlow aliases a 64-byte-aligned numpy array instead of copying it, so tensors made from a feeder's
views point into the ring; the feeder returns a slot only when the last such tensor is gone.
"""

from __future__ import annotations

import functools
import json
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from .errors import ClosedError
from .layout import flatten, leaf_paths, unflatten

if TYPE_CHECKING:
    from .feeder import Feeder  # for hints only: the feeder imports this module, not the other way


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
    """`TypeError` naming the first leaf of ``element`` that ``signature`` does not accept, or the first
    place where their structures differ (with both structures)."""
    try:
        leaves = list(_leaves_with_specs(signature, element, "element"))
    except _Mismatch as mismatch:
        raise TypeError(
            f"the element's structure does not match output_signature: {mismatch} (the element is "
            f"{_sketch(element)}, output_signature is {_sketch(signature)}). To have lists and scalars "
            "converted to the signature as tf.data converts them, use mpfeed.from_generator, or "
            "Feeder(..., dtypes=mpfeed.tf.numpy_dtypes(output_signature))"
        ) from None
    for path, spec, leaf in leaves:
        if isinstance(leaf, (bytes, str)) or (isinstance(leaf, np.ndarray) and leaf.dtype.kind in "OSU"):
            dtype, shape = tf.string, np.shape(leaf)
        else:
            array = np.asarray(leaf)
            dtype, shape = tf.as_dtype(array.dtype), array.shape
        if dtype != spec.dtype or not spec.shape.is_compatible_with(shape):
            raise TypeError(
                f"{path} has shape {tuple(shape)} and dtype {dtype.name}, but output_signature expects {spec}"
            )


def _leaves_with_specs(signature: Any, element: Any, path: str):
    """``(path, spec, leaf)`` for every leaf, in the signature's order; `_Mismatch` naming the first place
    where the element's structure differs from the signature's."""
    if isinstance(signature, dict):
        if not isinstance(element, dict) or set(element) != set(signature):
            raise _structure_error(signature, element, path)
        for key, spec in signature.items():
            yield from _leaves_with_specs(spec, element[key], f"{path}[{key!r}]")
    elif isinstance(signature, (tuple, list)):
        if not isinstance(element, (tuple, list)) or len(element) != len(signature):
            raise _structure_error(signature, element, path)
        for index, (spec, child) in enumerate(zip(signature, element)):
            yield from _leaves_with_specs(spec, child, f"{path}[{index}]")
    elif isinstance(element, (tuple, list, dict)):
        raise _structure_error(signature, element, path)
    else:
        yield path, signature, element


class _Mismatch(Exception):
    """Where an element's structure leaves its signature's."""


def _structure_error(signature: Any, element: Any, path: str) -> _Mismatch:
    return _Mismatch(f"{path} is {_sketch(element)} where output_signature has {_sketch(signature)}")


def _sketch(node: Any) -> str:
    """A structure in a line: leaves as their dtype (specs) or type (values)."""
    if isinstance(node, dict):
        return "{" + ", ".join(f"{key!r}: {_sketch(child)}" for key, child in node.items()) + "}"
    if isinstance(node, (tuple, list)):
        inner = ", ".join(_sketch(child) for child in node)
        if isinstance(node, list):
            return f"[{inner}]"
        return f"({inner},)" if len(node) == 1 else f"({inner})"
    if isinstance(node, tf.TypeSpec):
        return getattr(getattr(node, "dtype", None), "name", type(node).__name__)
    if isinstance(node, np.ndarray):
        return f"array{node.shape} of {node.dtype}"
    return type(node).__name__


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
    feeder: Feeder,
    iterate: Callable[[int], Iterator[Any]],
    peek: Callable[[], Any],
    output_signature: Any = None,
    chunk_size: int | None = None,
    *,
    batched: bool,
    partitioned: bool,
    records: int | None,
) -> tf.data.Dataset:
    """`tf.data.Dataset.from_generator` over ``feeder``: each pass over the dataset is one pass of the
    feeder (``iterate(copy_below)``), whose epoch the feeder chooses (`Feeder.set_epoch`). ``peek`` gives
    the first element, served again by the next pass, to infer the signature from.

    Each call into a Python generator costs TensorFlow a fixed overhead, so small elements are stacked
    into chunks of ``chunk_size`` (default: about 1 MiB, at most 256 elements) that the dataset unbatches
    in the graph; an element of 1 MiB or more goes alone, as a zero-copy view. ``chunk_size=1`` hands
    every element over as a view. Only elements of fixed, non-empty shapes and no strings are chunked
    (TensorFlow 2.21's unbatch crashes on zero-size dimensions). A batched feeder's batches go as they are:
    by default those (and unchunked elements) of up to 256 KiB go as copies, which free their slots at once.

    The generator function holds the feeder weakly (TensorFlow keeps generator functions registered after
    the dataset is gone); the returned dataset, and every dataset made from it, owns the feeder. A
    partitioned feeder's dataset turns TensorFlow's auto-sharding off: it is one host's part already.

    With a known length (``records``, a random-access source), the dataset declares it, so that Keras
    counts steps and never takes a short resumed pass for an epoch's length: it is the pass repeated and
    cut at ``records`` (a cardinality TensorFlow knows without checking it at run time, as
    `assert_cardinality` would, failing a resumed pass). A pass that ends short (it began at a loaded
    position) ends there: the repetition that follows it at once is served nothing.
    """
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    if output_signature is None:
        output_signature = infer_signature(peek(), batched=batched)
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
    iterate_ref = weakref.WeakMethod(iterate)  # the dataset, not TensorFlow's registry, owns the feeder
    check_shapes = _shape_checker(output_signature)
    ended_short = [False]  # the last pass ended before ``records``: the repetition after it gets nothing

    def elements() -> Iterator[Any]:
        if ended_short[0]:
            ended_short[0] = False
            return
        bound = iterate_ref()
        if bound is None:
            raise ClosedError("the feeder behind this dataset is gone")
        iterator = bound(copy_below)
        del bound
        served = 0
        try:
            first = next(iterator, _NOTHING)
            if first is _NOTHING:
                ended_short[0] = records is not None
                return
            convert = _lists_to_tuples if _has_lists(first) else None
            first = convert(first) if convert else first
            check_signature(first, output_signature)  # TensorFlow checks too, but cannot name the leaf
            yield first
            served = 1
            for element in iterator:
                if chunk_size == 1:
                    check_shapes(flatten(element)[1])
                yield convert(element) if convert else element
                served += 1
            ended_short[0] = records is not None and served < records
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
    if records is not None:
        dataset = dataset.repeat().take(records)
    if partitioned:
        # Already this host's part: TensorFlow's multi-worker auto-sharding (`experimental_distribute_dataset`
        # and Keras' fit apply it) would find no files to shard by, shard the elements instead, and drop
        # the rest of the part.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        dataset = dataset.with_options(options)
    dataset._mpfeed_feeder = feeder
    _explain_iterator_checkpoints()
    return dataset


_NOTHING = object()

ITERATOR_CHECKPOINT_HINT = (
    "mpfeed: TensorFlow cannot checkpoint a tf.data iterator over an mpfeed dataset: its elements come "
    "from Python (from_generator), which tf.data never saves, whatever experimental_external_state_policy "
    "says. Save the feeder's position instead, and make a new iterator after restoring it: with Keras, "
    "mpfeed.keras.BackupAndRestore(feeder, backup_dir) as a callback of fit(); with your own loop, "
    "state = mpfeed.tf.FeederState(feeder) in tf.train.Checkpoint(model=..., feeder=state), setting "
    "state.consumed to the elements of this epoch the model has consumed before each save."
)


def _explain_iterator_checkpoints() -> None:
    """Make a failed checkpoint of an iterator over an mpfeed dataset say what to use instead.

    TensorFlow refuses it inside `OwnedIterator`'s serialization ("PyFunc is stateful", or "GeneratorDataset
    does not support checkpointing" when told to ignore external state), out of mpfeed's sight: the two
    methods that serialize an iterator are wrapped once, and add `ITERATOR_CHECKPOINT_HINT` to that error
    (same type) only when an mpfeed dataset is among the iterator's inputs. A symbolic checkpoint, which
    TensorFlow would save and then resume wrongly, is refused with the same hint."""
    from tensorflow.python.data.ops import iterator_ops

    owned = iterator_ops.OwnedIterator
    if getattr(owned, "_mpfeed_explained", False):
        return
    for method in ("_serialize_to_tensors", "_save"):
        original = getattr(owned, method, None)
        if original is not None:
            setattr(owned, method, _explaining(original))
    owned._mpfeed_explained = True


def _explaining(serialize: Callable) -> Callable:
    @functools.wraps(serialize)
    def explained(iterator: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            saved = serialize(iterator, *args, **kwargs)
        except (tf.errors.FailedPreconditionError, tf.errors.UnimplementedError) as error:
            if not _has_feeder(getattr(iterator, "_dataset", None)):
                raise
            message = f"{ITERATOR_CHECKPOINT_HINT}\n{error.message}"
            raise type(error)(error.node_def, error.op, message) from error
        if _has_feeder(getattr(iterator, "_dataset", None)):
            # With experimental_symbolic_checkpoint TensorFlow saves only counts, and a restore replays
            # the pipeline by calling the generator again: a new pass of the feeder, its next epoch,
            # whose elements differ (shuffled, or seeded by epoch). Refused rather than resumed wrong.
            raise tf.errors.FailedPreconditionError(
                None,
                None,
                f"{ITERATOR_CHECKPOINT_HINT}\n(With experimental_symbolic_checkpoint TensorFlow would save "
                "it, but restoring would replay the feeder's next epoch instead of this one's rest.)",
            )
        return saved

    return explained


def _has_feeder(dataset: Any, depth: int = 0) -> bool:
    """Whether an mpfeed dataset is ``dataset`` or among its inputs."""
    if dataset is None or depth > 200:
        return False
    if getattr(dataset, "_mpfeed_feeder", None) is not None:
        return True
    try:
        inputs = dataset._inputs()
    except Exception:  # a dataset kind whose inputs TensorFlow cannot list
        return False
    return any(_has_feeder(child, depth + 1) for child in inputs)


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


def numpy_dtypes(signature: Any, path: str = "element") -> Any:
    """The nest of numpy dtypes that workers convert elements to (`mpfeed.conform`), from a signature:
    tuples (namedtuples too) and dicts kept, ``object`` for strings, as ``tf.DType.as_numpy_dtype``."""
    if isinstance(signature, dict):
        return {key: numpy_dtypes(child, f"{path}[{key!r}]") for key, child in signature.items()}
    if isinstance(signature, (tuple, list)):
        return tuple(numpy_dtypes(child, f"{path}[{index}]") for index, child in enumerate(signature))
    if not isinstance(signature, tf.TensorSpec):
        raise TypeError(
            f"output_signature has {signature!r} for {path}; mpfeed makes dense tensors: use tf.TensorSpec"
        )
    dtype = np.dtype(signature.dtype.as_numpy_dtype)
    if dtype.kind == "V":  # ml_dtypes' bfloat16, float8, int4: records carry numpy's own dtypes only
        raise TypeError(
            f"output_signature has {signature.dtype.name} for {path}, which mpfeed's records cannot carry: "
            f"ask for float32 there and cast in the pipeline, e.g. dataset.map(lambda x: tf.cast(x, "
            f"tf.{signature.dtype.name}))"
        )
    return dtype


def is_dtype_nest(node: Any) -> bool:
    leaves = tf.nest.flatten(node)
    return bool(leaves) and all(isinstance(leaf, tf.dtypes.DType) for leaf in leaves)


def signature_of(output_signature: Any, output_types: Any, output_shapes: Any) -> Any:
    """``output_signature``, or the one TensorFlow makes of ``output_types`` and ``output_shapes`` (each
    shape taken at the place of a type, unknown where none is given), refusing what TensorFlow refuses."""
    if output_signature is not None:
        if output_types is not None or output_shapes is not None:
            raise TypeError("output_types and output_shapes can not be used together with output_signature")
        return output_signature
    if output_types is None:
        if output_shapes is not None:
            raise TypeError("output_shapes needs output_types (or pass output_signature)")
        return None
    return _specs(output_types, output_shapes, "output_types")


def _specs(types: Any, shapes: Any, path: str) -> Any:
    if isinstance(types, dict):
        if shapes is not None and (not isinstance(shapes, dict) or set(shapes) != set(types)):
            raise TypeError(f"output_shapes does not match output_types at {path}: {shapes!r} for {types!r}")
        return {
            key: _specs(child, None if shapes is None else shapes[key], f"{path}[{key!r}]")
            for key, child in types.items()
        }
    if isinstance(types, (tuple, list)):
        if shapes is not None and (not isinstance(shapes, (tuple, list)) or len(shapes) != len(types)):
            raise TypeError(f"output_shapes does not match output_types at {path}: {shapes!r} for {types!r}")
        return tuple(
            _specs(child, None if shapes is None else shapes[index], f"{path}[{index}]")
            for index, child in enumerate(types)
        )
    return tf.TensorSpec(tf.TensorShape(shapes), tf.as_dtype(types))


class FeederState(tf.train.experimental.PythonState):
    """A feeder's position inside a `tf.train.Checkpoint`, saved and restored with the model.

    ``tf.train.Checkpoint(model=model, feeder=mpfeed.tf.FeederState(feeder))``. Before each save, set
    ``consumed`` to the records of ``epoch`` the model has really trained on (tf.data prefetches ahead of
    it, into the next epoch too); ``epoch`` left at None means the feeder's current one. Without
    ``consumed``, a save part way through an epoch is refused: the handed-out position would skip what
    sits in TensorFlow's buffers. Restoring loads the position, and the feeder's next pass goes on from
    there. With Keras, `mpfeed.keras.BackupAndRestore` does all of this itself.
    """

    def __init__(self, feeder: Feeder) -> None:
        self.feeder = feeder
        self.consumed: int | None = None
        self.epoch: int | None = None

    def serialize(self) -> str:
        state = self.feeder.state_dict(consumed=self.consumed, epoch=self.epoch)
        if self.consumed is None and state["position"] > 0:
            raise ValueError(
                "FeederState.consumed is not set, and the feeder is part way through epoch "
                f"{state['epoch']}: the position it has handed out would skip the records still in "
                "tf.data's buffers. Before saving, set .consumed to the records of the epoch the model "
                "has trained on (and .epoch, when tf.data may have moved into the next), or train with "
                "mpfeed.keras.BackupAndRestore(feeder, backup_dir), which counts them itself"
            )
        return json.dumps(state)

    def deserialize(self, string_value: Any) -> None:
        text = string_value.decode() if isinstance(string_value, bytes) else str(string_value)
        self.feeder.load_state_dict(json.loads(text))
