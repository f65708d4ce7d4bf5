"""Why not tf.data service: it cannot run a Python source on a worker of its own.

Starts a tf.data service dispatcher here and one worker in another process (as on another host), then
asks the service for a `from_generator` dataset. The worker fails: TensorFlow keeps Python callbacks in
the process that defined them, so the remote worker finds none ("Could not find callback with
key=pyfunc_0"). `numpy_function` and `py_function` fail the same way.

    python scripts/tf_data_service_pyfunc.py     # ~20 s; prints the worker's error
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

WORKER = """
import sys, time
import tensorflow as tf
service = tf.data.experimental.service
worker = service.WorkerServer(service.WorkerConfig(dispatcher_address=sys.argv[1]))
time.sleep(600)
"""


def elements():
    for i in range(5):
        yield np.full(3, i)


def main() -> int:
    service = tf.data.experimental.service
    dispatcher = service.DispatchServer()
    address = dispatcher.target.split("://")[1]
    worker = subprocess.Popen([sys.executable, "-c", WORKER, address])
    try:
        time.sleep(5)  # the worker registers with the dispatcher
        dataset = tf.data.Dataset.from_generator(elements, output_signature=tf.TensorSpec((3,), tf.int64))
        dataset = dataset.apply(
            service.distribute(processing_mode="parallel_epochs", service=dispatcher.target)
        )
        try:
            print("the service delivered", [row.tolist() for row in dataset.as_numpy_iterator()])
            return 1
        except Exception as error:  # the worker's error, relayed by the dispatcher
            message = next((line for line in str(error).splitlines() if "callback" in line), str(error))
            print(f"tf {tf.__version__}: {type(error).__name__}: {message.strip()}")
            return 0
    finally:
        worker.kill()
        worker.wait()


if __name__ == "__main__":
    sys.exit(main())
