"""The fetch/decode stage (worker.loading): threads or decode processes give the crops prepare_image gives, keep
every error's reason, and survive a decode process that dies."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ppl_model.imageio import decode_rgb
from ppl_model.inference.preprocess import Preprocessing, normalise, prepare_image
from ppl_model.reasons import Reason
from worker import crop_arena
from worker.loading import CropSpec, ProcessLoader, ThreadLoader, joined_crops
from worker.settings import Settings


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(97, 61), (40, 40), (300, 200)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"p{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"j{i}.jpg", quality=85)
    (root / "text.jpg").write_text("not an image")
    return root


@pytest.fixture(params=["threads", "processes"])
def loader(request, photos):
    settings = Settings.from_env({}, file_roots=(photos,), decode_threads=2, decode_processes=2)
    made = ThreadLoader(settings) if request.param == "threads" else ProcessLoader(settings, 2)
    yield made
    made.close()


@pytest.mark.parametrize("tiles", [1, 4])
def test_crops_are_exactly_what_prepare_image_makes(loader, photos, tiles):
    prep = Preprocessing(input_size=32, mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28), tiles=tiles)
    paths = sorted(p for p in photos.iterdir() if p.name != "text.jpg")
    fetched = loader.fetch([p.as_uri() for p in paths])
    try:
        assert all(f.error is None for f in fetched)
        decoded = loader.decode([f.handle for f in fetched], CropSpec(prep.input_size, prep.tiles, prep.mean))
    finally:
        loader.release(f.handle for f in fetched)
    for path, item, result in zip(paths, fetched, decoded, strict=True):
        expected = prepare_image(decode_rgb(path)[0], prep)
        assert result.error is None and result.crops is not None and result.crops.dtype == np.uint8
        assert (result.width, result.height) == (expected.width, expected.height)
        assert torch.equal(normalise(result.crops, prep.mean, prep.std), expected.crops)
        assert item.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert result.format == ("PNG" if path.suffix == ".png" else "JPEG")


def test_errors_keep_their_reasons(loader, photos):
    fetched = loader.fetch([(photos / "gone.png").as_uri(), (photos / "text.jpg").as_uri(), "ftp://x/y.png"])
    assert [f.error.reason if f.error else None for f in fetched] == [Reason.MISSING, None, Reason.INVALID_SOURCE]
    decoded = loader.decode([fetched[1].handle], CropSpec(32, 1, (0.5, 0.5, 0.5)))
    loader.release(f.handle for f in fetched)
    assert decoded[0].error is not None and decoded[0].error.reason == Reason.NOT_AN_IMAGE
    assert not decoded[0].error.transient


def test_released_bytes_are_gone(photos):
    settings = Settings.from_env({}, file_roots=(photos,), decode_threads=2)
    loader = ThreadLoader(settings)
    try:
        fetched = loader.fetch([(photos / "p0.png").as_uri()] * 3)
        assert len({f.handle for f in fetched}) == 3
        loader.release(f.handle for f in fetched)
        assert loader._data == {}
    finally:
        loader.close()


def _held_by(loader) -> list[int]:
    """How many fetched images' bytes each decode process (or the thread loader) still holds."""
    if isinstance(loader, ThreadLoader):
        return [len(loader._data)]
    # eval is picklable and runs in the decode process: a probe of its module state, for this test only
    probe = "len(__import__('worker.loading').loading._child_data)"
    return [process.submit(eval, probe).result() for process in loader._processes]


def test_decoding_drops_the_bytes_and_each_process_gets_one_message_a_call(loader, photos, monkeypatch):
    sent: list[str] = []

    def counted(real):
        return lambda function, *args: sent.append(function.__name__) or real(function, *args)

    for process in getattr(loader, "_processes", []):
        for method in ("submit", "post"):  # a call with a reply, and one without
            monkeypatch.setattr(process, method, counted(getattr(process, method)))
    paths = sorted(p for p in photos.iterdir() if p.name != "text.jpg")
    fetched = loader.fetch([p.as_uri() for p in paths])
    assert sum(_held_by(loader)) == len(paths)
    decoded = loader.decode([f.handle for f in fetched[1:]], CropSpec(32, 1, (0.5, 0.5, 0.5)))
    assert all(d.error is None for d in decoded)
    assert sum(_held_by(loader)) == 1  # only the image not decoded is still held
    loader.release(f.handle for f in fetched)
    assert sum(_held_by(loader)) == 0
    if isinstance(loader, ProcessLoader):
        calls = [name for name in sent if name in ("_child_fetch", "_child_decode", "_child_release")]
        processes = len(loader._processes)
        # one fetch and one decode message for each process; a release only for the process of the undecoded image
        assert calls == ["_child_fetch"] * processes + ["_child_decode"] * processes + ["_child_release"]


