"""Benchmarks (one module per question, each printing a table and `--json`) and a quick demo."""
