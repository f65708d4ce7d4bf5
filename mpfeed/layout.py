"""How an element becomes one contiguous record, and back again.

An element is a leaf or a tuple/list/dict/namedtuple nest of leaves. A record is laid out so that every
leaf can be read in place as a numpy view (records start 64-byte aligned, in a ring slot or in a received
buffer)::

    header  32 bytes   magic u32 | spec_len u32 | n_dims u32 | count u32 | seq u64 | record_len u64
    spec    spec_len   pickled (treedef, leaf kinds, dtypes, ndims): the same bytes for a whole shard
    dims    8 * n_dims int64: each leaf's shape (or byte length), in leaf order
    leaves  one after another, each starting at a 64-byte boundary

``count`` is 0 for a single element and k for a batch of k stacked elements (every leaf gains a leading
axis of k). ``seq`` is the index of the (first) element within its worker's shard. Nothing here touches
processes or shared memory.
"""

from __future__ import annotations

import functools
import importlib
import operator
import pickle
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.lib.format import descr_to_dtype, dtype_to_descr

ALIGN = 64
MAGIC = 0x6D706664  # "mpfd"
HEADER = struct.Struct("<IIIIQQ")

# Leaf kinds. Python scalars travel as fixed dtypes and come back as the Python type.
ARRAY, NPSCALAR, INT, FLOAT, BOOL, BYTES, STR = range(7)
_PY_SCALAR_DTYPES = {INT: np.dtype("<i8"), FLOAT: np.dtype("<f8"), BOOL: np.dtype("?")}
_SUPPORTED = "numpy arrays and scalars of fixed-size dtypes, int, float, bool, bytes and str"

# None for a leaf, ("t"|"l", children) for tuples and lists, ("d", keys, children) for dicts (keys sorted, as
# tf.nest does, where they sort), ("n", (module, qualname), children) for namedtuples, which are rebuilt by
# importing their class by name, and ("x", type name) for a nest mpfeed cannot rebuild (`Encoder` refuses it).
Treedef = Any


def align(n: int) -> int:
    """Round ``n`` up to the next 64-byte boundary."""
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def aligned_empty(nbytes: int) -> np.ndarray:
    """A new uint8 array of ``nbytes`` whose start is 64-byte aligned, as a record's must be for its
    leaves to be (numpy allocates at 16 or 32 bytes mod 64)."""
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes]


def flatten(element: Any) -> tuple[Treedef, list]:
    """Split an element into its structure and its leaves (depth first, dict keys sorted)."""
    if not isinstance(element, _NESTS):
        return None, [element]
    leaves: list = []
    return _flatten(element, leaves), leaves


_NESTS = (tuple, list, dict)


def _flatten(node: tuple | list | dict, leaves: list) -> Treedef:
    kind = type(node)
    if kind is dict:
        assert isinstance(node, dict)
        try:
            keys = tuple(sorted(node))
        except TypeError:  # keys that do not sort (str and int mixed): insertion order
            keys = tuple(node)
        return ("d", keys, _flatten_children([node[key] for key in keys], leaves))
    if kind is tuple:
        return ("t", _flatten_children(node, leaves))
    if kind is list:
        return ("l", _flatten_children(node, leaves))
    if isinstance(node, tuple) and hasattr(kind, "_fields"):
        return ("n", (kind.__module__, kind.__qualname__), _flatten_children(node, leaves))
    return ("x", f"{kind.__module__}.{kind.__qualname__}")


def _flatten_children(children: Any, leaves: list) -> tuple:
    treedefs = []
    for child in children:  # leaves inline: a call per leaf would cost more than the rest
        if isinstance(child, _NESTS):
            treedefs.append(_flatten(child, leaves))
        else:
            leaves.append(child)
            treedefs.append(None)
    return tuple(treedefs)


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
    if treedef[0] == "n":
        return named_type(*treedef[1])(*[_unflatten(child, leaves) for child in treedef[2]])
    return {key: _unflatten(child, leaves) for key, child in zip(treedef[1], treedef[2])}


@functools.lru_cache(maxsize=256)
def named_type(module: str, qualname: str) -> Any:
    """A namedtuple class by its import name; `TypeError` saying why when it cannot be had that way."""
    hint = (
        "define the namedtuple at the top level of a module (not inside a function), or yield a tuple or "
        "a dict instead"
    )
    try:
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except Exception as error:
        raise TypeError(
            f"is a namedtuple {module}.{qualname}, which mpfeed rebuilds by importing it by name, and that "
            f"fails ({type(error).__name__}: {error}): {hint}"
        ) from None
    if not (isinstance(found, type) and issubclass(found, tuple) and hasattr(found, "_fields")):
        raise TypeError(
            f"is a namedtuple {module}.{qualname}, but that name imports {found!r}, another object: {hint}"
        )
    return found


