"""`from_generator`: a `tf.data.Dataset` in the shape of TensorFlow's ``from_generator``, whose source
runs in a feeder's worker processes. It joins the two faces: it makes a `Feeder` and asks `mpfeed.tf`
for the signature's dtypes, so neither of those modules needs the other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .feeder import Feeder
from .tf import is_dtype_nest, numpy_dtypes, signature_of

if TYPE_CHECKING:
    import tensorflow as tf


def from_generator(
    source: Any,
    output_signature: Any = None,
    args: tuple = (),
    *,
    input_context: tf.distribute.InputContext | None = None,
    output_types: Any = None,
    output_shapes: Any = None,
    name: str | None = None,
    **feeder_options: Any,
) -> tf.data.Dataset:
    """Shaped like `tf.data.Dataset.from_generator`, but ``source`` runs in worker processes.

    ``source`` as for `mpfeed.Feeder` (a random-access object, or a generator function called as
    ``source(*args, shard=Shard, **kwargs)``), whose options (``workers``, ``batch_size``, ``shuffle``,
    ...) pass through. ``input_context`` (from ``strategy.distribute_datasets_from_function``) gives this
    input pipeline its own partition of the data; with ``shuffle=True`` every pipeline needs the same
    ``seed``. The dataset owns its feeder: the workers stop when it is collected.

    With ``output_signature`` (a nest of `tf.TensorSpec`, or one spec), or TensorFlow's older
    ``output_types`` and ``output_shapes`` (a nest of dtypes in the second place is taken as
    ``output_types``), the workers convert every element to the signature as tf.data does: numbers to the
    spec's dtype (float64 to float32, int64 to int32, wrapping and truncating as tf.data does), Python
    lists and scalars where the signature has a tensor. Without either, the signature is inferred from
    the first element. What still differs from TensorFlow's: docs/from_generator.md.
    """
    del name  # tf.data names its ops with it; mpfeed's dataset has no ops of its own to name
    if output_signature is not None and is_dtype_nest(output_signature) and output_types is None:
        output_signature, output_types = None, output_signature  # TensorFlow's order: output_types second
    output_signature = signature_of(output_signature, output_types, output_shapes)
    if input_context is not None:
        if "partition" in feeder_options:
            raise ValueError("pass input_context or partition, not both")
        feeder_options["partition"] = (input_context.input_pipeline_id, input_context.num_input_pipelines)
    if output_signature is not None:
        if "dtypes" in feeder_options:
            raise ValueError("pass output_signature (or output_types) or dtypes, not both")
        feeder_options["dtypes"] = numpy_dtypes(output_signature)
    return Feeder(source, args=args, **feeder_options).dataset(output_signature)
