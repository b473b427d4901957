"""Side-by-side benchmarks of the pipeline against plain TensorFlow on this machine: `python -m benchmarks --help`.

Every figure that matters is a ratio between two things measured in the same invocation; absolute rates move by up to
2x from day to day on shared machines. See benchmarks/README.md for the suites and the figures last measured.
"""


class BenchmarkError(RuntimeError):
    """A trainer the benchmark started failed: said in one line, with the end of its error output."""
