"""Benchmarks for student_sync: scripts that print figures (see bench_sync.py)."""
