"""Benchmarks: evaluation data, runner, report."""
