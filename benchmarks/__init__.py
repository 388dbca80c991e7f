"""Benchmarks: timings and memory of the ETL, training, streaming, serving, the embedding step
and the metrics, each written up in docs/BENCHMARKS.md; `duckdb_samples` is the reference ETL
the Spark job is timed and checked against."""