def leaf_paths(treedef: Treedef, prefix: str = "element") -> list[str]:
    """Human-readable paths of the leaves, in leaf order: ``element[0]['image']``."""
    if treedef is None:
        return [prefix]
    if treedef[0] in ("t", "l"):
        children = [(f"{prefix}[{i}]", child) for i, child in enumerate(treedef[1])]
    elif treedef[0] == "n":
        children = [(f"{prefix}[{i}]", child) for i, child in enumerate(treedef[2])]
    elif treedef[0] == "x":
        return []
    else:
        children = [(f"{prefix}[{key!r}]", child) for key, child in zip(treedef[1], treedef[2])]
    return [path for child_prefix, child in children for path in leaf_paths(child, child_prefix)]


def describe_leaf(leaf: Any) -> tuple[int, Any, int]:
    """``(kind, dtype, ndim)`` of a leaf, the dtype as numpy's ``.npy`` files describe it (structured ones
    keep their fields); `TypeError` for anything mpfeed cannot carry."""
    kind = type(leaf)
    if kind is np.ndarray or isinstance(leaf, np.ndarray):
        if isinstance(leaf, np.ma.MaskedArray):
            raise TypeError(
                "is a numpy masked array, and mpfeed would carry its data without its mask (the masked "
                "entries as whatever lies beneath them): pass leaf.filled(value), or its data and "
                "np.ma.getmaskarray(leaf) as two leaves"
            )
        if leaf.dtype.hasobject or leaf.dtype.itemsize == 0:
            raise TypeError(
                f"is a numpy array of dtype {leaf.dtype} (shape {leaf.shape}); mpfeed carries {_SUPPORTED}"
            )
        return ARRAY, dtype_to_descr(leaf.dtype), leaf.ndim
    if kind is bool:
        return BOOL, "?", 0
    if kind is int:
        return INT, "<i8", 0
    if kind is float:
        return FLOAT, "<f8", 0
    if isinstance(leaf, bytes):  # numpy's bytes_ too: its dtype's length would change with the value
        return BYTES, "", 0
    if isinstance(leaf, str):  # and numpy's str_
        return STR, "", 0
    if isinstance(leaf, np.generic) and not leaf.dtype.hasobject:
        return NPSCALAR, dtype_to_descr(leaf.dtype), 0
    if kind.__module__ == "mpfeed.tfguard":  # a TensorFlow stand-in: its repr says why
        raise TypeError(f"is {leaf!r}; TensorFlow cannot run in mpfeed workers")
    raise TypeError(f"is a {kind.__module__}.{kind.__qualname__}; mpfeed carries {_SUPPORTED}")


class BadElement(TypeError, ValueError):
    """An element the encoder refuses, with why; ``item`` is its row in the record (0 unless batched), so
    that the worker can name the element itself."""

    def __init__(self, message: str, item: int) -> None:
        super().__init__(message)
        self.item = item


