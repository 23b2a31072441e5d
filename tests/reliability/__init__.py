"""Reliability tests: kill -9, concurrency, fuzzing and trainer resume against real processes."""
