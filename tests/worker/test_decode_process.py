"""worker.decode_process: calls run in order in the process, each future gets its own reply (threads calling at
once included), and a process that dies or is shut down fails what it owes, never hangs a caller."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest

from worker.decode_process import DecodeProcess, DecodeProcessGone, UnreadableReply


@pytest.fixture
def process():
    # os.getpid: a picklable initializer that does nothing
    made = DecodeProcess(multiprocessing.get_context("spawn"), os.getpid, (), "test-decode")
    yield made
    made.shutdown(wait=False)


def test_results_and_errors_come_back_to_their_callers(process):
    assert process.submit(divmod, 17, 5).result(timeout=30) == (3, 2)
    assert process.submit(os.getpid).result(timeout=30) == process.process.pid != os.getpid()
    with pytest.raises(ZeroDivisionError):
        process.submit(divmod, 1, 0).result(timeout=30)
    assert process.submit(len, "abc").result(timeout=30) == 3  # an error does not end the process


def test_threads_calling_at_once_each_get_their_own_replies(process):
    wrong: list[tuple[int, int]] = []

    def caller(base: int) -> None:
        for i in range(50):
            futures = [process.submit(pow, base + i, 2), process.submit(divmod, base + i, 7)]
            got = [future.result(timeout=30) for future in futures]
            if got != [(base + i) ** 2, divmod(base + i, 7)]:
                wrong.append((base, i))

    threads = [threading.Thread(target=caller, args=(1000 * k,)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


def test_a_post_runs_in_order_without_a_reply_and_its_error_ends_nothing(process):
    process.post(exec, "import builtins; builtins.marker = 7")
    process.post(int, "not a number")  # raises there: logged there, nothing comes back
    assert process.submit(eval, "__import__('builtins').marker").result(timeout=30) == 7


def test_a_reply_that_does_not_pickle_fails_that_call_only(process):
    with pytest.raises(UnreadableReply, match="unpicklable reply"):
        process.submit(eval, "lambda: 1").result(timeout=30)
    assert process.submit(len, "ab").result(timeout=30) == 2 and process.alive  # not taken for a dead process


def test_a_process_that_dies_fails_every_call_it_owes_and_every_later_one(process):
    sleeping = process.submit(time.sleep, 30)
    queued = process.submit(len, "queued behind the sleep")
    os.kill(process.process.pid, signal.SIGKILL)
    for future in (sleeping, queued):
        with pytest.raises(DecodeProcessGone, match="exit code -9"):
            future.result(timeout=30)
    with pytest.raises(DecodeProcessGone):
        process.submit(len, "after")
    with pytest.raises(DecodeProcessGone):
        process.post(len, "after")
    assert not process.alive


def test_shutdown_answers_the_calls_sent_before_it(process):
    slow = process.submit(time.sleep, 0.3)
    after_it = process.submit(divmod, 9, 4)
    process.shutdown(wait=True)
    assert slow.result(timeout=0) is None and after_it.result(timeout=0) == (2, 1)
    assert process.process.exitcode == 0
    with pytest.raises(DecodeProcessGone, match="shut down"):
        process.submit(len, "late")


def test_shutdown_without_waiting_stops_a_busy_process_at_once(process):
    busy = process.submit(time.sleep, 60)
    started = time.monotonic()
    process.shutdown(wait=False)
    assert time.monotonic() - started < 10
    with pytest.raises(DecodeProcessGone):
        busy.result(timeout=0)
    assert process.process.exitcode == -signal.SIGKILL
