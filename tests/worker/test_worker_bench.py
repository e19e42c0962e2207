"""``ppl-worker bench`` (benchmarks/worker_bench.py) at a tiny scale against the real services: every part
runs, every job is accounted for, the ratios come from the measured figures, the JSON is written, and nothing
is left behind (databases, Redis keys, worker processes). Timing targets are not checked here: they belong to
the full-size run (docs/PERFORMANCE.md)."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
import redis
from PIL import Image
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from benchmarks.image_sets import Kind, make_realistic, mix_table
from benchmarks.worker_bench import (
    BenchError,
    WorkerBenchConfig,
    markdown_table,
    run_soak,
    run_worker_bench,
    soak_table,
    with_comment,
)
from worker.cli import main


def bench_databases(server_url: str) -> list[str]:
    engine = create_engine(server_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            names = conn.execute(text("SELECT datname FROM pg_database WHERE datname LIKE 'ppl_bench_%'"))
            return names.scalars().all()
    finally:
        engine.dispose()


@pytest.fixture
def config(tmp_path, pg_server_url, redis_url) -> WorkerBenchConfig:
    return WorkerBenchConfig(out=tmp_path / "bench", server_url=pg_server_url, broker_url=redis_url, images=40,
                             image_size=64, batch_size=8, decode_threads=2, warmup_jobs=4, upsert_rows=400,
                             upsert_context_batches=(1, 64), rescan_rows=2000, rescan_chunk=500, soak_jobs=200,
                             soak_every=50, timeout_s=90, decode_process_sweep=(0, 2))


def test_every_part_runs_and_every_job_is_accounted_for(config, pg_server_url, redis_url):
    before = set(bench_databases(pg_server_url))
    messages: list[str] = []
    result = run_worker_bench(config, log=messages.append)

    for name in ("scan", "end_to_end", "naive"):
        (run,) = result[name]["runs"]
        assert run["images"] == 40 and run["seconds"] > 0 and result[name]["images_per_s"] == run["images_per_s"] > 0
    assert result["end_to_end"]["runs"][0]["worker_rss_mib"] > 0
    assert result["efficiency"] == pytest.approx(result["end_to_end"]["images_per_s"] / result["scan"]["images_per_s"])
    assert result["speedup"] == pytest.approx(result["end_to_end"]["images_per_s"] / result["naive"]["images_per_s"])

    upserts = result["upserts"]
    assert [b["batch"] for b in upserts["by_batch"]] == [1, 8, 64]
    assert upserts["rows_per_s"] == upserts["by_batch"][1]["rows_per_s"] > 0
    for row in upserts["by_batch"]:  # write and COPY alternate in rounds of distinct rows, whole batches each
        assert row["rows"] % row["batch"] == 0 and 0 < row["rows"] <= max(400, 4 * row["batch"])
        assert row["copy_rows_per_s"] > 0 and row["ratio"] == pytest.approx(row["rows_per_s"] / row["copy_rows_per_s"],
                                                                            rel=1e-2)

    rescan = result["rescan"]
    assert rescan["enqueued"] == rescan["queued"] == 2000 and rescan["jobs_per_s"] > 0
    assert rescan["lpush_jobs_per_s"] > 0
    assert rescan["ratio"] == pytest.approx(rescan["jobs_per_s"] / rescan["lpush_jobs_per_s"], rel=1e-2)
    assert 0 < rescan["rss_start_mib"] <= rescan["rss_peak_mib"] and rescan["rss_end_mib"] <= rescan["rss_peak_mib"]

    emulated = result["emulated"]
    assert [p["decode_processes"] for p in emulated["sweep"]] == [0, 2]
    for point in emulated["sweep"]:  # 40 images at 3,000/s would take 13 ms of "compute": far below the rate
        assert point["images_per_s"] > 0 and point["share_of_rate"] == pytest.approx(point["images_per_s"] / 3000,
                                                                                  abs=1e-3)
        assert point["cpu_ms_per_image"] > 0 and point["full_gc_ms_total"] >= 0 and point["full_gc_ms_max"] >= 0
        assert 0 <= point["consumer_cpu_ms_per_image"] <= point["cpu_ms_per_image"]
    assert any("emulated worker-p2" in m for m in messages)
    # importing torch alone makes full collections: each emulated worker has logged some (the window may hold none)
    assert len(list((config.out / "logs").glob("gc-emulated*.txt"))) == 2

    assert [t["met"] is not None for t in result["targets"]] == [True] * 7
    assert json.loads((config.out / "worker-bench.json").read_text()) == json.loads(json.dumps(result))
    table = markdown_table(result)
    assert table.count("PASS") + table.count("MISS") == 7 and "rescan of 2,000 stale verdicts" in table
    assert "emulated accelerator at 3,000 images/s, 2 decode processes" in table
    assert result["model"]["origin"].startswith("built") and (config.out / "model" / "model.json").is_file()
    assert any("batched worker" in m for m in messages) and any("naive worker" in m for m in messages)

    # Nothing left behind: the benchmark's databases are dropped and its Redis database is empty.
    assert set(bench_databases(pg_server_url)) == before
    assert redis.Redis.from_url(redis_url).dbsize() == 0


def test_soak_reports_memory_and_throughput_per_block(config, redis_url):
    result = run_soak(config)
    assert result["jobs"] == 200 and result["images_per_s"] > 0
    assert [b["jobs"] for b in result["blocks"]] == [50, 100, 150, 200]
    assert all(b["images_per_s"] > 0 and b["worker_rss_mib"] > 0 for b in result["blocks"])
    assert result["rss_start_mib"] > 0 and result["rss_end_mib"] > 0
    assert result["memory_bounded"] == (result["rss_growth"] <= config.soak_rss_growth)
    assert json.loads((config.out / "worker-soak.json").read_text())["blocks"] == result["blocks"]
    assert "| 200 |" in soak_table(result)
    assert not (config.out / "soak-images").exists() and redis.Redis.from_url(redis_url).dbsize() == 0


def test_the_command_runs_a_part_and_refuses_a_shared_redis_database(tmp_path, pg_server_url, redis_url, capfd,
                                                                     monkeypatch):
    # ppl-worker bench runs the benchmark from the repository root; a relative --out is still read from here.
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cli"
    assert main(["bench", "--out", "cli", "--parts", "upserts", "--upsert-rows", "200",
                 "--images", "4", "--database-url", pg_server_url, "--broker-url", redis_url]) == 0
    printed = capfd.readouterr().out
    assert "verdict writes (verdicts + submissions), batch 32" in printed
    assert "| rescan enqueue ÷ pipelined LPUSH | – |" in printed
    assert json.loads((out / "worker-bench.json").read_text())["upserts"]["batch"] == 32
    with pytest.raises(BenchError, match="not /0"):
        WorkerBenchConfig(out=out, broker_url="redis://127.0.0.1:6379/0").validate()
    with pytest.raises(BenchError, match="unknown part"):
        WorkerBenchConfig(out=out, parts=("scan", "gpu")).validate()


def test_a_jpeg_comment_changes_the_bytes_not_the_pixels(tmp_path):
    from PIL import Image

    from benchmarks.worker_bench import make_images

    (path,) = make_images(tmp_path, 1, 48, seed=3)
    data = path.read_bytes()
    copy = with_comment(data, b"soak job 7")
    assert copy != data
    (tmp_path / "copy.jpg").write_bytes(copy)
    with Image.open(path) as a, Image.open(tmp_path / "copy.jpg") as b:
        assert a.tobytes() == b.tobytes()


def test_the_command_needs_a_source_checkout(tmp_path, monkeypatch, capsys):
    import worker.db

    monkeypatch.setattr(worker.db, "REPO_ROOT", tmp_path)  # as in a wheel install: no benchmarks/ beside worker/
    assert main(["bench", "--out", str(tmp_path / "out")]) == 2
    assert "source checkout" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_realistic_set_mixes_sizes_formats_and_duplicates(tmp_path):
    kinds = (Kind("small JPEG", 0.5, 120, 90, "JPEG", quality=85), Kind("big progressive JPEG", 0.25, 400, 300,
                                                                          "JPEG", progressive=True),
             Kind("screenshot", 0.25, 200, 100, "PNG", screenshot=True))
    paths, mix = make_realistic(tmp_path / "set", 20, seed=3, kinds=kinds, duplicate_share=0.2)
    assert len(paths) == len(set(paths)) == 20
    assert [row["count"] for row in mix] == [8, 4, 4, 4]
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert len(set(digests)) == 16  # four byte-identical duplicates
    sizes = {Image.open(p).size for p in paths}
    assert sizes == {(120, 90), (400, 300), (200, 100)}
    progressive = [p for p in paths if Image.open(p).size == (400, 300)]
    assert all(Image.open(p).info.get("progressive") for p in progressive)
    again, _ = make_realistic(tmp_path / "again", 20, seed=3, kinds=kinds, duplicate_share=0.2)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]  # deterministic for a seed
    assert "| screenshot | 4 | 200×100 |" in mix_table(mix)


def test_the_storage_benchmark_runs_alone_and_prints_its_ratios(tmp_path, pg_server_url, redis_url, capsys):
    from benchmarks import storage_bench

    before = set(bench_databases(pg_server_url))
    assert storage_bench.main(["--out", str(tmp_path / "storage"), "--database-url", pg_server_url, "--broker-url",
                               redis_url, "--write-rows", "256", "--batches", "32,256", "--rescan-rows", "1500",
                               "--rescan-chunk", "400"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "storage" / "storage-bench.json").read_text())
    assert [b["batch"] for b in result["upserts"]["by_batch"]] == [32, 256]
    assert result["rescan"]["enqueued"] == result["rescan"]["queued"] == 1500
    assert [t["name"] for t in result["targets"]] == [
        "verdict writes ÷ COPY, batch 32", "verdict writes ÷ COPY, batch 256", "rescan enqueue ÷ pipelined LPUSH",
        "rescan memory flat (peak − start RSS)"]
    assert printed.count("ratio") == 3 and printed.count("PASS") + printed.count("MISS") == 4
    assert set(bench_databases(pg_server_url)) == before and redis.Redis.from_url(redis_url).dbsize() == 0


def test_the_batch_path_benchmark_measures_each_size_on_new_content(tmp_path, pg_server_url, capsys):
    from benchmarks import batch_path_cpu

    before = set(bench_databases(pg_server_url))
    assert batch_path_cpu.main(["--out", str(tmp_path / "path"), "--database-url", pg_server_url, "--batches",
                                "2,4", "--images", "8", "--rounds", "2", "--decode-processes", "1"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "path" / "batch-path.json").read_text())
    assert [(row["batch"], row["images"]) for row in result["by_size"]] == [(2, 16), (4, 16)]
    assert all(row["cpu_ms_per_batch"] > 0 and row["database_ms_per_batch"] > 0 for row in result["by_size"])
    assert "| 4 |" in printed and "ms of CPU per batch +" in printed
    assert set(bench_databases(pg_server_url)) == before


def test_the_consumer_floor_takes_every_message_and_acknowledges_each_one_once(redis_url, capsys, tmp_path):
    from benchmarks import consumer_floor
    from benchmarks.harness import send_jobs

    assert consumer_floor.main(["--broker-url", redis_url, "--messages", "150", "--batch", "32",
                                "--rounds", "2"]) == 0  # 150: the last batch is a partial one
    result = json.loads(capsys.readouterr().out)
    assert (result["messages"], result["batch"]) == (150, 32)
    assert len(result["cpu_ms_per_message"]) == 2 and all(cpu > 0 for cpu in result["cpu_ms_per_message"])
    client = redis.Redis.from_url(redis_url)
    assert client.dbsize() == 0  # its database flushed after it

    send_jobs(redis_url, [tmp_path / "a.jpg"])
    with pytest.raises(consumer_floor.ConsumerFloorError, match="ran dry after 1 of 2"):
        consumer_floor.consume(client, consumer_floor.DETECT_QUEUE, 2, 32)


def test_the_decode_message_cost_is_measured_both_ways_per_count_of_processes(capsys):
    from benchmarks import decode_messages

    decode_messages.main(["--processes", "1,2", "--calls", "8", "--rounds", "1"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row[0].strip() for row in rows[1:]] == ["1", "2"]
    for row in rows[1:]:
        executor_ms, pipe_ms = (float(cell.split()[0]) for cell in row[1:3])
        assert executor_ms > 0 and pipe_ms > 0 and float(row[3]) == pytest.approx(pipe_ms / executor_ms, abs=0.01)


def test_the_batch_path_fit_splits_a_fixed_cost_from_a_cost_per_image():
    from benchmarks.batch_path_cpu import fit_fixed_and_per_image

    fixed, per_image = fit_fixed_and_per_image([(32, 10.0), (128, 34.0), (64, 18.0)])
    assert fixed == pytest.approx(2.0) and per_image == pytest.approx(0.25)
    with pytest.raises(ValueError, match="two batch sizes"):
        fit_fixed_and_per_image([(32, 10.0), (32, 11.0)])
    with pytest.raises(SystemExit):
        from benchmarks.batch_path_cpu import main

        main(["--out", "unused", "--batches", "32"])


def test_the_emulated_worker_logs_each_full_collection_and_the_bench_reads_its_window(tmp_path):
    import gc

    from benchmarks.emulated_worker import log_full_collections
    from benchmarks.worker_bench import full_collections

    log_path = tmp_path / "gc.txt"
    callbacks = list(gc.callbacks)
    try:
        log_full_collections(str(log_path))
        start = time.time()
        gc.collect(1)  # not a full collection: not logged
        assert not log_path.exists()
        gc.collect()
        gc.collect()
        end = time.time()
    finally:
        gc.callbacks[:] = callbacks
    lines = log_path.read_text().splitlines()
    assert len(lines) == 2
    end += 0.01  # the log's times are rounded to the microsecond
    assert len(full_collections(log_path, start, end)) == 2 and min(full_collections(log_path, start, end)) >= 0
    assert full_collections(log_path, end + 1, end + 2) == [] and full_collections(tmp_path / "none", 0, end) == []
