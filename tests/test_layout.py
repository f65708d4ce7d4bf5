"""Records: every leaf kind written and read back, alignment, and the errors that name a leaf."""

from __future__ import annotations

import numpy as np
import pytest
import sources

import mpfeed
from mpfeed.layout import Decoder, Encoder, align, flatten, leaf_paths


def roundtrip(elements, batched=False):
    encoder, decoder = Encoder(), Decoder()
    record = encoder.prepare([flatten(e) for e in elements], seq=5, batched=batched)
    raw = np.zeros(record.nbytes + 64, dtype=np.uint8)
    base = raw[-raw.ctypes.data % 64 :][: record.nbytes]
    record.write(base)
    assert Decoder.header(base)[4:] == (5, record.nbytes)
    element, views, count, nbytes = decoder.decode(base)
    assert nbytes == record.payload_bytes
    return element, views, count


def test_single_elements_of_every_leaf_kind_come_back_equal_and_typed():
    element = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2],
        "b": (np.int16(-3), 7, 2.5, True, b"\x00raw", "tëxt"),
        "c": [np.zeros((0,), dtype=np.uint64), np.array(3 + 1j)],
    }
    got, views, count = roundtrip([element])
    assert views and count == 0
    np.testing.assert_array_equal(got["a"], element["a"])
    assert got["b"] == element["b"] and [type(v) for v in got["b"]] == [type(v) for v in element["b"]]
    assert isinstance(got["c"], list) and got["c"][0].shape == (0,) and got["c"][1] == 3 + 1j


def test_leaves_are_64_byte_aligned_views_of_the_record():
    element = (np.ones(3, dtype=np.uint8), np.ones((5, 7), dtype=np.float64), np.ones(1, dtype=np.int32))
    got, _, _ = roundtrip([element])
    assert all(leaf.ctypes.data % 64 == 0 for leaf in got)
    assert all(not leaf.flags.owndata for leaf in got)


def test_a_batch_stacks_every_leaf_kind():
    elements = [(np.full(2, i), i, float(i), f"s{i}", np.float32(i)) for i in range(3)]
    (arrays, ints, floats, texts, scalars), _, count = roundtrip(elements, batched=True)
    assert count == 3
    np.testing.assert_array_equal(arrays, [[0, 0], [1, 1], [2, 2]])
    assert ints.dtype == np.int64 and ints.tolist() == [0, 1, 2]
    assert floats.dtype == np.float64 and texts.tolist() == ["s0", "s1", "s2"]
    assert scalars.dtype == np.float32


@pytest.mark.parametrize("rows", [3, 20_000])  # small leaves and leaves over 64 KiB are written differently
def test_structured_arrays_keep_their_fields_alone_and_in_batches(rows):
    record = np.dtype(
        {"names": ["id", "score"], "formats": ["<i4", "<f4"], "offsets": [0, 8], "itemsize": 12}
    )
    first = np.zeros(rows, dtype=record)
    first["id"], first["score"] = np.arange(rows), 0.5
    second = first.copy()
    second["id"] += rows
    for elements, batched in [([first], False), ([first, second], True)]:
        got, _, _ = roundtrip(elements, batched=batched)
        assert got.dtype == record
        np.testing.assert_array_equal(got, np.stack(elements) if batched else first)


def test_a_batch_of_zero_dimensional_arrays_stacks_into_a_vector():
    (values, labels), _, count = roundtrip([(np.array(0.5), 1), (np.array(1.5), 2)], batched=True)
    assert count == 2 and values.shape == (2,) and values.tolist() == [0.5, 1.5] and labels.tolist() == [1, 2]


def test_a_batch_of_different_shapes_is_refused_naming_the_leaf():
    with pytest.raises(ValueError, match=r"cannot batch element\[0\]: shapes \(2,\) and \(3,\)"):
        roundtrip([(np.zeros(2), 1), (np.zeros(3), 2)], batched=True)


@pytest.mark.parametrize(
    "leaf, words",
    [
        (None, "element[1]['x'] is a builtins.NoneType"),
        (object(), "element[1]['x'] is a builtins.object"),
        (np.array([{}, 1], dtype=object), "element[1]['x'] is a numpy array of dtype object (shape (2,))"),
    ],
)
def test_leaves_mpfeed_cannot_carry_are_refused_by_path(leaf, words):
    with pytest.raises(TypeError) as caught:
        Encoder().prepare([flatten((1, {"x": leaf}))], 0, False)
    assert words in str(caught.value)


def test_shapes_may_change_but_dtypes_and_structure_may_not():
    encoder = Encoder()
    encoder.prepare([flatten({"x": np.zeros((2, 2))})], 0, False)
    encoder.prepare([flatten({"x": np.zeros((5, 1))})], 1, False)  # a new shape is fine
    with pytest.raises(
        ValueError,
        match=r"element\['x'\] changed mid-stream from a 2-d array of float64 to a "
        r"2-d array of float32",
    ):
        encoder.prepare([flatten({"x": np.zeros((2, 2), dtype=np.float32)})], 2, False)
    with pytest.raises(ValueError, match=r"structure changed mid-stream: \{'y': leaf\} after \{'x': leaf\}"):
        encoder.prepare([flatten({"y": np.zeros((2, 2))})], 3, False)


