"""Benchmarks: each data layout (MLLMU-Bench, CLEAR, local split files) parses its files, names its splits
and detects itself; the evaluation items and unlearning samples every stage reads come from here."""
