"""Benchmarks of rto: throughput (benchmarks.throughput) and generation speed."""
