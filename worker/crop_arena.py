"""Shared memory through which decode processes hand their crops to the worker process.

A crop sent back through a decode process's pipe (150 kB for one 224 crop) costs the worker process's GIL more
than anything else it does for an image outside Celery: the thread that reads the process's replies reads the
message in pieces and unpickles it, a copy each. Instead each decode process writes its crops into slots of a
memory region it shares with the worker, only their shapes cross the pipe, and the worker copies each crop out
and frees its slot (docs/PERFORMANCE.md, "Serial CPU").

The region is a file in /dev/shm that both processes open and map, and that the worker unlinks as soon as its
decode process has it mapped: nothing is left behind however either process ends (kill -9 included), and the
memory goes with the last mapping. Its space is reserved when it is made (``posix_fallocate``), so a full
/dev/shm refuses the region there, instead of killing a process with SIGBUS at its first write. Where there
is no region (no /dev/shm, too little room in it, e.g. a container's 64 MB default) or no free slot, the
crops go through the pipe as before: slower, never wrong.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import mmap
import os
import threading
import uuid
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm")
FILE_PREFIX = "ppl-crops-"

_ids = itertools.count(1)


class CropArena:
    """The worker's side: ``slots`` slots of ``slot_bytes`` (one image's crops each), handed out and given back
    under a lock, as batches in several threads decode at once."""

    def __init__(self, slot_bytes: int, slots: int, directory: Path | None = None):
        self.id = next(_ids)
        self.slot_bytes = slot_bytes
        self.slots = slots
        self.path: Path | None = (directory or SHM_DIR) / f"{FILE_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        size = slot_bytes * slots
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            self._map: mmap.mmap | None = mmap.mmap(fd, size)
        except BaseException:
            self.unlink()
            raise
        finally:
            os.close(fd)
        self._free = list(range(slots))
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        with self._lock:
            return self.slots - len(self._free)

    def unlink(self) -> None:
        """Remove the file once the decode process has it mapped: the mappings keep the memory."""
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.path = None

    def take(self, count: int) -> list[int] | None:
        """``count`` free slots, or None when there are not that many (the caller uses the pipe)."""
        with self._lock:
            if self._map is None or count > len(self._free):
                return None
            taken, self._free = self._free[:count], self._free[count:]
            return taken

    def give_back(self, slots: list[int]) -> None:
        with self._lock:
            self._free.extend(slots)

    def read(self, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        """A copy of the uint8 array of ``shape`` a decode process wrote at ``slot``."""
        out = np.empty(shape, dtype=np.uint8)
        self.read_into(slot, out)
        return out

    def read_into(self, slot: int, out: np.ndarray) -> None:
        """Copy the uint8 array a decode process wrote at ``slot``, of ``out``'s shape, into ``out``."""
        if self._map is None:
            raise RuntimeError("the crop arena is closed")
        count = math.prod(out.shape)  # np.prod of a tuple costs microseconds, per image
        if not 0 <= slot < self.slots or count > self.slot_bytes:
            raise ValueError(f"slot {slot} cannot hold an array of shape {out.shape}")
        out[...] = np.frombuffer(self._map, np.uint8, count, slot * self.slot_bytes).reshape(out.shape)

    def close(self) -> None:
        self.unlink()
        with self._lock:
            if self._map is not None:
                self._map.close()
                self._map = None
                self._free = []


class ArenaWriter:
    """The decode process's side of one arena: maps the file the worker made (before the worker unlinks it)."""

    def __init__(self, arena_id: int, path: str, slot_bytes: int):
        self.arena_id = arena_id
        self.slot_bytes = slot_bytes
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, 0)
        finally:
            os.close(fd)

    def write(self, slot: int, crops: np.ndarray) -> tuple[int, ...] | None:
        """Put ``crops`` (uint8) at ``slot``: their shape, or None when they do not fit one slot."""
        if crops.dtype != np.uint8 or crops.nbytes > self.slot_bytes:
            return None
        target = np.frombuffer(self._map, np.uint8, crops.size, slot * self.slot_bytes)
        target[:] = crops.reshape(-1)
        del target  # no view may outlive the mapping (close raises otherwise)
        return tuple(crops.shape)

    def close(self) -> None:
        self._map.close()
