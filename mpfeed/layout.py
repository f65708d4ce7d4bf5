"""How an element becomes one contiguous record, and back again.

An element is a leaf or a tuple/list/dict nest of leaves. A record is laid out so that every leaf can be
read in place as a numpy view (records start 64-byte aligned, in a ring slot or in a received buffer)::

    header  32 bytes   magic u32 | spec_len u32 | n_dims u32 | count u32 | seq u64 | record_len u64
    spec    spec_len   pickled (treedef, leaf kinds, dtypes, ndims): the same bytes for a whole shard
    dims    8 * n_dims int64: each leaf's shape (or byte length), in leaf order
    leaves  one after another, each starting at a 64-byte boundary

``count`` is 0 for a single element and k for a batch of k stacked elements (every leaf gains a leading
axis of k). ``seq`` is the index of the (first) element within its worker's shard. Nothing here touches
processes or shared memory.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

ALIGN = 64
MAGIC = 0x6D706664  # "mpfd"
HEADER = struct.Struct("<IIIIQQ")

# Leaf kinds. Python scalars travel as fixed dtypes and come back as the Python type.
ARRAY, NPSCALAR, INT, FLOAT, BOOL, BYTES, STR = range(7)
_PY_SCALAR_DTYPES = {INT: np.dtype("<i8"), FLOAT: np.dtype("<f8"), BOOL: np.dtype("?")}
_SUPPORTED = "numpy arrays and scalars of fixed-size dtypes, int, float, bool, bytes and str"

Treedef = Any  # None for a leaf, ("t"|"l", children) for tuples and lists, ("d", keys, children) for dicts


def align(n: int) -> int:
    """Round ``n`` up to the next 64-byte boundary."""
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def flatten(element: Any) -> tuple[Treedef, list]:
    """Split an element into its structure and its leaves (depth first, dict keys in insertion order)."""
    leaves: list = []
    return _flatten(element, leaves), leaves


def _flatten(node: Any, leaves: list) -> Treedef:
    if isinstance(node, tuple):
        return ("t", tuple(_flatten(child, leaves) for child in node))
    if isinstance(node, list):
        return ("l", tuple(_flatten(child, leaves) for child in node))
    if isinstance(node, dict):
        keys = tuple(node)
        return ("d", keys, tuple(_flatten(node[key], leaves) for key in keys))
    leaves.append(node)
    return None


def unflatten(treedef: Treedef, leaves: list) -> Any:
    """Rebuild an element from `flatten`'s structure and a list of leaves."""
    return _unflatten(treedef, iter(leaves))


def _unflatten(treedef: Treedef, leaves) -> Any:
    if treedef is None:
        return next(leaves)
    if treedef[0] == "t":
        return tuple(_unflatten(child, leaves) for child in treedef[1])
    if treedef[0] == "l":
        return [_unflatten(child, leaves) for child in treedef[1]]
    return {key: _unflatten(child, leaves) for key, child in zip(treedef[1], treedef[2])}


def leaf_paths(treedef: Treedef, prefix: str = "element") -> list[str]:
    """Human-readable paths of the leaves, in leaf order: ``element[0]['image']``."""
    if treedef is None:
        return [prefix]
    if treedef[0] in ("t", "l"):
        children = [(f"{prefix}[{i}]", child) for i, child in enumerate(treedef[1])]
    else:
        children = [(f"{prefix}[{key!r}]", child) for key, child in zip(treedef[1], treedef[2])]
    return [path for child_prefix, child in children for path in leaf_paths(child, child_prefix)]


