"""Training throughput benchmarks; the command and its options are ov_train/cli/bench.py's."""