class Encoder:
    """Worker side: checks elements against the first one of the stream and writes them as records."""

    _MAX_PLANS = 64

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._treedef: Treedef = None
        self._spec = b""
        self._kinds: tuple[int, ...] = ()
        self._dtypes: tuple[np.dtype | None, ...] = ()
        self._ndims: tuple[int, ...] = ()
        self._types: tuple[Any, ...] = ()
        self._plans: dict[tuple, _Plan] = {}

    def prepare(self, items: list[tuple[Treedef, list]], seq: int, batched: bool) -> Record:
        """Check a single element (or the elements of one batch) and plan its record; `BadElement` names
        the row of an element it cannot carry."""
        for item, (treedef, leaves) in enumerate(items):
            if self._key is None or treedef != self._treedef or not self._conforms(leaves):
                try:
                    self._check(treedef, leaves)
                except (TypeError, ValueError) as error:
                    raise BadElement(str(error), item) from None
        return Record(self, items, seq, batched)

    def _conforms(self, leaves: list[Any]) -> bool:
        """The fast check: each leaf has the exact type of the first element's (and, for numpy leaves, its
        dtype and rank). False sends the element through `_check`, which names what changed."""
        expected = zip(self._kinds, self._types, self._dtypes, self._ndims)
        for leaf, (kind, leaf_type, dtype, ndim) in zip(leaves, expected):
            if type(leaf) is not leaf_type:
                return False
            if kind == ARRAY:
                if leaf.ndim != ndim or (leaf.dtype is not dtype and leaf.dtype != dtype):
                    return False
            elif kind == NPSCALAR and leaf.dtype is not dtype and leaf.dtype != dtype:
                return False
        return True

    def _check(self, treedef: Treedef, leaves: list) -> None:
        """Describe every leaf: adopt the first element's description, refuse any change after it."""
        _check_nests(treedef, "element")
        key = (treedef, tuple(self._describe(treedef, leaves)))
        if self._key is None:
            self._adopt(key, leaves)
        elif key != self._key:
            raise ValueError(_describe_change(self._key, key))

    def _describe(self, treedef: Treedef, leaves: list) -> list[tuple[int, str, int]]:
        descriptions = []
        for index, leaf in enumerate(leaves):
            try:
                descriptions.append(describe_leaf(leaf))
            except TypeError as error:
                raise TypeError(f"{leaf_paths(treedef)[index]} {error}") from None
        return descriptions

    def _adopt(self, key: tuple, leaves: list) -> None:
        treedef, descriptions = key
        self._key = key
        self._treedef = treedef
        self._kinds = tuple(kind for kind, _, _ in descriptions)
        self._dtypes = _dtypes_of(descriptions)
        self._ndims = tuple(ndim for _, _, ndim in descriptions)
        self._types = tuple(type(leaf) for leaf in leaves)
        self._spec = pickle.dumps(key, protocol=pickle.HIGHEST_PROTOCOL)

    def plan(self, dims: tuple[int, ...], count: int) -> _Plan:
        """Where each leaf goes in a record with these dims (cached: a stream's shapes rarely vary)."""
        key = (count, dims)
        plan = self._plans.get(key)
        if plan is None:
            plan = _remember(self._plans, key, _Plan.of(self, dims, count), self._MAX_PLANS)
        return plan


def _check_nests(treedef: Treedef, path: str) -> None:
    """Refuse a nest that could not come back as the same type: a subclass of dict, list or tuple (but a
    namedtuple whose class imports by name)."""
    if treedef is None:
        return
    tag = treedef[0]
    if tag == "x":
        raise TypeError(
            f"{path} is a {treedef[1]}, a subclass of dict, list or tuple, which mpfeed cannot rebuild on "
            "the consumer's side (it would come back as a plain dict, list or tuple): yield a plain dict, "
            "list or tuple (dict(x), list(x)), or a namedtuple defined at the top level of a module"
        )
    if tag == "n":
        try:
            fields = named_type(*treedef[1])._fields
        except TypeError as error:
            raise TypeError(f"{path} {error}") from None
        if len(fields) != len(treedef[2]):
            raise TypeError(
                f"{path} is a namedtuple of {len(treedef[2])} fields, but {'.'.join(treedef[1])}, the class "
                f"its name imports, has {len(fields)}: define each namedtuple once, at the top level of a "
                "module"
            )
    children = treedef[1] if tag in ("t", "l") else treedef[2]
    keys = treedef[1] if tag == "d" else range(len(children))
    for key, child in zip(keys, children):
        _check_nests(child, f"{path}[{key!r}]")


