"""`mpfeed.from_generator` as a drop-in for `tf.data.Dataset.from_generator`: the same elements, leaf by
leaf, for the same values and signature (conversions made in the workers), the same refusals with
messages that name the leaf, and iterator checkpoints that say what to use instead."""

from __future__ import annotations

import numpy as np
import pytest
import sources

import mpfeed

tf = pytest.importorskip("tensorflow")

S = tf.TensorSpec

# (what a source yields, the signature): everything here tf.data's from_generator accepts.
ACCEPTED = {
    "float64 array to float32": (np.array([1.5, -2.25]), S((2,), tf.float32)),
    "float64 array to int32 (truncates)": (np.array([1.7, -2.5]), S((2,), tf.int32)),
    "int64 array to int32": (np.array([1, -2]), S((2,), tf.int32)),
    "int64 array out of int32's range (wraps)": (np.array([2**40 + 3]), S((1,), tf.int32)),
    "int64 array to uint8 (wraps)": (np.array([-1, 300]), S((2,), tf.uint8)),
    "int64 array to float32": (np.array([1, 2]), S((2,), tf.float32)),
    "float32 array to float64": (np.array([1.5], np.float32), S((1,), tf.float64)),
    "float32 array to float16": (np.array([1.5], np.float32), S((1,), tf.float16)),
    "bool array to int32": (np.array([True, False]), S((2,), tf.int32)),
    "int64 array to bool": (np.array([2, 0]), S((2,), tf.bool)),
    "complex128 to complex64": (np.array([1 + 2j]), S((1,), tf.complex64)),
    "numpy float64 scalar to float32": (np.float64(1.5), S((), tf.float32)),
    "Python float to float32": (1.5, S((), tf.float32)),
    "Python float to int32": (1.5, S((), tf.int32)),
    "Python int to float32": (3, S((), tf.float32)),
    "Python int to int32": (3, S((), tf.int32)),
    "Python int out of int32's range": (2**40, S((), tf.int32)),
    "Python int to uint8": (-1, S((), tf.uint8)),
    "Python bool to int32": (True, S((), tf.int32)),
    "Python int to bool": (1, S((), tf.bool)),
    "Python int to int64": (7, S((), tf.int64)),
    "a list is a tensor": ([1, 2, 3], S((3,), tf.float32)),
    "a list of floats to int32": ([1.5, 2.0], S((2,), tf.int32)),
    "a nested list": ([[1, 2], [3, 4]], S((2, 2), tf.float32)),
    "a list of arrays": ([np.zeros(2), np.ones(2)], S((2, 2), tf.float32)),
    "a list of bools to int32": ([True, False], S((2,), tf.int32)),
    "a tuple where the signature has a tensor": ((1, 2, 3), S((3,), tf.int32)),
    "an empty list, unknown length": ([], S((None,), tf.int32)),
    "str": ("héllo", S((), tf.string)),
    "bytes": (b"ab\x00", S((), tf.string)),
    "a list of str": (["a", "bc"], S((2,), tf.string)),
    "a list of bytes": ([b"a", b"bc"], S((2,), tf.string)),
    "a text array": (np.array(["a", "bc"]), S((2,), tf.string)),
    "text parsed as a number": ("1.5", S((), tf.float32)),
    "None to float32 (NaN)": (None, S((), tf.float32)),
}


def as_numpy(element):
    """tf.data's element as a nest of numpy values."""
    return tf.nest.map_structure(lambda tensor: np.asarray(tensor.numpy()), element)


def assert_same_elements(want: list, got: list) -> None:
    assert len(got) == len(want)
    for index, (a, b) in enumerate(zip(want, got)):
        tf.nest.assert_same_structure(a, b)
        paths = [path for path, _ in _with_paths(a, f"element {index}")]
        for path, x, y in zip(paths, tf.nest.flatten(a), tf.nest.flatten(b)):
            assert (x.dtype, x.shape) == (y.dtype, y.shape), path
            if x.dtype == object:
                assert x.tolist() == y.tolist(), path
            else:
                np.testing.assert_array_equal(x, y, err_msg=path)


def _with_paths(node, path):
    if isinstance(node, dict):
        for key in sorted(node):
            yield from _with_paths(node[key], f"{path}[{key!r}]")
    elif isinstance(node, tuple):
        for index, child in enumerate(node):
            yield from _with_paths(child, f"{path}[{index}]")
    else:
        yield path, node


def both(items: list, *args, **kwargs) -> tuple[list, list]:
    """The elements TensorFlow's from_generator and mpfeed's make of ``items`` with these arguments."""
    want = [as_numpy(e) for e in tf.data.Dataset.from_generator(lambda: iter(items), *args, **kwargs)]
    dataset = mpfeed.from_generator(list(items), *args, workers=1, **kwargs)
    got = [as_numpy(e) for e in dataset]
    return want, got


