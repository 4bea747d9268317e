"""Benchmark scripts for fastntk_jax (scripts, never timed tests). See benchmarks/RESULTS.md."""
