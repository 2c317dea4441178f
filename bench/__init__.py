"""The on-demand benchmark suite (bench/run); never part of the test suite."""
