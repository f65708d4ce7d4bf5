"""The benchmark machinery behind `make bench`, `make scale` and `make scale-ray` (the scripts a user runs
live one level up, in scripts/). The benchmark itself is defined in docs/benchmarks.md.

Its modules depend on each other in one direction only:

    workloads    what one element costs; picklable, no TensorFlow (worker processes import it)
    harness      build one pipeline, consume it and time it; run rows in interleaved repetitions
    limits       what this machine allows: one core's rate, memcpy (no TensorFlow)
    contenders   what builds each row: tf.data, threads, pools, Keras, PyTorch, Grain, Ray, mpfeed
    plan         `make bench`'s rows: every contender and every limit for each workload
    report       medians, spreads, tables, the machine and the mpfeed that ran, JSON and PNG files
    figures      the figures README.md and docs/ quote, rendered from the data `make results` stores

workloads <- harness <- contenders, workloads <- limits, {harness, limits, contenders} <- plan <- report;
figures imports none of them (only the standard library).
Only `contenders` imports TensorFlow, and `plan` imports it only when a plan runs.
"""
