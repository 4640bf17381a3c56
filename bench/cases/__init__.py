"""Benchmark cases, one module per kernel; every module here is imported by ``bench.load_cases``.

To add a kernel's cases, add one module here (see bench/README.md); nothing else needs editing.
"""
