"""Summaries, statistics, gates and comparisons of results, built from plain arrays (no torch)."""