def test_values_are_converted_to_the_signature_as_tf_data_converts_them():
    """float64 to a float32 spec, int64 to int32, Python lists and scalars where the signature has a
    tensor, text: one element holding every case, then a second one whose dict keys come in another
    order and whose leaves are of other Python types."""
    names = list(ACCEPTED)
    signature = {"cases": tuple(ACCEPTED[name][1] for name in names), "label": S((), tf.int32)}
    first = {"cases": tuple(ACCEPTED[name][0] for name in names), "label": np.int64(1)}
    second = {"label": 2.0, "cases": first["cases"]}
    want, got = both([first, second], output_signature=signature)
    assert_same_elements(want, got)


def test_the_workers_convert_so_the_consumer_still_gets_views():
    """A float64 array for a float32 spec arrives as float32 from the worker: the feeder hands out
    float32 views, not float64 ones that TensorFlow would have to copy."""
    items = [np.full((256, 256), i, dtype=np.float64) for i in range(3)]
    dataset = mpfeed.from_generator(items, output_signature=S((256, 256), tf.float32), workers=1)
    feeder = dataset._mpfeed_feeder
    element = next(iter(feeder))
    assert element.dtype == np.float32 and not element.flags.owndata and not element.flags.writeable
    del element
    assert [float(e[0, 0]) for e in dataset] == [0.0, 1.0, 2.0]


def test_a_generator_source_in_batches_is_converted_element_by_element():
    """A generator source with several workers and ``batch_size``: each element is converted before the
    worker stacks it, and the batches equal tf.data's batches of the converted elements."""
    signature = {"x": S((None, 3, 4), tf.float64), "i": S((None,), tf.int32)}
    dataset = mpfeed.from_generator(sources.numbered, signature, args=(10,), workers=2, batch_size=5)
    got = [as_numpy(batch) for batch in dataset]
    element = {"x": S((3, 4), tf.float64), "i": S((), tf.int32)}
    reference = tf.data.Dataset.from_generator(
        lambda: sources.numbered(10, mpfeed.Shard(0, 1, 0, 0, 0)), output_signature=element
    )
    # worker 0 makes elements 0, 2, 4, 6, 8 and worker 1 the odd ones: each batch is one worker's
    want = [as_numpy(batch) for batch in reference.filter(lambda e: e["i"] % 2 == 0).batch(5)]
    want += [as_numpy(batch) for batch in reference.filter(lambda e: e["i"] % 2 == 1).batch(5)]
    assert_same_elements(want, got)


def test_a_signature_dtype_that_records_cannot_carry_is_refused_up_front():
    with pytest.raises(TypeError, match=r"bfloat16 for element\['x'\].*tf.cast"):
        mpfeed.from_generator([{"x": 1.0}], output_signature={"x": S((), tf.bfloat16)}, workers=1)
    with pytest.raises(TypeError, match="dtypes must be a nest"):
        mpfeed.Feeder([1], workers=1, dtypes=(np.float32, None))


def test_a_single_spec_takes_a_single_tensor():
    want, got = both([[1.0, 2.0], [3.0, 4.0]], output_signature=S((2,), tf.float32))
    assert_same_elements(want, got)


def test_output_types_and_output_shapes_as_tensorflows_deprecated_pair():
    items = [(np.array([1.5, 2.5]), 3), (np.array([0.5, 1.0]), 4)]
    cases = [
        {"output_types": (tf.float32, tf.int32)},
        {"output_types": (tf.float32, tf.int32), "output_shapes": ((2,), ())},
        {"output_types": (tf.float32, tf.int32), "output_shapes": (tf.TensorShape([None]), None)},
    ]
    for kwargs in cases:
        want, got = both(items, **kwargs)
        assert_same_elements(want, got)
        dataset = mpfeed.from_generator(items, workers=1, **kwargs)
        reference = tf.data.Dataset.from_generator(lambda: iter(items), **kwargs)
        assert dataset.element_spec == reference.element_spec, kwargs
    # TensorFlow's positional order: output_types second
    want, got = both([{"x": 1}, {"x": 2}], {"x": tf.float32})
    assert_same_elements(want, got)


def test_output_types_with_output_signature_are_refused_as_tensorflow_refuses_them():
    for kwargs in (
        {"output_signature": S((), tf.int32), "output_types": tf.int32},
        {"output_signature": S((), tf.int32), "output_shapes": ()},
    ):
        with pytest.raises(TypeError, match="can not be used together"):
            tf.data.Dataset.from_generator(lambda: iter([1]), **kwargs)
        with pytest.raises(TypeError, match="can not be used together"):
            mpfeed.from_generator([1], workers=1, **kwargs)


