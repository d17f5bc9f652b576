"""Benchmarks of sklearn-moe: accuracy against non-MoE baselines, and speed."""
