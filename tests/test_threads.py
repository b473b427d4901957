"""TensorFlow in a trial uses the CPUs Ray gave it, not every core (Ray's OMP_NUM_THREADS alone does not do it)."""

import subprocess
import sys

SCRIPT = """
from stages.training.trial import configure_tensorflow
configure_tensorflow({cpus})
import tensorflow as tf
tf.constant(1.0) + 1  # initialises the runtime with the settings
print(tf.config.threading.get_intra_op_parallelism_threads(), tf.config.threading.get_inter_op_parallelism_threads())
"""


def test_trial_threads_follow_the_cpu_allotment():
    for cpus, expected in [(1, "1 1"), (2.5, "2 2")]:
        result = subprocess.run(
            [sys.executable, "-c", SCRIPT.format(cpus=cpus)], capture_output=True, text=True, timeout=120
        )
        assert result.stdout.split("\n")[-2] == expected, result.stderr[-2000:]