def test_one_encoder_and_decoder_carry_a_stream_whose_shapes_and_sizes_vary():
    encoder, decoder = Encoder(), Decoder()
    raw = np.zeros(1 << 16, dtype=np.uint8)
    base = raw[-raw.ctypes.data % 64 :][: 1 << 15]
    for seq, rows in enumerate([2, 5, 2, 0, 5, 9]):  # shapes come back, layouts are reused
        element = {"x": np.arange(rows * 3, dtype=np.int16).reshape(rows, 3), "s": "é" * rows, "n": seq}
        record = encoder.prepare([flatten(element)], seq, False)
        record.write(base)
        got, _, _, nbytes = decoder.decode(base)
        np.testing.assert_array_equal(got["x"], element["x"])
        assert (got["s"], got["n"], nbytes) == (element["s"], seq, record.payload_bytes)


def test_a_subclass_or_another_byte_order_is_checked_in_full():
    encoder = Encoder()
    encoder.prepare([flatten((np.zeros(2, dtype="<i4"), 1))], 0, False)
    encoder.prepare([flatten((np.zeros(2, dtype="<i4").view(np.recarray), 2))], 1, False)  # same leaf
    with pytest.raises(ValueError, match=r"element\[0\] changed mid-stream .* to a 1-d array of >i4"):
        encoder.prepare([flatten((np.zeros(2, dtype=">i4"), 3))], 2, False)
    with pytest.raises(ValueError, match=r"element\[1\] changed mid-stream from int to bool"):
        encoder.prepare([flatten((np.zeros(2, dtype="<i4"), True))], 3, False)


@pytest.mark.parametrize("batched", [False, True])
def test_an_int_beyond_int64_is_refused_naming_the_leaf(batched):
    elements = [{"id": 1}, {"id": 2**64}] if batched else [{"id": 2**64}]
    with pytest.raises(ValueError, match=r"element\['id'\] .*beyond the int64 an int travels as"):
        Encoder().prepare([flatten(e) for e in elements], 0, batched)


def test_paths_and_alignment_helpers():
    treedef, leaves = flatten({"a": (1, [2, 3]), "b": 4})
    assert leaves == [1, 2, 3, 4]
    assert leaf_paths(treedef) == [
        "element['a'][0]",
        "element['a'][1][0]",
        "element['a'][1][1]",
        "element['b']",
    ]
    assert [align(n) for n in (0, 1, 64, 65)] == [0, 64, 64, 128]


# -- through real workers ----------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [None, 3])
@pytest.mark.parametrize("random_access", [False, True])
def test_namedtuples_come_back_as_namedtuples_batched_or_not(random_access, batch_size):
    """PyTorch's TestNamedTupleDataLoader: ``batch.data.positive`` must work, nested or not."""
    source = sources.NamedPairs(7) if random_access else sources.named_pairs
    args = () if random_access else (7,)
    with mpfeed.Feeder(source, args=args, workers=2, batch_size=batch_size) as feeder:
        elements = list(feeder)
    for element in elements:
        assert type(element) is sources.Labelled and type(element.data) is sources.Pair
        assert np.all(element.data.negative == -np.asarray(element.label))
        assert np.all(element.data.positive.T == element.label)


def test_namedtuples_come_back_as_namedtuples_through_dataset():
    pytest.importorskip("tensorflow")
    with mpfeed.Feeder(sources.named_pairs, args=(6,), workers=2) as feeder:
        elements = list(feeder.dataset())
    assert [int(e.label) for e in elements] == list(range(6))
    assert all(type(e) is sources.Labelled and type(e.data) is sources.Pair for e in elements)


@pytest.mark.parametrize(
    "kind, words",
    [
        ("dict_subclass", r"element is a sources.Tagged, a subclass of dict, list or tuple"),
        ("list_subclass", r"element is a sources.Items, a subclass of dict, list or tuple"),
        ("ordered_dict", r"element\['outer'\] is a collections.OrderedDict, a subclass of dict"),
        (
            "local_namedtuple",
            r"element is a namedtuple sources.Local, which mpfeed rebuilds by importing it by name",
        ),
    ],
)
def test_a_nest_that_cannot_be_rebuilt_is_refused_at_the_first_element(kind, words):
    with mpfeed.Feeder(sources.yields_nest, args=(kind,), workers=1) as feeder:
        with pytest.raises(mpfeed.ElementError, match=words) as caught:
            list(feeder)
    assert caught.value.element == 0


@pytest.mark.parametrize("batch_size", [None, 2])
def test_dicts_with_the_same_keys_in_another_order_are_the_same_structure(batch_size):
    """tf.nest sorts dict keys; so do we: key order is not structure."""
    with mpfeed.Feeder(sources.keys_in_turns, args=(9,), workers=2, batch_size=batch_size) as feeder:
        elements = list(feeder)
    labels = np.concatenate([np.atleast_1d(e["label"]) for e in elements])
    assert sorted(labels.tolist()) == list(range(9))
    for element in elements:
        assert list(element) == ["image", "label", "meta"] and list(element["meta"]) == ["a", "b"]
        assert np.all(element["meta"]["a"] == element["label"])


def test_a_masked_array_is_refused_instead_of_losing_its_mask():
    with mpfeed.Feeder(sources.masked, workers=1) as feeder:
        with pytest.raises(mpfeed.ElementError, match="element is a numpy masked array.*without its mask"):
            list(feeder)
