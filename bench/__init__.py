"""Benchmarks: the bridge measured side by side with reference handlers in one run."""
