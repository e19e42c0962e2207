"""Fetch, hash and decode: the stage that turns a batch's sources into the crops the model judges.

Two steps, so that content already judged is answered from its hash before a pixel of it is decoded:

1. ``fetch`` reads each source (``worker.sources``: SSRF guard, roots, size caps) and hashes its bytes,
   keeping them under a handle;
2. the pipeline looks the hashes up; ``decode`` turns the handles it still needs into uint8 crops
   (``worker.decoding``: allow-list, pixel and memory caps, EXIF orientation; the centre crop or tiles of
   ``ppl_model.inference.crops``). A JPEG's crops are decoded from their regions alone where
   ``ppl_model.jpeg_region`` applies (bit-identical to a full decode), the rest in full. The image's
   provenance (``ppl_model.provenance``: C2PA, XMP source type, generator metadata) is read from the same
   bytes beside the decode, in the same thread or decode process, as is its frame count;
3. ``decode`` drops the bytes of the handles it decodes once their crops are made; ``release`` drops the bytes
   of any handle left (content found already judged, a batch given up part-way), and is harmless for the rest.

Two implementations behind one protocol, chosen by ``PPL_DECODE_PROCESSES``:

* ``ThreadLoader`` (0, the default): a thread pool of the worker process (``PPL_DECODE_THREADS``). Reading
  files and sockets, hashing and libjpeg release the GIL, but Pillow's Python glue and the crop code hold
  it: one process decodes on about one core's worth of Python.
* ``ProcessLoader`` (N > 0): N decode processes (``worker.decode_process``), each of which keeps the bytes it
  fetched, so a handle's ``decode`` runs where its bytes already are (a 12 MP photo is megabytes; its crop
  is 150 kB) and nothing but sources, digests and crop shapes crosses a pipe: the crops themselves come back
  through shared memory (``worker.crop_arena``), copied once, into one array per call whose rows the batch
  uses as they lie (``joined_crops``). They import neither torch nor Celery. A decode process that
  dies (a decoder crash, the OOM killer) fails only the jobs it held, with a transient reason so that they
  are retried, and is replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from ppl_model.inference.crops import crop_pixels
from ppl_model.provenance import Provenance, read_provenance
from ppl_model.reasons import Reason
from worker.crop_arena import ArenaWriter, CropArena
from worker.decode_process import DecodeProcess, DecodeProcessGone
from worker.decoding import decode_jpeg_region, decode_pixels
from worker.settings import Settings, provenance_policy
from worker.sources import SourceError, fetch_source

log = logging.getLogger(__name__)

ORPHAN_CHECK_S = 1.0  # how often a decode process checks that its worker is still alive


@dataclass(frozen=True)
class CropSpec:
    """What the model looks at: ``tiles`` crops of ``size``, padded with the normalisation ``mean``."""

    size: int
    tiles: int
    mean: tuple[float, float, float]


@dataclass(frozen=True)
class Fetched:
    """A source read and hashed (its bytes kept by the loader under ``handle``), or why it could not be."""

    handle: int
    sha256: str = ""
    fetch_ms: float = 0.0
    error: SourceError | None = None


@dataclass(frozen=True)
class Decoded:
    """An image's crops, ``(T, S, S, 3)`` uint8, and what its verdict row records; or why it could not be.
    Picklable: decode processes send it back (its crops through shared memory where there is room)."""

    width: int = 0
    height: int = 0
    format: str = ""
    crops: np.ndarray | None = None
    decode_ms: float = 0.0
    error: SourceError | None = None
    frames: int | None = None  # frames the file holds (animations, TIFF pages, HEIF images); the first is judged
    provenance: Provenance | None = None  # None only when the image could not be decoded (not read then)
    provenance_ms: float = 0.0


class Loader(Protocol):
    def fetch(self, sources: Sequence[str]) -> list[Fetched]:
        """Read and hash each source; keep the bytes of each success under its handle."""
        ...

    def decode(self, handles: Sequence[int], spec: CropSpec) -> list[Decoded]:
        """The crops of each fetched handle (in order); the bytes of each are dropped once it is decoded (a handle
        is decoded at most once)."""
        ...

    def release(self, handles: Iterable[int]) -> None:
        """Forget the bytes of these handles, if still held (not decoded)."""
        ...

    def close(self) -> None: ...


def make_loader(settings: Settings) -> Loader:
    if settings.decode_processes > 0:
        return ProcessLoader(settings, settings.decode_processes)
    return ThreadLoader(settings)


# ---------------------------------------------------------------------- the work itself (any process)


def fetch_and_hash(source: str, settings: Settings) -> tuple[bytes | None, str, float, SourceError | None]:
    """(bytes, sha256, milliseconds, None), or (None, "", milliseconds, the error)."""
    started = time.perf_counter()
    try:
        data = fetch_source(source, settings).data
        digest = hashlib.sha256(data).hexdigest()  # releases the GIL on large buffers
    except SourceError as exc:
        return None, "", 1000 * (time.perf_counter() - started), exc
    except Exception as exc:  # a fetch bug must not take the batch's other jobs down with it
        log.exception("unexpected error fetching %s", source[:200])
        return None, "", 1000 * (time.perf_counter() - started), \
            SourceError(Reason.DECODE_ERROR, f"{type(exc).__name__}: {exc}"[:500])
    return data, digest, 1000 * (time.perf_counter() - started), None


def decode_crops(data: bytes, settings: Settings, spec: CropSpec) -> Decoded:
    """The crops of an image, its size, format and frame count, and its provenance (read under the settings'
    policy, ``provenance_policy``; only for an image that decodes: a failed job stores none)."""
    started = time.perf_counter()
    try:
        region = decode_jpeg_region(data, settings, spec.size, spec.tiles, spec.mean)
        if region is not None:  # a plain JPEG: one frame
            width, height, image_format, crops, frames = region.width, region.height, region.format, region.crops, 1
        else:  # not a plain JPEG, or the region decoder refused it; an MPO's frames are counted by the full decode
            decoded = decode_pixels(data, settings)
            crops = crop_pixels(decoded.image, spec.size, spec.tiles, spec.mean)
            width, height, image_format, frames = decoded.image.width, decoded.image.height, decoded.format, \
                decoded.frames
            del decoded  # the full picture goes (and its decode-memory reservation with it) before the next decode
    except SourceError as exc:
        return Decoded(decode_ms=1000 * (time.perf_counter() - started), error=exc)
    except Exception as exc:  # a decoder bug must not take the batch's other jobs down with it
        log.exception("unexpected error decoding %d bytes", len(data))
        return Decoded(decode_ms=1000 * (time.perf_counter() - started),
                       error=SourceError(Reason.DECODE_ERROR, f"{type(exc).__name__}: {exc}"[:500]))
    decode_ms = 1000 * (time.perf_counter() - started)
    started = time.perf_counter()
    provenance = read_provenance(data, provenance_policy(settings))  # never raises: what it cannot read is in it
    return Decoded(width, height, image_format, crops, decode_ms, frames=frames, provenance=provenance,
                   provenance_ms=1000 * (time.perf_counter() - started))


# ------------------------------------------------------------------------------------------ threads


class ThreadLoader:
    """Fetch and decode in a thread pool of this process; the bytes wait in a dict."""

    def __init__(self, settings: Settings):
        self.settings = settings
        provenance_policy(settings)  # a bad PPL_C2PA_TRUST_ANCHORS fails here, before any job
        self.pool = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="ppl-fetch")
        self._data: dict[int, bytes] = {}
        self._handles = itertools.count()
        self._lock = threading.Lock()

    def fetch(self, sources: Sequence[str]) -> list[Fetched]:
        out = []
        for data, digest, ms, error in self.pool.map(lambda source: fetch_and_hash(source, self.settings), sources):
            with self._lock:
                handle = next(self._handles)
                if data is not None:
                    self._data[handle] = data
            out.append(Fetched(handle, digest, ms, error))
        return out

    def decode(self, handles: Sequence[int], spec: CropSpec) -> list[Decoded]:
        with self._lock:
            blobs = [self._data.pop(h) for h in handles]
        return list(self.pool.map(lambda data: decode_crops(data, self.settings, spec), blobs))

    def release(self, handles: Iterable[int]) -> None:
        with self._lock:
            for handle in handles:
                self._data.pop(handle, None)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self._data.clear()


# ---------------------------------------------------------------------------------------- processes

# What each decode process holds: its settings (set once, by the initializer), the bytes it fetched and its
# side of the crop arena it shares with the worker.
_child_settings: Settings | None = None
_child_data: dict[int, bytes] = {}
_child_arena: ArenaWriter | None = None

# Where a decode call puts its crops: (arena id, one slot per handle); None: in the reply, through the pipe.
Placement = tuple[int, list[int]] | None


def _child_init(settings: Settings, parent: int) -> None:
    global _child_settings
    _child_settings = settings
    threading.Thread(target=_exit_when_orphaned, args=(parent,), name="ppl-parent-watch", daemon=True).start()
    provenance_policy(settings)  # read the trust anchors once, before the first job


def _exit_when_orphaned(parent: int) -> None:
    """End this decode process once the worker that started it is gone. A worker killed outright (kill -9, the
    OOM killer) cannot shut its decode processes down: an idle one ends when its pipe closes (``DecodeProcess``),
    but one in the middle of a slow fetch or decode would run on to its end without this."""
    while os.getppid() == parent:
        time.sleep(ORPHAN_CHECK_S)
    os._exit(0)


def _child_fetch(items: list[tuple[int, str]]) -> list[tuple[int, str, float, SourceError | None]]:
    assert _child_settings is not None
    out = []
    for handle, source in items:
        data, digest, ms, error = fetch_and_hash(source, _child_settings)
        if data is not None:
            _child_data[handle] = data
        out.append((handle, digest, ms, error))
    return out


def _child_attach(arena_id: int, path: str, slot_bytes: int) -> None:
    """Map the worker's new crop arena (it unlinks the file once this returns)."""
    global _child_arena
    if _child_arena is not None:
        _child_arena.close()
    _child_arena = ArenaWriter(arena_id, path, slot_bytes)


