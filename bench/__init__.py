"""Benchmarks: each writes JSON and a markdown table to bench/results/ (not run by the tests)."""
