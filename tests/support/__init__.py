"""Helpers every kind of test shares: one of each (waits, the synthetic answer)."""
