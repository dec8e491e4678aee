"""Benchmarks and profiling tools, outside the shipped package: `forkserve bench` (run.py), the
per-step phase and decode profiles (phases.py, profile.py)."""
