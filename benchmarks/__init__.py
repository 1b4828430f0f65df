"""Benchmarks, run as `python -m benchmarks.bench` from the repo root."""