def test_a_decode_process_that_dies_fails_its_jobs_transiently_and_is_replaced(photos):
    settings = Settings.from_env({}, file_roots=(photos,))
    loader = ProcessLoader(settings, 1)
    try:
        source = (photos / "p1.png").as_uri()
        fetched = loader.fetch([source])
        assert fetched[0].error is None
        loader._processes[0].submit(os._exit, 9)  # the process dies, holding the fetched bytes
        decoded = loader.decode([fetched[0].handle], CropSpec(32, 1, (0.5, 0.5, 0.5)))
        loader.release([fetched[0].handle])
        assert decoded[0].error is not None and decoded[0].error.reason == Reason.DECODER_DIED
        assert decoded[0].error.transient  # retried by the pipeline, up to PPL_MAX_RETRIES
        again = loader.fetch([source])  # a new decode process took its place
        result = loader.decode([again[0].handle], CropSpec(32, 1, (0.5, 0.5, 0.5)))
        loader.release([again[0].handle])
        assert again[0].error is None and result[0].error is None and result[0].crops is not None
        process, arena = loader._arenas[0]
        assert process is loader._processes[0] and arena.in_use == 0  # the new process has an arena of its own
    finally:
        loader.close()


def test_close_ends_every_decode_process_and_the_threads_that_read_their_replies(photos):
    loader = ProcessLoader(Settings.from_env({}, file_roots=(photos,)), 2)
    fetched = loader.fetch([(photos / "p0.png").as_uri(), (photos / "p1.png").as_uri()])
    loader.decode([f.handle for f in fetched], CropSpec(32, 1, (0.5, 0.5, 0.5)))
    processes = list(loader._processes)
    readers = [p._reader for p in processes]
    assert all(t.is_alive() for t in readers) and all(p.process.is_alive() for p in processes)
    loader.close()
    assert [p.process.exitcode for p in processes] == [0, 0]  # told to stop, not killed
    assert not any(t.is_alive() for t in readers)


def _arena_files() -> set[str]:
    return {p.name for p in crop_arena.SHM_DIR.glob(f"{crop_arena.FILE_PREFIX}{os.getpid()}-*")}


def _decode_all(loader, paths, spec):
    fetched = loader.fetch([p.as_uri() for p in paths])
    try:
        return loader.decode([f.handle for f in fetched], spec)
    finally:
        loader.release(f.handle for f in fetched)


@pytest.fixture
def arena_reads(monkeypatch):
    """The shape of every crop the worker reads out of a crop arena (rather than from a decode process's pipe)."""
    reads = []
    real_read = crop_arena.CropArena.read_into
    monkeypatch.setattr(crop_arena.CropArena, "read_into", lambda self, slot, out: reads.append(out.shape)
                        or real_read(self, slot, out))
    return reads


def test_crops_come_back_through_shared_memory_that_leaves_no_file(photos, arena_reads):
    paths = sorted(p for p in photos.iterdir() if p.name != "text.jpg")
    spec = CropSpec(32, 4, (0.48, 0.46, 0.41))
    settings = Settings.from_env({}, file_roots=(photos,), decode_threads=2)
    expected = _decode_all(ThreadLoader(settings), paths, spec)
    loader = ProcessLoader(settings, 2)
    try:
        decoded = _decode_all(loader, paths, spec)
        assert len(arena_reads) == len(paths)  # every crop came back by its slot, none through the pipe
        assert all(arena.in_use == 0 for _, arena in loader._arenas.values())  # every slot given back
        assert _arena_files() == set()  # unlinked once the decode processes had them mapped
    finally:
        loader.close()
    for got, want in zip(decoded, expected, strict=True):
        assert got.error is None and got.crops is not None and want.crops is not None
        assert got.crops.dtype == np.uint8 and np.array_equal(got.crops, want.crops)
    # the crops of one decode call lie back to back in one array: the batch is a view of it, not a copy
    crops = [d.crops for d in decoded]
    joined = joined_crops(crops)
    assert np.shares_memory(joined, crops[0]) and np.array_equal(joined, np.concatenate(crops))


def test_crops_go_through_the_pipe_when_no_slot_or_no_shared_memory_is_left(photos, arena_reads, monkeypatch,
                                                                            tmp_path, caplog):
    paths = sorted(p for p in photos.iterdir() if p.name != "text.jpg")
    spec = CropSpec(32, 1, (0.5, 0.5, 0.5))
    settings = Settings.from_env({}, file_roots=(photos,), batch_size=1, batches_in_flight=1)
    expected = _decode_all(ThreadLoader(settings), paths, spec)
    loader = ProcessLoader(settings, 1)  # two slots: a call with three images cannot have them
    try:
        assert loader._slots == 2
        decoded = _decode_all(loader, paths, spec)
        assert arena_reads == []
    finally:
        loader.close()
    assert [d.crops.tobytes() for d in decoded] == [d.crops.tobytes() for d in expected]

    monkeypatch.setattr(crop_arena, "SHM_DIR", tmp_path / "no-such-dir")
    loader = ProcessLoader(settings, 1)
    try:
        decoded = _decode_all(loader, paths[:1], spec)
        assert loader._arenas == {} and "no shared memory for decoded crops" in caplog.text
    finally:
        loader.close()
    assert np.array_equal(decoded[0].crops, expected[0].crops)