def describe_leaf(leaf: Any) -> tuple[int, str, int]:
    """``(kind, dtype string, ndim)`` of a leaf; `TypeError` for anything mpfeed cannot carry."""
    kind = type(leaf)
    if kind is np.ndarray or isinstance(leaf, np.ndarray):
        if leaf.dtype.hasobject or leaf.dtype.itemsize == 0:
            raise TypeError(
                f"is a numpy array of dtype {leaf.dtype} (shape {leaf.shape}); mpfeed carries {_SUPPORTED}"
            )
        return ARRAY, leaf.dtype.str, leaf.ndim
    if kind is bool:
        return BOOL, "?", 0
    if kind is int:
        return INT, "<i8", 0
    if kind is float:
        return FLOAT, "<f8", 0
    if kind is bytes:
        return BYTES, "", 0
    if kind is str:
        return STR, "", 0
    if isinstance(leaf, np.generic) and not leaf.dtype.hasobject:
        return NPSCALAR, leaf.dtype.str, 0
    if kind.__module__ == "mpfeed.spawn":  # a TensorFlow stand-in: its repr says why
        raise TypeError(f"is {leaf!r}")
    raise TypeError(f"is a {kind.__module__}.{kind.__qualname__}; mpfeed carries {_SUPPORTED}")


