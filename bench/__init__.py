"""Benchmarks of sseserver side by side with peer servers (see bench/run.py)."""