def _remember(cache: dict, key: Any, value: Any, limit: int) -> Any:
    """Store ``value`` in a cache that starts over when full (a stream has few layouts; a pathological
    one must not grow it without bound), and return it."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
    return value


def _dtypes_of(descriptions: tuple) -> tuple[np.dtype | None, ...]:
    """The numpy dtype each leaf travels as (None for bytes and str)."""
    return tuple(
        descr_to_dtype(dtype) if kind in (ARRAY, NPSCALAR) else _PY_SCALAR_DTYPES.get(kind)
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
    if treedef[0] == "n":
        return f"{treedef[1][1]}(" + ", ".join(_sketch(c) for c in treedef[2]) + ")"
    if treedef[0] == "x":
        return treedef[1]
    inner = ", ".join(_sketch(c) for c in treedef[1])
    return f"({inner})" if treedef[0] == "t" else f"[{inner}]"


def _leaf_words(kind: int, dtype: Any, ndim: int) -> str:
    names = {INT: "int", FLOAT: "float", BOOL: "bool", BYTES: "bytes", STR: "str"}
    if kind == ARRAY:
        return f"a {ndim}-d array of {descr_to_dtype(dtype)}"
    if kind == NPSCALAR:
        return f"a numpy {descr_to_dtype(dtype)} scalar"
    return names[kind]


class _Plan:
    """The layout of a record, fixed by its dims: the bytes after the header, each leaf's offset, sizes."""

    __slots__ = ("prefix", "offsets", "nbytes", "payload_bytes")

    def __init__(self, prefix: bytes, offsets: tuple[int, ...], nbytes: int, payload_bytes: int) -> None:
        self.prefix = prefix
        self.offsets = offsets
        self.nbytes = nbytes
        self.payload_bytes = payload_bytes

    @classmethod
    def of(cls, encoder: Encoder, dims: tuple[int, ...], count: int) -> _Plan:
        spec = encoder._spec
        placed, end = place_leaves(encoder._kinds, encoder._dtypes, encoder._ndims, dims, count, len(spec))
        offsets = tuple(offset for offset, _, _ in placed)
        payload_bytes = sum(size for _, size, _ in placed)
        return cls(spec + struct.pack(f"<{len(dims)}q", *dims), offsets, end, payload_bytes)


def place_leaves(
    kinds: tuple[int, ...],
    dtypes: tuple,
    ndims: tuple[int, ...],
    dims: tuple[int, ...],
    count: int,
    spec_len: int,
) -> tuple[list[tuple[int, int, tuple[int, ...]]], int]:
    """Where each leaf of a record sits, for the writer and the reader alike: ``(offset, size, shape)``,
    the shape of an array (or of a batch's column of scalars), else ``()``; and where the record ends.
    In ``dims`` a batch gives every leaf its length first; then come an array's extents, or the byte
    length of bytes and str."""
    position = align(HEADER.size + spec_len + 8 * len(dims))
    batched = count > 0
    d = 0
    placed = []
    for kind, dtype, ndim in zip(kinds, dtypes, ndims):
        shape: tuple[int, ...] = ()
        if kind in (BYTES, STR):
            size = dims[d + batched] + 8 * count  # a batch's lengths come first
            d += 1 + batched
        elif kind == ARRAY or batched:
            rank = ndim + batched
            shape = tuple(dims[d : d + rank])
            d += rank
            size = dtype.itemsize
            for extent in shape:
                size *= extent
        else:
            size = dtype.itemsize
        placed.append((position, size, shape))
        position = align(position + size)
    return placed, position


def _utf8(text: str, treedef: Treedef, index: int) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{leaf_paths(treedef)[index]} is a str that cannot be encoded as UTF-8 ({error.reason} at "
            f"position {error.start}: {text[error.start : error.end]!r}); pass bytes, or clean the text"
        ) from None


def _utf8_of_row(text: str, treedef: Treedef, index: int, row: int) -> bytes:
    try:
        return _utf8(text, treedef, index)
    except ValueError as error:
        raise BadElement(str(error), row) from None


def _first_overflow(column: list, dtype: np.dtype | None) -> int:
    """The row of a batch's column of Python ints whose value is out of range."""
    for row, value in enumerate(column):
        try:
            np.array(value, dtype=dtype)
        except OverflowError:
            return row
    return 0


_SMALL_LEAF_BYTES = 1 << 16  # leaves up to this size are written from `tobytes()`: fewer calls than a view
_PY_SCALAR_STRUCTS = {INT: struct.Struct("<q"), FLOAT: struct.Struct("<d"), BOOL: struct.Struct("?")}