class Encoder:
    """Worker side: checks elements against the first one of the stream and writes them as records."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._spec = b""
        self._kinds: tuple[int, ...] = ()
        self._dtypes: tuple[np.dtype | None, ...] = ()

    def prepare(self, items: list[tuple[Treedef, list]], seq: int, batched: bool) -> Record:
        """Check a single element (or the elements of one batch) and plan its record."""
        treedef, leaves = items[0]
        key = (treedef, tuple(self._describe(treedef, leaves)))
        if key != self._key:
            if self._key is not None:
                raise ValueError(_describe_change(self._key, key))
            self._adopt(key)
        for other_treedef, other_leaves in items[1:]:
            other = (other_treedef, tuple(self._describe(other_treedef, other_leaves)))
            if other != key:
                raise ValueError(_describe_change(key, other))
        return Record(self, items, seq, batched)

    def _describe(self, treedef: Treedef, leaves: list) -> list[tuple[int, str, int]]:
        descriptions = []
        for index, leaf in enumerate(leaves):
            try:
                descriptions.append(describe_leaf(leaf))
            except TypeError as error:
                raise TypeError(f"{leaf_paths(treedef)[index]} {error}") from None
        return descriptions

    def _adopt(self, key: tuple) -> None:
        treedef, descriptions = key
        self._key = key
        self._kinds = tuple(kind for kind, _, _ in descriptions)
        self._dtypes = _dtypes_of(descriptions)
        self._spec = pickle.dumps(key, protocol=pickle.HIGHEST_PROTOCOL)


def _dtypes_of(descriptions: tuple) -> tuple[np.dtype | None, ...]:
    """The numpy dtype each leaf travels as (None for bytes and str)."""
    return tuple(
        np.dtype(dtype) if kind in (ARRAY, NPSCALAR) else _PY_SCALAR_DTYPES.get(kind)
        for kind, dtype, _ in descriptions
    )


def _describe_change(before: tuple, after: tuple) -> str:
    if before[0] != after[0]:
        return (
            f"the element's structure changed mid-stream: {_sketch(after[0])} after {_sketch(before[0])}; "
            "every element of a feeder must have the same nest of leaves"
        )
    paths = leaf_paths(before[0])
    for path, (kind_a, dtype_a, ndim_a), (kind_b, dtype_b, ndim_b) in zip(paths, before[1], after[1]):
        if (kind_a, dtype_a, ndim_a) != (kind_b, dtype_b, ndim_b):
            return (
                f"{path} changed mid-stream from {_leaf_words(kind_a, dtype_a, ndim_a)} to "
                f"{_leaf_words(kind_b, dtype_b, ndim_b)}; a leaf keeps its type, dtype and rank "
                "(its shape may change)"
            )
    return "the element changed mid-stream"


def _sketch(treedef: Treedef) -> str:
    if treedef is None:
        return "leaf"
    if treedef[0] == "d":
        return "{" + ", ".join(f"{k!r}: {_sketch(c)}" for k, c in zip(treedef[1], treedef[2])) + "}"
    inner = ", ".join(_sketch(c) for c in treedef[1])
    return f"({inner})" if treedef[0] == "t" else f"[{inner}]"


def _leaf_words(kind: int, dtype: str, ndim: int) -> str:
    names = {INT: "int", FLOAT: "float", BOOL: "bool", BYTES: "bytes", STR: "str"}
    if kind == ARRAY:
        return f"a {ndim}-d array of {np.dtype(dtype)}"
    if kind == NPSCALAR:
        return f"a numpy {np.dtype(dtype)} scalar"
    return names[kind]


class Record:
    """One element or batch, planned: its size is known before any byte is written."""

    __slots__ = ("_encoder", "_columns", "_dims", "_offsets", "_count", "_seq", "nbytes", "_payload_bytes")

    def __init__(self, encoder: Encoder, items: list[tuple[Treedef, list]], seq: int, batched: bool) -> None:
        self._encoder = encoder
        self._seq = seq
        self._count = len(items) if batched else 0
        columns: list = []
        dims: list[int] = []
        sizes: list[int] = []
        for index, kind in enumerate(encoder._kinds):
            column = [leaves[index] for _, leaves in items]
            if kind == STR:
                column = [text.encode("utf-8") for text in column]
            columns.append(column)
            if batched:
                dims.append(len(column))
            if kind == ARRAY:
                shape = column[0].shape
                for other in column[1:]:
                    if other.shape != shape:
                        path = leaf_paths(items[0][0])[index]
                        raise ValueError(
                            f"cannot batch {path}: shapes {shape} and {other.shape} differ within one batch"
                        )
                dims.extend(shape)
                sizes.append(column[0].nbytes * len(column))
            elif kind in (BYTES, STR):
                payload = sum(len(b) for b in column)
                dims.append(payload)
                sizes.append(payload + (8 * len(column) if batched else 0))
            else:
                sizes.append(encoder._dtypes[index].itemsize * len(column))
        offsets = []
        position = align(HEADER.size + len(encoder._spec) + 8 * len(dims))
        for size in sizes:
            offsets.append(position)
            position = align(position + size)
        self._columns = columns
        self._dims = dims
        self._offsets = offsets
        self._payload_bytes = sum(sizes)
        self.nbytes = position

    @property
    def payload_bytes(self) -> int:
        """Bytes of leaf data, without header and padding."""
        return self._payload_bytes

    def write(self, buffer) -> None:
        """Write the record at the start of a writable buffer of at least ``nbytes``."""
        buffer = memoryview(buffer)
        encoder = self._encoder
        spec = encoder._spec
        HEADER.pack_into(buffer, 0, MAGIC, len(spec), len(self._dims), self._count, self._seq, self.nbytes)
        start = HEADER.size
        buffer[start : start + len(spec)] = spec
        struct.pack_into(f"<{len(self._dims)}q", buffer, start + len(spec), *self._dims)
        batched = self._count > 0
        for kind, dtype, column, offset in zip(encoder._kinds, encoder._dtypes, self._columns, self._offsets):
            if kind in (BYTES, STR):
                if batched:
                    lengths = [len(b) for b in column]
                    struct.pack_into(f"<{len(lengths)}q", buffer, offset, *lengths)
                    offset += 8 * len(lengths)
                payload = b"".join(column)
                buffer[offset : offset + len(payload)] = payload
            elif kind == ARRAY:
                shape = column[0].shape
                if batched:
                    target = np.ndarray((len(column), *shape), dtype, buffer=buffer, offset=offset)
                    for row, leaf in zip(target, column):
                        row[...] = leaf
                else:
                    np.ndarray(shape, dtype, buffer=buffer, offset=offset)[...] = column[0]
            else:
                np.ndarray((len(column),), dtype, buffer=buffer, offset=offset)[:] = column


@dataclass(frozen=True)
class _Spec:
    treedef: Treedef
    kinds: tuple[int, ...]
    dtypes: tuple[np.dtype | None, ...]
    ndims: tuple[int, ...]


class Decoder:
    """Consumer side: turns a record into an element of read-only numpy views over the record's memory."""

    _MAX_SPECS = 256

    def __init__(self) -> None:
        self._specs: dict[bytes, _Spec] = {}
        self._dims_structs: dict[int, struct.Struct] = {}

    @staticmethod
    def header(base: np.ndarray) -> tuple[int, int, int, int, int, int]:
        """``(magic, spec_len, n_dims, count, seq, record_len)`` of the record at the start of ``base``."""
        return HEADER.unpack_from(base, 0)

    def decode(self, base: np.ndarray) -> tuple[Any, bool, int, int]:
        """Decode the record at the start of ``base`` (read-only uint8).

        Returns ``(element, views, count, payload_bytes)``; ``views`` tells whether the element holds
        views into ``base`` (so ``base`` must outlive them) or only copies.
        """
        magic, spec_len, n_dims, count, _seq, _record_len = HEADER.unpack_from(base, 0)
        if magic != MAGIC:
            raise RuntimeError("mpfeed: corrupted record (bad magic); please report this as a bug")
        spec = self._spec(base[HEADER.size : HEADER.size + spec_len].tobytes())
        dims_struct = self._dims_structs.get(n_dims)
        if dims_struct is None:
            dims_struct = self._dims_structs[n_dims] = struct.Struct(f"<{n_dims}q")
        dims = dims_struct.unpack_from(base, HEADER.size + spec_len)
        position = align(HEADER.size + spec_len + 8 * n_dims)
        batched = count > 0
        d = 0
        leaves = []
        views = False
        payload_bytes = 0
        for kind, dtype, ndim in zip(spec.kinds, spec.dtypes, spec.ndims):
            if kind == ARRAY:
                rank = ndim + batched
                shape = dims[d : d + rank]
                d += rank
                leaf = np.ndarray(shape, dtype, buffer=base, offset=position)
                size = leaf.nbytes
                views = True
            elif kind in (BYTES, STR):
                if batched:
                    size = dims[d + 1]
                    lengths = struct.unpack_from(f"<{count}q", base, position)
                    start = position + 8 * count
                    leaf = np.empty(count, dtype=object)
                    for i, length in enumerate(lengths):
                        chunk = base[start : start + length].tobytes()
                        leaf[i] = chunk.decode("utf-8") if kind == STR else chunk
                        start += length
                    d += 2
                    size += 8 * count
                else:
                    size = dims[d]
                    chunk = base[position : position + size].tobytes()
                    leaf = chunk.decode("utf-8") if kind == STR else chunk
                    d += 1
            elif batched:
                leaf = np.ndarray((count,), dtype, buffer=base, offset=position)
                size = leaf.nbytes
                d += 1
                views = True
            else:
                size = dtype.itemsize
                value = np.ndarray((), dtype, buffer=base, offset=position)[()]
                leaf = value.item() if kind != NPSCALAR else value
            leaves.append(leaf)
            payload_bytes += size
            position = align(position + size)
        element = leaves[0] if spec.treedef is None else unflatten(spec.treedef, leaves)
        return element, views, count, payload_bytes

    def _spec(self, spec_bytes: bytes) -> _Spec:
        spec = self._specs.get(spec_bytes)
        if spec is None:
            treedef, descriptions = pickle.loads(spec_bytes)
            kinds = tuple(kind for kind, _, _ in descriptions)
            ndims = tuple(ndim for _, _, ndim in descriptions)
            spec = _Spec(treedef, kinds, _dtypes_of(descriptions), ndims)
            if len(self._specs) >= self._MAX_SPECS:
                self._specs.clear()
            self._specs[spec_bytes] = spec
        return spec
