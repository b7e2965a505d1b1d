"""Helpers for testing and benchmarking vqfast against the classic implementations."""