# (what a source yields, the signature, what mpfeed's message must say): tf.data refuses each of these.
REFUSED = {
    "a list where the signature has a tuple": (
        [np.float32(1), np.float32(2)],
        (S((), tf.float32), S((), tf.float32)),
        r"element is a list of 2, but output_signature has \(float32, float32\) there",
    ),
    "a tuple where the signature has a dict": (
        (1, 2),
        {"a": S((), tf.int32), "b": S((), tf.int32)},
        r"element is \(int, int\), but output_signature has \{'a': int32, 'b': int32\} there",
    ),
    "a dict where the signature has a tuple": (
        {"a": 1, "b": 2},
        (S((), tf.int32), S((), tf.int32)),
        r"element is \{'a': int, 'b': int\}, but output_signature has \(int32, int32\) there",
    ),
    "a dict with a key more": (
        {"a": 1, "b": 2, "c": 3},
        {"a": S((), tf.int32), "b": S((), tf.int32)},
        r"element is \{'a': int, 'b': int, 'c': int\}, but output_signature has \{'a': int32, 'b': int32\}",
    ),
    "a tuple too long, nested": (
        {"x": (1, 2, 3)},
        {"x": (S((), tf.int32), S((), tf.int32))},
        r"element\['x'\] is \(int, int, int\), but output_signature has \(int32, int32\) there",
    ),
    "an int where the signature has a string": (
        (b"ok", 1),
        (S((), tf.string), S((), tf.string)),
        r"element\[1\] is 1, but output_signature expects a string tensor there",
    ),
    "a ragged list": (
        ([[1, 2], [3]],),
        (S((2, None), tf.float32),),
        r"element\[0\] is \[\[1, 2\], \[3\]\], which tf.data cannot convert to a float32 tensor",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_tf_data_refuses_is_refused_with_the_leaf_named(case):
    value, signature, message = REFUSED[case]
    with pytest.raises(tf.errors.OpError):
        list(tf.data.Dataset.from_generator(lambda: iter([value]), output_signature=signature))
    dataset = mpfeed.from_generator([value], output_signature=signature, workers=1)
    with pytest.raises(Exception, match=message):
        list(dataset)


def test_a_dict_signature_for_a_tuple_element_names_the_leaf_and_both_structures():
    """Without conversion (a feeder's own dataset), the check of the first element used to crash on
    ``element[key]`` with "tuple indices must be integers"."""
    with mpfeed.Feeder([(np.int32(1), np.int32(2))], workers=1) as feeder:
        dataset = feeder.dataset({"a": S((), tf.int32), "b": S((), tf.int32)})
        with pytest.raises(Exception, match=r"element is \(int32, int32\) where output_signature has"):
            list(dataset)


def test_an_iterator_checkpoint_says_what_to_use_instead(tmp_path):
    """TensorFlow cannot checkpoint an iterator over Python code (from_generator's PyFunc, or, with
    the external-state policy set to ignore it, its GeneratorDataset): the error points to what saves
    an mpfeed dataset's position, and keeps TensorFlow's type. A symbolic checkpoint, which TensorFlow
    saved and then restored by replaying the feeder's next epoch (another order when shuffled), is
    refused the same way."""
    with mpfeed.Feeder(list(range(20)), workers=1) as feeder:
        dataset = feeder.dataset(S((), tf.int64))
        pipelines = {"as made": dataset.batch(4).prefetch(2)}
        options = tf.data.Options()
        options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
        pipelines["ignoring external state"] = dataset.map(lambda x: x + 1).with_options(options)
        symbolic = tf.data.Options()
        symbolic.experimental_symbolic_checkpoint = True
        pipelines["symbolic"] = dataset.shuffle(4, seed=0).with_options(symbolic)
        for name, pipeline in pipelines.items():
            iterator = iter(pipeline)
            next(iterator)
            checkpoint = tf.train.Checkpoint(iterator=iterator)
            with pytest.raises(tf.errors.OpError) as raised:
                checkpoint.save(str(tmp_path / name.replace(" ", "-")))
            message = str(raised.value)
            assert "mpfeed.keras.BackupAndRestore(feeder" in message, name
            assert "mpfeed.tf.FeederState(feeder)" in message, name
            assert "consumed" in message, name
    # a plain from_generator keeps TensorFlow's own message
    plain = iter(tf.data.Dataset.from_generator(lambda: iter([1, 2]), output_signature=S((), tf.int64)))
    next(plain)
    with pytest.raises(tf.errors.FailedPreconditionError) as raised:
        tf.train.Checkpoint(iterator=plain).save(str(tmp_path / "plain"))
    assert "mpfeed" not in str(raised.value)


def test_a_feeders_own_dataset_converts_when_given_the_signatures_dtypes():
    """Without ``dtypes`` a list for a tensor is refused, with the way to have it converted in the
    message; with them, the feeder's own dataset converts as from_generator does."""
    signature = S((3,), tf.float32)
    with mpfeed.Feeder([[1, 2, 3]], workers=1) as feeder:
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"numpy_dtypes\(output_signature\)"):
            list(feeder.dataset(signature))
    with mpfeed.Feeder([[1, 2, 3]], workers=1, dtypes=mpfeed.tf.numpy_dtypes(signature)) as feeder:
        assert [e.numpy().tolist() for e in feeder.dataset(signature)] == [[1.0, 2.0, 3.0]]
