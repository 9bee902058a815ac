"""Benchmarks that print ratios against a baseline measured in the same run, and their records.

Each script runs as a module from the repository root (``python -m bench.bench_loading``; the
Makefile's ``bench-*`` targets) and writes a JSON record under ``bench/results/`` through
:mod:`bench.record`, from which ``make bench-report`` builds the README's table.
"""