class Record:
    """One element or batch, planned: its size is known before any byte is written."""

    __slots__ = ("_encoder", "_values", "_plan", "_count", "_seq", "_n_dims")

    def __init__(self, encoder: Encoder, items: list[tuple[Treedef, list]], seq: int, batched: bool) -> None:
        self._encoder = encoder
        self._seq = seq
        self._count = len(items) if batched else 0
        if batched:
            dims, self._values = self._columns(encoder, items)
        else:
            try:
                dims, self._values = self._leaves(encoder, items[0])
            except ValueError as error:
                raise BadElement(str(error), 0) from None
        self._n_dims = len(dims)
        self._plan = encoder.plan(tuple(dims), self._count)

    @staticmethod
    def _leaves(encoder: Encoder, item: tuple[Treedef, list]) -> tuple[list[int], list]:
        """A single element: dims are the arrays' shapes and the byte lengths; scalars are packed now, so a
        value out of range is the element's fault, reported with its path."""
        dims: list[int] = []
        values = list(item[1])
        for index, kind in enumerate(encoder._kinds):
            if kind == ARRAY:
                dims += values[index].shape
            elif kind == BYTES:
                dims.append(len(values[index]))
            elif kind == STR:
                values[index] = _utf8(values[index], item[0], index)
                dims.append(len(values[index]))
            elif kind == NPSCALAR:
                values[index] = values[index].tobytes()
            else:
                try:
                    values[index] = _PY_SCALAR_STRUCTS[kind].pack(values[index])
                except (struct.error, OverflowError):
                    path, value = leaf_paths(item[0])[index], values[index]
                    raise ValueError(f"{path} is {value!r}, beyond the int64 an int travels as") from None
        return dims, values

    @staticmethod
    def _columns(encoder: Encoder, items: list[tuple[Treedef, list]]) -> tuple[list[int], list]:
        """A batch: one column per leaf; arrays must agree in shape, scalars become one array each."""
        dims: list[int] = []
        columns: list = []
        rows = len(items)
        for index, kind in enumerate(encoder._kinds):
            column: Any = [leaves[index] for _, leaves in items]
            dims.append(rows)
            if kind == ARRAY:
                shape = column[0].shape
                for row, other in enumerate(column):
                    if other.shape != shape:
                        path = leaf_paths(items[0][0])[index]
                        raise BadElement(
                            f"cannot batch {path}: shapes {shape} and {other.shape} differ within one batch",
                            row,
                        )
                dims += shape
            elif kind in (BYTES, STR):
                if kind == STR:
                    column = [
                        _utf8_of_row(text, treedef, index, row)
                        for row, ((treedef, _), text) in enumerate(zip(items, column))
                    ]
                dims.append(sum(len(b) for b in column))
            else:
                try:
                    column = np.array(column, dtype=encoder._dtypes[index])
                except OverflowError:
                    path = leaf_paths(items[0][0])[index]
                    raise BadElement(
                        f"{path} holds an int beyond the int64 an int travels as",
                        _first_overflow(column, encoder._dtypes[index]),
                    ) from None
            columns.append(column)
        return dims, columns

    @property
    def nbytes(self) -> int:
        """Bytes the record takes, header and padding included."""
        return self._plan.nbytes

    @property
    def payload_bytes(self) -> int:
        """Bytes of leaf data, without header and padding."""
        return self._plan.payload_bytes

    def write(self, buffer) -> None:
        """Write the record at the start of a writable buffer of at least ``nbytes``."""
        buffer = memoryview(buffer)
        encoder, plan, count = self._encoder, self._plan, self._count
        HEADER.pack_into(buffer, 0, MAGIC, len(encoder._spec), self._n_dims, count, self._seq, plan.nbytes)
        buffer[HEADER.size : HEADER.size + len(plan.prefix)] = plan.prefix
        for kind, dtype, value, offset in zip(encoder._kinds, encoder._dtypes, self._values, plan.offsets):
            if kind == ARRAY:
                if count:
                    target = np.ndarray((count, *value[0].shape), dtype, buffer=buffer, offset=offset)
                    for row, leaf in enumerate(value):
                        target[row] = leaf
                elif value.nbytes <= _SMALL_LEAF_BYTES:
                    buffer[offset : offset + value.nbytes] = value.tobytes()
                else:
                    np.ndarray(value.shape, dtype, buffer=buffer, offset=offset)[...] = value
            elif kind in (BYTES, STR):
                if count:
                    lengths = [len(b) for b in value]
                    struct.pack_into(f"<{count}q", buffer, offset, *lengths)
                    offset += 8 * count
                    value = b"".join(value)
                buffer[offset : offset + len(value)] = value
            elif count:
                np.ndarray((count,), dtype, buffer=buffer, offset=offset)[:] = value
            else:
                buffer[offset : offset + len(value)] = value


# How the decoder makes each leaf, planned once per layout.
_VIEW, _SCALAR, _PY_SCALAR, _TEXT = range(4)


class _Reading:
    """How to read every record with one layout (the bytes of its spec and dims)."""

    __slots__ = ("build", "steps", "views", "payload_bytes")

    def __init__(self, treedef: Treedef, steps: list[tuple], views: bool, payload_bytes: int) -> None:
        self.build = _builder(treedef)
        self.steps = steps
        self.views = views
        self.payload_bytes = payload_bytes


