"""Benchmarks and reports (``python -m resfuse_kernels.bench``)."""