def _child_decode(handles: list[int], spec: CropSpec, placement: Placement = None
                  ) -> list[tuple[Decoded, tuple[int, ...] | None]]:
    """Each handle's ``Decoded``, with the shape of its crops where they went to its arena slot instead (its
    ``crops`` is then None)."""
    assert _child_settings is not None
    arena = _child_arena if placement is not None and _child_arena is not None \
        and _child_arena.arena_id == placement[0] else None
    out: list[tuple[Decoded, tuple[int, ...] | None]] = []
    for index, handle in enumerate(handles):
        if handle not in _child_data:
            out.append((Decoded(error=SourceError(Reason.DECODER_DIED, "the decode process no longer holds these "
                                                                       "bytes")), None))
            continue
        decoded = decode_crops(_child_data.pop(handle), _child_settings, spec)
        shape = None
        if arena is not None and placement is not None and decoded.crops is not None:
            shape = arena.write(placement[1][index], decoded.crops)
            if shape is not None:
                decoded = replace(decoded, crops=None)
        out.append((decoded, shape))
    return out


def _child_release(handles: list[int]) -> None:
    for handle in handles:
        _child_data.pop(handle, None)


class ProcessLoader:
    """Fetch and decode in ``processes`` decode processes; each handle lives in the process that fetched it."""

    def __init__(self, settings: Settings, processes: int):
        self.settings = settings
        provenance_policy(settings)  # a bad PPL_C2PA_TRUST_ANCHORS fails here, not in every decode process
        # spawn, not fork: the worker process has threads (Celery's, torch's) whose locks a fork would copy held
        self._context = multiprocessing.get_context("spawn")
        self._processes = [self._start(index) for index in range(processes)]
        self._owner: dict[int, int] = {}  # handle → index of the process that holds its bytes
        self._handles = itertools.count()
        self._next = itertools.count()
        self._lock = threading.Lock()
        # Each process's crop arena, made on its first decode, with the process it was made for. Slots for
        # every batch in flight at once: a process gets at most a batch's share plus one image of each.
        self._arenas: dict[int, tuple[DecodeProcess, CropArena]] = {}
        self._arena_lock = threading.Lock()
        self._arenas_off = False
        self._slots = settings.batches_in_flight * (-(-settings.batch_size // processes) + 1)

    def _start(self, index: int) -> DecodeProcess:
        return DecodeProcess(self._context, _child_init, (self.settings, os.getpid()), f"ppl-decode-{index}")

    def _chunk(self, count: int) -> int:
        # One message for each process a call: every message costs this process CPU (pickling, a pipe write, a
        # reader thread's wake-up), serial work that caps what one worker can feed (docs/PERFORMANCE.md).
        return max(1, -(-count // len(self._processes)))

    def _spread(self, count: int) -> list[int]:
        """A process index for each of ``count`` items: consecutive chunks, round-robin over the processes."""
        with self._lock:
            first = next(self._next)
        chunk = self._chunk(count)
        return [(first + i // chunk) % len(self._processes) for i in range(count)]

    def fetch(self, sources: Sequence[str]) -> list[Fetched]:
        with self._lock:
            handles = [next(self._handles) for _ in sources]
        owners = self._spread(len(sources))
        with self._lock:
            self._owner.update(zip(handles, owners, strict=True))
        chunks = _chunks(list(zip(handles, sources, strict=True)), owners, self._chunk(len(sources)))
        results: dict[int, Fetched] = {}
        for owner, process, items, future in self._submit([(owner, items, ()) for owner, items in chunks],
                                                          _child_fetch):
            try:
                for handle, digest, ms, error in future.result():
                    results[handle] = Fetched(handle, digest, ms, error)
            except DecodeProcessGone as exc:
                self._replace(owner, process, exc)
                for handle, _ in items:
                    results[handle] = Fetched(handle, error=_died(exc))
        return [results[h] for h in handles]

    def decode(self, handles: Sequence[int], spec: CropSpec) -> list[Decoded]:
        with self._lock:
            owners = [self._owner[h] for h in handles]
        slot_bytes = spec.tiles * spec.size * spec.size * 3
        calls = []
        for owner, items in _chunks(list(handles), owners, self._chunk(len(handles))):
            arena = self._arena(owner, slot_bytes)
            slots = arena.take(len(items)) if arena is not None else None
            placement = (arena.id, slots) if arena is not None and slots is not None else None
            calls.append((owner, items, (spec, placement), arena if placement else None, slots or []))
        results: dict[int, Decoded] = {}
        submitted = self._submit([(owner, items, args) for owner, items, args, _, _ in calls], _child_decode)
        with self._lock:  # each decode drops its bytes in their process: nothing left for ``release`` to send
            for handle in handles:
                self._owner.pop(handle, None)
        in_arena: dict[int, tuple[CropArena, int, tuple[int, ...]]] = {}  # handle → where its crops wait
        try:
            for (owner, process, items, future), (_, _, _, arena, slots) in zip(submitted, calls, strict=True):
                try:
                    for index, (handle, (decoded, shape)) in enumerate(zip(items, future.result(), strict=True)):
                        if shape is not None and arena is not None:
                            in_arena[handle] = (arena, slots[index], shape)
                        results[handle] = decoded
                except DecodeProcessGone as exc:
                    self._replace(owner, process, exc)
                    for handle in items:
                        results[handle] = Decoded(error=_died(exc))
            _into_one_array(handles, results, in_arena)
        finally:
            for _, _, _, arena, slots in calls:
                if arena is not None:
                    arena.give_back(slots)
        return [results[h] for h in handles]

    def _arena(self, owner: int, slot_bytes: int) -> CropArena | None:
        """The crop arena of process ``owner`` for crops of ``slot_bytes``, made and mapped there on first use;
        None where crops go through the pipe (no shared memory, or crops of another size still on their way)."""
        with self._arena_lock:
            process = self._processes[owner]
            current = self._arenas.get(owner)
            if current is not None and current[0] is process:
                if current[1].slot_bytes == slot_bytes:
                    return current[1]
                if current[1].in_use:
                    return None
            if self._arenas_off:
                return None
            try:
                arena = CropArena(slot_bytes, self._slots)
            except OSError as exc:
                log.warning("no shared memory for decoded crops (%s): they come back through the decode "
                            "processes' pipes, at more CPU per image", exc)
                self._arenas_off = True
                return None
            try:
                process.submit(_child_attach, arena.id, str(arena.path), slot_bytes).result()
            except (DecodeProcessGone, OSError) as exc:  # a dead process: the next decode replaces it
                log.warning("decode process %d could not map its crop arena: %s", owner, exc)
                arena.close()
                return None
            finally:
                arena.unlink()
            # A replaced arena may still have slots on their way back: it is closed when the last reference goes.
            self._arenas[owner] = (process, arena)
            return arena

    def release(self, handles: Iterable[int]) -> None:
        by_owner: dict[int, list[int]] = {}
        with self._lock:
            for handle in handles:
                owner = self._owner.pop(handle, None)
                if owner is not None:
                    by_owner.setdefault(owner, []).append(handle)
        for owner, items in by_owner.items():
            # Queued after the decodes already sent to the same process: nothing still needed is dropped. A
            # process that is gone took its bytes with it.
            with contextlib.suppress(DecodeProcessGone):
                self._processes[owner].post(_child_release, items)

    def close(self) -> None:
        for process in self._processes:
            process.shutdown(wait=True)
        with self._arena_lock:
            for _, arena in self._arenas.values():
                arena.close()
            self._arenas.clear()

    def _submit(self, calls: list[tuple[int, list, tuple]], function: Callable
                ) -> list[tuple[int, DecodeProcess, list, Future]]:
        """``function(items, *args)`` in process ``owner`` for each call; a future that failed to submit holds
        ``DecodeProcessGone``."""
        submitted = []
        for owner, items, args in calls:
            process = self._processes[owner]
            future: Future
            try:
                future = process.submit(function, items, *args)
            except DecodeProcessGone as exc:  # dead, or shut down by a _replace meanwhile
                future = Future()
                future.set_exception(exc)
            submitted.append((owner, process, items, future))
        return submitted

    def _replace(self, owner: int, process: DecodeProcess, exc: BaseException) -> None:
        """Start a new decode process in place of a dead one: once, however many batches saw it die."""
        with self._lock:
            if self._processes[owner] is not process:
                return  # another caller replaced it already
            log.error("decode process %d died (%s); starting another", owner, exc)
            process.shutdown(wait=False)
            self._processes[owner] = self._start(owner)


def _into_one_array(handles: Sequence[int], results: dict[int, Decoded],
                    in_arena: dict[int, tuple[CropArena, int, tuple[int, ...]]]) -> None:
    """Copy the crops of ``handles`` (from their arena slots, or as the pipe brought them) into one new array, in
    order, each ``Decoded`` keeping a view of its rows: ``joined_crops`` then makes the batch without another
    copy. Left as they are when their crops differ in size."""
    placed: list[tuple[int, tuple[int, ...], np.ndarray | None]] = []  # handle, shape, crops from the pipe
    for handle in handles:
        crops = results[handle].crops
        where = in_arena.get(handle)
        if where is not None:
            placed.append((handle, where[2], None))
        elif crops is not None:
            placed.append((handle, crops.shape, crops))
    if not placed or len({shape[1:] for _, shape, _ in placed}) != 1:
        for handle, (arena, slot, shape) in in_arena.items():
            results[handle] = replace(results[handle], crops=arena.read(slot, shape))
        return
    rows = np.empty((sum(shape[0] for _, shape, _ in placed), *placed[0][1][1:]), dtype=np.uint8)
    start = 0
    for handle, shape, crops in placed:
        out = rows[start:start + shape[0]]
        start += shape[0]
        if crops is not None:
            out[...] = crops
        else:
            arena, slot, _ = in_arena[handle]
            arena.read_into(slot, out)
        results[handle] = replace(results[handle], crops=out)


def joined_crops(crops: Sequence[np.ndarray]) -> np.ndarray:
    """The crops of a batch as one ``(N, S, S, 3)`` array: a view where they lie back to back, in order, in one
    array (as ``ProcessLoader.decode`` hands them out), otherwise their concatenation (a copy)."""
    first = crops[0]
    base = first.base
    if isinstance(base, np.ndarray) and base.flags.c_contiguous:
        start = end = first.__array_interface__["data"][0]
        for crop in crops:
            if crop.base is not base or not crop.flags.c_contiguous or crop.dtype != first.dtype \
                    or crop.shape[1:] != first.shape[1:] or crop.__array_interface__["data"][0] != end:
                break
            end += crop.nbytes
        else:
            return np.ndarray((sum(len(crop) for crop in crops), *first.shape[1:]), dtype=first.dtype, buffer=base,
                              offset=start - base.__array_interface__["data"][0])
    return np.concatenate(crops)


def _chunks(items: list, owners: list[int], size: int) -> list[tuple[int, list]]:
    """Consecutive items of the same owner, ``size`` at most per message."""
    out: list[tuple[int, list]] = []
    for item, owner in zip(items, owners, strict=True):
        if out and out[-1][0] == owner and len(out[-1][1]) < size:
            out[-1][1].append(item)
        else:
            out.append((owner, [item]))
    return out


def _died(exc: BaseException) -> SourceError:
    return SourceError(Reason.DECODER_DIED, f"the decode process died while it held this job ({exc})"[:500])
