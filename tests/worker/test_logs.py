"""worker.logs: every line a worker writes to stderr is JSON, native libraries' included."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import ctypes, logging, os, sys
    from worker import logs
    logs.configure("INFO")
    logging.getLogger("worker.test").info("python record", extra={"batch_id": "b1"})
    # What libtiff's default warning handler does: fprintf(stderr, ...) from C, past Python entirely
    libc = ctypes.CDLL(None)
    stderr = ctypes.c_void_p.in_dll(libc, "stderr")
    libc.fprintf(stderr, b"TIFFReadDirectory: Warning, Unknown field with tag 33000 (0x80e8) encountered.\\n")
    libc.fflush(stderr)
    os.write(2, b"half a line, then \\xff invalid UTF-8")
    os.write(2, b" and its end\\n")
    print("a stray print to sys.stderr", file=sys.stderr)
    # A real libtiff error through Pillow: a deflate strip that is no deflate stream
    import struct
    from ppl_model.imageio import UnreadableImage, decode_rgb
    junk = b"these bytes are no deflate stream"
    tags = [(256, 8), (257, 8), (258, 8), (259, 8), (262, 1), (273, 8 + 2 + 12 * 8 + 4), (278, 8), (279, len(junk))]
    tiff = b"II*\\x00" + struct.pack("<IH", 8, len(tags))
    tiff += b"".join(struct.pack("<HHII", tag, 4, 1, value) for tag, value in tags) + b"\\x00" * 4 + junk
    try:
        decode_rgb(tiff)
    except UnreadableImage:
        pass
    logs.configure("INFO")  # Celery may set logging up again: still no loop, still JSON
    logging.getLogger("worker.test").warning("after reconfigure")
    logs._native.restore()
""")


def test_native_and_python_stderr_lines_all_become_json_records() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    lines = done.stderr.decode().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses: nothing raw reaches the log
    by_message = {record["msg"]: record for record in records}
    assert by_message["python record"]["batch_id"] == "b1"
    native = by_message["TIFFReadDirectory: Warning, Unknown field with tag 33000 (0x80e8) encountered."]
    assert (native["logger"], native["level"], native["stream"]) == ("native", "WARNING", "stderr")
    assert by_message["half a line, then \\xff invalid UTF-8 and its end"]["logger"] == "native"
    assert by_message["a stray print to sys.stderr"]["logger"] == "native"
    assert "after reconfigure" in by_message
    libtiff = [r for r in records if r["msg"].startswith("ZIPDecode")]
    assert libtiff and libtiff[0]["logger"] == "native"
    assert len(records) == 6
