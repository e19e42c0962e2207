"""The worker tests' process harness, kept in one place with the benchmark's: see benchmarks/harness.py."""

from benchmarks.harness import PRODUCER, HarnessError, WaitTimeout, WorkerProcess, produce, wait_until

__all__ = ["PRODUCER", "HarnessError", "WaitTimeout", "WorkerProcess", "produce", "wait_until"]