def test_joined_crops_is_a_view_only_of_crops_back_to_back_in_order():
    rows = np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3)
    in_order = [rows[0:1], rows[1:3], rows[3:4]]
    joined = joined_crops(in_order)
    assert np.shares_memory(joined, rows) and np.array_equal(joined, rows[0:4])
    apart = [rows[3:4], rows[5:6], rows[3:4], rows[::2]]
    for crops in ([rows[1:2], rows[0:1]], [rows[0:1], rows[2:3]], [rows[1:2], rows[1:2]], [apart[3]],
                  [rows[0:1], rows[1:2].copy()], [np.ascontiguousarray(rows[:, :1]), rows[1:2, :1]]):
        joined = joined_crops(crops)  # out of order, a gap, repeated, strided, another array, other shapes
        assert not np.shares_memory(joined, rows) and np.array_equal(joined, np.concatenate(crops))
    assert np.array_equal(joined_crops([rows[2:3]]), rows[2:3])


def test_crops_of_one_call_are_copied_into_one_array_unless_their_sizes_differ(tmp_path):
    from worker.loading import Decoded, _into_one_array

    arena = crop_arena.CropArena(slot_bytes=27, slots=2, directory=tmp_path)
    writer = crop_arena.ArenaWriter(arena.id, str(arena.path), 27)
    arena.unlink()
    try:
        in_slot = np.full((1, 2, 2, 3), 7, np.uint8)
        writer.write(0, in_slot)
        piped = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3)
        results = {1: Decoded(), 2: Decoded(crops=piped), 3: Decoded(error=None)}
        _into_one_array([1, 2, 3], results, {1: (arena, 0, (1, 2, 2, 3))})
        joined = joined_crops([results[1].crops, results[2].crops])
        assert np.shares_memory(joined, results[2].crops) and np.array_equal(joined, np.concatenate([in_slot, piped]))
        assert results[3].crops is None

        other = np.zeros((1, 3, 3, 3), np.uint8)  # another crop size: each keeps crops of its own
        results = {1: Decoded(), 2: Decoded(crops=other)}
        _into_one_array([1, 2], results, {1: (arena, 0, (1, 2, 2, 3))})
        assert np.array_equal(results[1].crops, in_slot) and results[2].crops is other
    finally:
        writer.close()
        arena.close()


def test_crop_arena_hands_out_each_slot_once_and_checks_reads(tmp_path):
    arena = crop_arena.CropArena(slot_bytes=12, slots=3, directory=tmp_path)
    try:
        first = arena.take(2)
        assert first is not None and arena.take(2) is None and arena.in_use == 2
        second = arena.take(1)
        assert second is not None and not set(first) & set(second)
        writer = crop_arena.ArenaWriter(arena.id, str(arena.path), 12)
        arena.unlink()
        assert list(tmp_path.iterdir()) == []  # the mappings keep the memory, not the file
        crops = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3)
        assert writer.write(second[0], crops) == (1, 2, 2, 3)
        assert writer.write(first[0], np.zeros((1, 3, 3, 3), np.uint8)) is None  # does not fit a slot
        assert np.array_equal(arena.read(second[0], (1, 2, 2, 3)), crops)
        with pytest.raises(ValueError):
            arena.read(3, (1, 2, 2, 3))
        writer.close()
        arena.give_back(first + second)
        assert arena.in_use == 0
    finally:
        arena.close()
    assert arena.take(1) is None


def test_a_jpeg_is_decoded_from_its_crop_region_and_other_formats_in_full(photos, monkeypatch):
    from worker import loading

    full_decodes = []
    real = loading.decode_pixels
    monkeypatch.setattr(loading, "decode_pixels", lambda data, settings: full_decodes.append(len(data))
                        or real(data, settings))
    settings = Settings.from_env({}, file_roots=(photos,), decode_threads=2)
    loader = ThreadLoader(settings)
    try:
        fetched = loader.fetch([(photos / "j2.jpg").as_uri(), (photos / "p2.png").as_uri()])
        decoded = loader.decode([f.handle for f in fetched], CropSpec(32, 1, (0.5, 0.5, 0.5)))
        loader.release(f.handle for f in fetched)
    finally:
        loader.close()
    assert [d.format for d in decoded] == ["JPEG", "PNG"] and all(d.error is None for d in decoded)
    assert full_decodes == [(photos / "p2.png").stat().st_size]  # only the PNG was decoded whole


ORPHAN_SCRIPT = """
import multiprocessing, sys, time
from worker.loading import ProcessLoader
from worker.settings import Settings

if __name__ == "__main__":
    loader = ProcessLoader(Settings.from_env({}), 2)
    loader.fetch(["file:///nowhere/a.png"] * 4)  # starts the decode processes
    print(" ".join(str(child.pid) for child in multiprocessing.active_children()), flush=True)
    time.sleep(120)
"""


def test_decode_processes_end_when_their_worker_is_killed(tmp_path):
    script = tmp_path / "worker_with_decoders.py"
    script.write_text(ORPHAN_SCRIPT)
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, str(script)], cwd=repo, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    try:
        children = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(children) >= 2 and all(_alive(pid) for pid in children)
        proc.kill()  # kill -9: the worker cannot stop them itself
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in children), "decode processes outlived their worker"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (a dead child not yet reaped by its new parent)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
