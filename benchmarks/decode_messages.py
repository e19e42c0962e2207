"""What one call to a decode process costs the worker process's CPU: ``worker.decode_process.DecodeProcess``
against the ``concurrent.futures.ProcessPoolExecutor(max_workers=1)`` it replaced, in the same run.

Each round sends one call to each of P processes at once and waits for every reply, as a batch's fetch or
decode does; a call carries a fetch-sized message (16 sources) and gets a fetch-sized reply (16 digests). The
figure is this process's CPU (all its threads: callers, readers, the executor's manager and feeder) per call;
the processes' own CPU is not counted.

    python -m benchmarks.decode_messages --processes 1,2,8 --calls 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from functools import partial

from worker.decode_process import DecodeProcess

SOURCES = [(index, f"https://images.example.com/uploads/2026/12/{index:08d}.jpg") for index in range(16)]


def _fetch_reply(items: list[tuple[int, str]]) -> list[tuple[int, str, float, None]]:
    return [(handle, f"{handle:064x}", 1.5, None) for handle, _ in items]


def _cpu_per_call(submitters: list[Callable[[], Future]], calls: int) -> float:
    expected = _fetch_reply(SOURCES)
    for future in [submit() for submit in submitters]:  # warm: the processes are up and have run once
        if future.result() != expected:
            raise RuntimeError("a decode process answered something other than the call's reply")
    rounds = calls // len(submitters)
    started = time.process_time()
    for _ in range(rounds):
        for future in [submit() for submit in submitters]:
            future.result()
    return 1000 * (time.process_time() - started) / (rounds * len(submitters))


def measure(processes: int, calls: int) -> tuple[float, float]:
    """(executor, DecodeProcess): milliseconds of this process's CPU per call."""
    context = multiprocessing.get_context("spawn")
    executors = [ProcessPoolExecutor(max_workers=1, mp_context=context) for _ in range(processes)]
    try:
        executor_ms = _cpu_per_call([partial(e.submit, _fetch_reply, SOURCES) for e in executors], calls)
    finally:
        for executor in executors:
            executor.shutdown()
    decoders = [DecodeProcess(context, os.getpid, (), f"bench-decode-{i}") for i in range(processes)]
    try:
        pipe_ms = _cpu_per_call([partial(d.submit, _fetch_reply, SOURCES) for d in decoders], calls)
    finally:
        for decoder in decoders:
            decoder.shutdown()
    return executor_ms, pipe_ms


def _listed(values: Iterable[float]) -> str:
    return ", ".join(f"{value:.3f}" for value in values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,2,8", help="comma-separated counts of decode processes")
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per count, alternating the two")
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    print("| decode processes | ProcessPoolExecutor: ms of CPU per call | DecodeProcess | ratio |")
    print("|---|---|---|---|")
    for processes in (int(p) for p in args.processes.split(",")):
        pairs = [measure(processes, args.calls) for _ in range(args.rounds)]
        old = statistics.median(p[0] for p in pairs)
        new = statistics.median(p[1] for p in pairs)
        print(f"| {processes} | {old:.3f} ({_listed(p[0] for p in pairs)}) | {new:.3f} "
              f"({_listed(p[1] for p in pairs)}) | {new / old:.2f} |")


if __name__ == "__main__":
    main()
