"""Benchmarks, and the process harness the tests share with them: a source checkout's, never shipped.

pyproject's package list names ``ppl_model`` and ``worker`` only, so neither a wheel nor an editable install
carries this package; it imports from the repository root (pytest's rootdir, or the working directory that
``ppl-worker bench`` gives ``python -m benchmarks.worker_bench``).
"""
