"""Benchmarks of the email worker: `bash bench/run.sh` (see bench/__main__.py)."""