class Decoder:
    """Consumer side: turns a record into an element of read-only numpy views over the record's memory."""

    _MAX_READINGS = 256

    def __init__(self) -> None:
        self._readings: dict[bytes, _Reading] = {}
        self._specs: dict[bytes, tuple] = {}

    @staticmethod
    def header(base: Any) -> tuple[int, int, int, int, int, int]:
        """``(magic, spec_len, n_dims, count, seq, record_len)`` of the record at the start of ``base``."""
        return HEADER.unpack_from(base, 0)

    def decode(self, base: Any) -> tuple[Any, bool, int, int]:
        """Decode the record at the start of ``base`` (read-only uint8).

        Returns ``(element, views, count, payload_bytes)``; ``views`` tells whether the element holds
        views into ``base`` (so ``base`` must outlive them) or only copies.
        """
        magic, spec_len, n_dims, count, _seq, _record_len = HEADER.unpack_from(base, 0)
        if magic != MAGIC:
            raise RuntimeError("mpfeed: corrupted record (bad magic); please report this as a bug")
        layout = base[HEADER.size : HEADER.size + spec_len + 8 * n_dims].tobytes()
        reading = self._readings.get(layout)
        if reading is None:
            reading = _remember(
                self._readings, layout, self._plan(layout, spec_len, n_dims, count), self._MAX_READINGS
            )
        leaves = []
        for step in reading.steps:
            how = step[0]
            if how == _VIEW:
                leaves.append(np.ndarray(step[1], step[2], buffer=base, offset=step[3]))
            elif how == _SCALAR:
                leaves.append(base[step[1] : step[2]].view(step[3])[0])
            elif how == _PY_SCALAR:
                leaves.append(base[step[1] : step[2]].view(step[3])[0].item())
            else:
                leaves.append(_read_text(base, *step[1:]))
        return reading.build(leaves), reading.views, count, reading.payload_bytes

    def _plan(self, layout: bytes, spec_len: int, n_dims: int, count: int) -> _Reading:
        spec_bytes = layout[:spec_len]
        spec = self._specs.get(spec_bytes)
        if spec is None:
            treedef, descriptions = pickle.loads(spec_bytes)
            spec = _remember(
                self._specs, spec_bytes, (treedef, descriptions, _dtypes_of(descriptions)), self._MAX_READINGS
            )
        treedef, descriptions, dtypes = spec
        dims = struct.unpack_from(f"<{n_dims}q", layout, spec_len)
        kinds = tuple(kind for kind, _, _ in descriptions)
        ndims = tuple(ndim for _, _, ndim in descriptions)
        placed, _ = place_leaves(kinds, dtypes, ndims, dims, count, spec_len)
        steps: list[tuple] = []
        for kind, dtype, (offset, size, shape) in zip(kinds, dtypes, placed):
            if kind in (BYTES, STR):
                steps.append((_TEXT, offset, size - 8 * count, count, kind == STR))
            elif kind == ARRAY or count:
                steps.append((_VIEW, shape, dtype, offset))
            else:
                steps.append((_SCALAR if kind == NPSCALAR else _PY_SCALAR, offset, offset + size, dtype))
        views = any(step[0] == _VIEW for step in steps)
        payload_bytes = sum(size for _, size, _ in placed)
        return _Reading(treedef, steps, views, payload_bytes)


def _builder(treedef: Treedef) -> Callable[[list], Any]:
    """The quickest way to rebuild elements of this structure from their leaves."""
    if treedef is None:
        return operator.itemgetter(0)
    if all(child is None for child in treedef[-1]):  # a flat tuple, list or dict: the common case
        if treedef[0] == "t":
            return tuple
        if treedef[0] == "l":
            return list
        if treedef[0] == "n":
            return named_type(*treedef[1])._make
        keys = treedef[1]
        return lambda leaves: dict(zip(keys, leaves))
    return functools.partial(unflatten, treedef)


def _read_text(base: Any, position: int, size: int, count: int, text: bool) -> Any:
    """A bytes or str leaf, or (in a batch) an object array of them: always copies."""
    if not count:
        chunk = base[position : position + size].tobytes()
        return chunk.decode("utf-8") if text else chunk
    lengths = struct.unpack_from(f"<{count}q", base, position)
    start = position + 8 * count
    leaf = np.empty(count, dtype=object)
    for i, length in enumerate(lengths):
        chunk = base[start : start + length].tobytes()
        leaf[i] = chunk.decode("utf-8") if text else chunk
        start += length
    return leaf
