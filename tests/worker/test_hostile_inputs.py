"""A corpus of hostile inputs, generated here, through one real worker process over real Redis and PostgreSQL.

Proves that every hostile job — broken or disguised files, decompression-bomb headers, odd but valid images,
invalid URLs, URLs and redirects to loopback/private/metadata addresses, file:// escapes, hostile HTTP servers,
wrong or unstorable task arguments — ends as exactly one row: a ``detection_failures`` row with its stable
reason code, or a verdict with the right size and format for a valid odd image. Nothing is retried or
redelivered, nothing is logged as an unexpected error, and afterwards the same worker still judges a fresh job.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text

from tests.worker.http_server import QuietHandler
from tests.worker.processes import WorkerProcess, produce, wait_until
from worker import db

MAX_DOWNLOAD_BYTES = 8_000_000  # small enough that the oversized file and the endless body stop early
ALL_DONE_WAIT_S = 60.0

# -- the job's world: an upload root, a folder outside it, and a loopback HTTP server ---------------------------


Route = Callable[["Handler"], None]


@dataclass
class World:
    root: Path  # PPL_FILE_ROOTS
    outside: Path  # next to the root, never readable through it
    base: str  # http://127.0.0.1:PORT of the test server (allowlisted)
    closed_port: int  # nothing listens here
    routes: dict[str, Route] = field(default_factory=dict)

    def file(self, name: str, data: bytes) -> str:
        path = self.root / name
        path.write_bytes(data)
        return path.as_uri()

    def serve(self, path: str, route: Route) -> str:
        self.routes[path] = route
        return self.base + path


class Handler(QuietHandler):
    routes: dict[str, Route]  # set on a per-server subclass

    def do_GET(self) -> None:
        route = self.routes.get(self.path.split("?", 1)[0])
        if route is None:
            self.send_body(404, b"not found", "text/plain")
        else:
            route(self)


def body(data: bytes, content_type: str = "image/png", status: int = 200) -> Route:
    return lambda h: h.send_body(status, data, content_type)


def redirect(location: str) -> Route:
    return lambda h: h.send_body(302, b"", "text/plain", {"Location": location})


def declared_huge(h: Handler) -> None:
    """Declares a gigabyte and sends nothing: refused on the header, before any body is awaited."""
    h.send_response(200)
    h.send_header("Content-Length", str(10**9))
    h.end_headers()
    h.close_connection = True


def endless(h: Handler) -> None:
    """A chunked body that never ends (until the client hangs up, or 10 s, so the thread always ends)."""
    h.send_response(200)
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    chunk = b"10000\r\n" + b"\x89" * 0x10000 + b"\r\n"
    end = time.monotonic() + 10
    try:
        while time.monotonic() < end:
            h.wfile.write(chunk)
    except OSError:
        pass
    h.close_connection = True


def cut_short(h: Handler) -> None:
    h.send_response(200)
    h.send_header("Content-Length", "1000")
    h.end_headers()
    h.wfile.write(b"\x89PNG\r\n\x1a\n")
    h.close_connection = True


def slow(h: Handler) -> None:
    time.sleep(2.5)  # over the worker's 1 s read timeout
    with contextlib.suppress(OSError):  # the worker has hung up by now
        h.send_body(200, png_bytes(noise(8, 8, "slow")), "image/png")


def nul_in_status_line(h: Handler) -> None:
    """An HTTP status line with a NUL in its reason phrase: http.client accepts it, PostgreSQL text does not."""
    h.wfile.write(b"HTTP/1.1 404 Not\x00Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    h.close_connection = True


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a batch connects at once: the default backlog of 5 drops SYNs (1 s retries)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    root, outside = tmp_path / "uploads", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    with socket.socket() as probe:  # a port that was free a moment ago: nothing will answer on it
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    routes: dict[str, Route] = {}
    httpd = Server(("127.0.0.1", 0), type("BoundHandler", (Handler,), {"routes": routes}))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield World(root, outside, f"http://127.0.0.1:{httpd.server_address[1]}", closed_port, routes)
    finally:
        httpd.shutdown()
        httpd.server_close()


# -- generated images ---------------------------------------------------------------------------------------------


def noise(width: int, height: int, seed: str, mode: str = "RGB") -> Image.Image:
    """Random pixels; every valid image differs, since verdicts are stored once per content."""
    rng = np.random.default_rng(int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16))
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def encode(img: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_bytes(img: Image.Image, **options: Any) -> bytes:
    return encode(img, "PNG", **options)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, depth: int, colour_type: int, rows: bytes, extra: bytes = b"") -> bytes:
    """A PNG written by hand, for what Pillow will not write: 16-bit RGB, headers that lie, bombs in chunks."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + extra + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def grey_rows(width: int, height: int, value: int = 0x10) -> bytes:
    return (b"\x00" + bytes([value]) * width) * height  # filter byte + one 8-bit sample per pixel


def jpeg_with_size(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims another size."""
    data = bytearray(encode(noise(16, 16, "sof"), "JPEG"))
    at = data.index(b"\xff\xc0") + 5  # marker, length (2), precision (1), then height and width
    struct.pack_into(">HH", data, at, height, width)
    return bytes(data)


def gif_with_screen(width: int, height: int) -> bytes:
    """A GIF whose logical screen and only frame claim ``width``×``height`` over a few bytes of LZW data."""
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + b","
            + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00;")


def rotated_jpeg(orientation: int, seed: str, exif_text: str = "") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    if exif_text:
        exif[0x010E] = exif_text  # ImageDescription
    return encode(noise(40, 24, seed), "JPEG", exif=exif.tobytes())


def tiff_with_float_strip_offset() -> bytes:
    """A 16-bit TIFF whose StripOffsets tag is typed FLOAT: Pillow's loader raises TypeError on it."""
    data = bytearray(encode(Image.fromarray((np.arange(63, dtype=np.uint16) * 1000).reshape(7, 9)), "TIFF"))
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 273:  # StripOffsets
            struct.pack_into("<H", data, entry + 2, 11)  # type FLOAT
            return bytes(data)
    raise AssertionError("no StripOffsets tag in the TIFF Pillow wrote")


def animated_gif() -> bytes:
    frames = [noise(20, 14, f"gif{i}", "P") for i in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def apng() -> bytes:
    frames = [noise(22, 18, f"apng{i}") for i in range(3)]
    return png_bytes(frames[0], save_all=True, append_images=frames[1:], duration=50)


def multipage_tiff() -> bytes:
    return encode(noise(40, 30, "tiff-page-1"), "TIFF", save_all=True, append_images=[noise(64, 64, "tiff-page-2")])


def palette_with_transparency() -> bytes:
    img = noise(26, 20, "palette", "P")
    return png_bytes(img, transparency=bytes(range(0, 256, 4)))  # tRNS: alpha 0..252 for the first 64 entries


def sixteen_bit_grey() -> bytes:
    values = np.random.default_rng(16).integers(0, 65536, (21, 17), dtype=np.uint16)
    return png_bytes(Image.fromarray(values))  # mode I;16


def sixteen_bit_rgb() -> bytes:
    rng = np.random.default_rng(48)
    samples = rng.integers(0, 65536, (11, 3 * 19), dtype=np.uint16).astype(">u2")  # PNG is big-endian
    rows = b"".join(b"\x00" + row.tobytes() for row in samples)
    return raw_png(19, 11, 16, 2, rows)


def text_chunk_png(size: int) -> bytes:
    return raw_png(6, 5, 8, 0, grey_rows(6, 5), extra=png_chunk(b"tEXt", b"Comment\x00" + b"A" * size))


def ztxt_bomb_png() -> bytes:
    """A zTXt chunk of 16 kB that inflates to 16 MB of text (Pillow refuses text chunks over 1 MB)."""
    bomb = zlib.compress(b"A" * 16_000_000, 9)
    return raw_png(6, 5, 8, 0, grey_rows(6, 5, 0x20), extra=png_chunk(b"zTXt", b"Comment\x00\x00" + bomb))


def truncated(data: bytes, fraction: float = 0.5) -> bytes:
    return data[: int(len(data) * fraction)]


# -- the cases ----------------------------------------------------------------------------------------------------

Make = Callable[[World], dict[str, Any]]  # the job's keyword arguments (external_id added unless given)


@dataclass(frozen=True)
class Case:
    name: str
    make: Make
    reason: str | None = None  # expected detection_failures.reason, or None for a verdict
    verdict: tuple[int, int, str] | None = None  # expected (width, height, format) of the verdict
    detail: str = ""  # a piece of the failure's detail that shows the reason is the right one
    args: tuple[Any, ...] = ()  # positional task arguments (the task takes none)

    def __post_init__(self) -> None:
        assert (self.reason is None) != (self.verdict is None), f"{self.name}: a reason or a verdict, not both"


def image_file(name: str, data: Callable[[], bytes]) -> Make:
    return lambda w: {"source": w.file(name, data())}


def source(uri: str) -> Make:
    return lambda w: {"source": uri}


def http(path: str, route: Route) -> Make:
    return lambda w: {"source": w.serve(path, route)}


def symlink(name: str, target: Callable[[World], Path], content: bytes | None = None) -> Make:
    def make(w: World) -> dict[str, Any]:
        destination = target(w)
        if content is not None:
            destination.write_bytes(content)
        (w.root / name).symlink_to(destination)
        return {"source": (w.root / name).as_uri()}
    return make


def special(name: str, create: Callable[[Path], None]) -> Make:
    def make(w: World) -> dict[str, Any]:
        create(w.root / name)
        return {"source": (w.root / name).as_uri()}
    return make


def redirected_image(w: World) -> dict[str, Any]:
    """Two hops, relative then absolute, to a valid image: redirects as such are fine."""
    w.serve("/hop", redirect("/hop2"))
    w.serve("/hop2", redirect(w.base + "/after-hops.png"))
    w.serve("/after-hops.png", body(png_bytes(noise(39, 25, "hops"))))
    return {"source": w.base + "/hop"}


def linked_directory(w: World) -> dict[str, Any]:
    (w.outside / "secret.png").write_bytes(png_bytes(noise(9, 9, "secret")))
    (w.root / "linked").symlink_to(w.outside, target_is_directory=True)
    return {"source": (w.root / "linked" / "secret.png").as_uri()}


def sparse_file(path: Path) -> None:
    with path.open("wb") as f:
        f.truncate(MAX_DOWNLOAD_BYTES + 1)


def kwargs(**values: Any) -> Make:
    """Literal task arguments; a "{root}" or "{base}" in the source is filled in from the world."""
    def make(w: World) -> dict[str, Any]:
        out = dict(values)
        if isinstance(out.get("source"), str):
            out["source"] = out["source"].format(root=w.root.as_uri(), base=w.base)
        return out
    return make


def deep_list(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


JPEG = encode(noise(24, 16, "jpeg-for-trunc"), "JPEG", quality=95)
PNG = png_bytes(noise(24, 16, "png-for-trunc"))

CASES: list[Case] = [
    # Valid controls, so a worker that refuses everything cannot pass.
    Case("control_png", image_file("control.png", lambda: png_bytes(noise(33, 29, "control"))),
         verdict=(33, 29, "PNG")),
    Case("control_jpeg", image_file("control.jpg", lambda: encode(noise(35, 31, "control-jpeg"), "JPEG")),
         verdict=(35, 31, "JPEG")),
    Case("control_http", http("/control.png", body(png_bytes(noise(37, 27, "control-http")))),
         verdict=(37, 27, "PNG")),
    Case("control_http_redirects", redirected_image, verdict=(39, 25, "PNG")),
    Case("control_symlink_inside_root", symlink("alias.png", lambda w: w.root / "real.png",
                                                png_bytes(noise(30, 30, "alias"))), verdict=(30, 30, "PNG")),
    # Not images, or not whole ones.
    Case("zero_bytes", image_file("empty.jpg", lambda: b""), reason="not_an_image", detail="empty"),
    Case("truncated_jpeg", image_file("half.jpg", lambda: truncated(JPEG)), reason="corrupt"),
    Case("truncated_png", image_file("half.png", lambda: truncated(PNG)), reason="corrupt"),
    Case("png_signature_only", image_file("sig.png", lambda: PNG[:8]), reason="not_an_image"),
    Case("jpeg_markers_only", image_file("soi-eoi.jpg", lambda: b"\xff\xd8\xff\xd9"), reason="not_an_image"),
    Case("html_named_jpg", image_file("page.jpg", lambda: b"<!doctype html><title>hello</title><img src=x>"),
         reason="not_an_image", detail="<!doctype"),
    Case("svg", image_file("vector.svg", lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9">'
                                                 b'<rect width="9" height="9"/></svg>'), reason="not_an_image"),
    Case("gzip_of_png", image_file("packed.png", lambda: gzip.compress(png_bytes(noise(8, 8, "gz")))),
         reason="not_an_image"),
    Case("png_zero_width", image_file("zero-width.png", lambda: raw_png(0, 5, 8, 0, b"")), reason="not_an_image"),
    Case("tiff_float_strip_offset", image_file("float.tif", tiff_with_float_strip_offset), reason="corrupt"),
    # Formats Pillow reads that the worker does not accept.
    Case("ppm_named_jpg", image_file("netpbm.jpg", lambda: encode(noise(8, 8, "ppm"), "PPM")),
         reason="unsupported_format", detail="PPM"),
    Case("ico", image_file("favicon.ico", lambda: encode(noise(16, 16, "ico"), "ICO")),
         reason="unsupported_format", detail="ICO"),
    # Valid images under the wrong name: the content decides.
    Case("png_named_jpg", image_file("really-png.jpg", lambda: png_bytes(noise(27, 21, "wrong-ext-png"))),
         verdict=(27, 21, "PNG")),
    Case("jpeg_named_gif", image_file("really-jpeg.gif", lambda: encode(noise(23, 19, "wrong-ext-jpg"), "JPEG")),
         verdict=(23, 19, "JPEG")),
    Case("png_with_trailing_html", image_file("polyglot.png", lambda: png_bytes(noise(18, 18, "poly"))
                                              + b"<html><script>alert(1)</script></html>"), verdict=(18, 18, "PNG")),
    # Decompression bombs: refused on the header, before a pixel is decoded.
    Case("png_bomb_header", image_file("bomb.png", lambda: raw_png(100_000, 100_000, 8, 2, b"")),
         reason="too_large", detail="pixels"),
    Case("jpeg_bomb_header", image_file("bomb.jpg", lambda: jpeg_with_size(65_500, 65_500)),
         reason="too_large", detail="pixels"),
    Case("gif_bomb_header", image_file("bomb.gif", lambda: gif_with_screen(65_535, 65_535)),
         reason="too_large", detail="pixels"),
    Case("png_over_max_pixels", image_file("big.png", lambda: raw_png(8001, 8000, 8, 0, b"")),
         reason="too_large", detail="over the limit of 64000000"),
    # Odd but valid images: judged, with the size after EXIF rotation and the first frame or page.
    Case("one_by_one", image_file("dot.png", lambda: png_bytes(noise(1, 1, "dot"))), verdict=(1, 1, "PNG")),
    Case("wide_100000x1", image_file("wide.png", lambda: png_bytes(noise(100_000, 1, "wide"))),
         verdict=(100_000, 1, "PNG")),
    Case("tall_1x100000", image_file("tall.png", lambda: png_bytes(noise(1, 100_000, "tall"))),
         verdict=(1, 100_000, "PNG")),
    Case("cmyk_jpeg", image_file("print.jpg", lambda: encode(noise(30, 20, "cmyk", "CMYK"), "JPEG")),
         verdict=(30, 20, "JPEG")),
    Case("png_16bit_grey", image_file("deep-grey.png", sixteen_bit_grey), verdict=(17, 21, "PNG")),
    Case("png_16bit_rgb", image_file("deep-rgb.png", sixteen_bit_rgb), verdict=(19, 11, "PNG")),
    Case("animated_gif", image_file("anim.gif", animated_gif), verdict=(20, 14, "GIF")),
    Case("apng", image_file("anim.png", apng), verdict=(22, 18, "PNG")),
    Case("multipage_tiff_first_page", image_file("pages.tif", multipage_tiff), verdict=(40, 30, "TIFF")),
    Case("exif_rotated_90", image_file("rotated.jpg", lambda: rotated_jpeg(6, "rot6")), verdict=(24, 40, "JPEG")),
    Case("exif_orientation_invalid", image_file("badorient.jpg", lambda: rotated_jpeg(9, "rot9")),
         verdict=(40, 24, "JPEG")),
    Case("exif_garbage", image_file("garbage-exif.jpg", lambda: encode(noise(20, 12, "gexif"), "JPEG",
                                                                        exif=b"Exif\x00\x00" + b"\xff" * 2000)),
         verdict=(20, 12, "JPEG")),
    Case("palette_with_transparency", image_file("palette.png", palette_with_transparency), verdict=(26, 20, "PNG")),
    Case("grey_with_alpha", image_file("la.png", lambda: png_bytes(noise(15, 13, "la", "LA"))),
         verdict=(15, 13, "PNG")),
    Case("webp", image_file("photo.webp", lambda: encode(noise(28, 22, "webp"), "WEBP")), verdict=(28, 22, "WEBP")),
    # Oversized metadata inside the image: ignored when harmless, refused when it is a bomb.
    Case("png_5mb_text_chunk", image_file("chatty.png", lambda: text_chunk_png(5_000_000)), verdict=(6, 5, "PNG")),
    Case("jpeg_60kb_exif", image_file("long-exif.jpg", lambda: rotated_jpeg(8, "rot8", "x" * 60_000)),
         verdict=(24, 40, "JPEG")),
    Case("png_ztxt_bomb", image_file("ztxt.png", ztxt_bomb_png), reason="corrupt", detail="too large"),
    Case("file_over_download_cap", special("huge.png", sparse_file), reason="too_large", detail="over the limit"),
    # file:// escapes and things that are not regular files.
    Case("file_dotdot_traversal", lambda w: {"source": f"{w.root.as_uri()}/../outside/secret.png"},
         reason="path_forbidden"),
    Case("file_encoded_traversal", lambda w: {"source": f"{w.root.as_uri()}/%2e%2e/%2e%2e/%2e%2e/etc/passwd"},
         reason="path_forbidden"),
    Case("file_etc_passwd", source("file:///etc/passwd"), reason="path_forbidden"),
    Case("file_remote_host", source("file://fileserver.example.com/etc/passwd"), reason="path_forbidden"),
    Case("symlink_escape", symlink("escape.png", lambda w: w.outside / "secret.png", png_bytes(noise(9, 9, "s"))),
         reason="path_forbidden"),
    Case("symlinked_directory_escape", linked_directory, reason="path_forbidden"),
    Case("symlink_to_dev_zero", symlink("zero.png", lambda w: Path("/dev/zero")), reason="path_forbidden"),
    Case("file_missing", lambda w: {"source": (w.root / "never-uploaded.png").as_uri()}, reason="missing"),
    Case("file_is_directory", special("folder.png", Path.mkdir), reason="missing"),
    Case("file_is_fifo", special("pipe.png", os.mkfifo), reason="missing", detail="not a regular file"),
    Case("file_with_query", lambda w: {"source": (w.root / "control.png").as_uri() + "?download=1"},
         reason="invalid_source"),
    Case("file_relative_path", source("file:uploads/control.png"), reason="invalid_source"),
    Case("file_encoded_nul", lambda w: {"source": f"{w.root.as_uri()}/control.png%00.jpg"}, reason="invalid_source"),
    # Invalid URLs.
    Case("url_no_scheme", source("just some words"), reason="invalid_source"),
    Case("url_ftp", source("ftp://example.com/image.png"), reason="invalid_source"),
    Case("url_javascript", source("javascript:alert(document.cookie)"), reason="invalid_source"),
    Case("url_data", source("data:image/png;base64,iVBORw0KGgo="), reason="invalid_source"),
    Case("url_no_host", source("http:///image.png"), reason="invalid_source"),
    Case("url_bad_ipv6", source("http://[::1/image.png"), reason="invalid_source"),
    Case("url_port_out_of_range", source("http://example.com:99999/image.png"), reason="invalid_source"),
    Case("url_credentials", source("http://admin:hunter2@example.com/image.png"), reason="invalid_source"),
    Case("url_control_characters", source("http://example.com/a\r\nHost: evil\r\n.png"), reason="invalid_source"),
    Case("url_label_too_long", source("http://" + "a" * 70 + ".example.com/x.png"), reason="invalid_source"),
    # Loopback, private and metadata addresses (only 127.0.0.1/32 is allowlisted, for the test server).
    Case("url_loopback_outside_allowlist", source("http://127.0.0.2/image.png"), reason="blocked_address"),
    Case("url_localhost_name", lambda w: {"source": f"http://localhost:{w.base.rsplit(':', 1)[1]}/control.png"},
         reason="blocked_address", detail="loopback name"),
    Case("url_ipv6_loopback", source("http://[::1]/image.png"), reason="blocked_address"),
    Case("url_unspecified", source("http://0.0.0.0/image.png"), reason="blocked_address"),
    Case("url_private_10", source("http://10.0.0.1/image.png"), reason="blocked_address"),
    Case("url_private_192_168_https", source("https://192.168.1.1/image.png"), reason="blocked_address"),
    Case("url_private_decimal", source("http://167772161/image.png"), reason="blocked_address", detail="10.0.0.1"),
    Case("url_private_ipv4_mapped", source("http://[::ffff:10.0.0.1]/image.png"), reason="blocked_address"),
    Case("url_unique_local_ipv6", source("http://[fd00::1]/image.png"), reason="blocked_address"),
    Case("url_cgnat", source("http://100.64.0.1/image.png"), reason="blocked_address"),
    Case("url_metadata_ip", source("http://169.254.169.254/latest/meta-data/iam/"), reason="blocked_address"),
    Case("url_metadata_name", source("http://metadata.google.internal/computeMetadata/v1/"),
         reason="blocked_address", detail="metadata"),
    # Redirects from the allowlisted server: every hop is checked again.
    Case("redirect_to_private", http("/to-private", redirect("http://10.0.0.1/image.png")),
         reason="blocked_address", detail="10.0.0.1"),
    Case("redirect_to_metadata", http("/to-metadata", redirect("http://169.254.169.254/latest/meta-data/")),
         reason="blocked_address", detail="169.254.169.254"),
    Case("redirect_to_loopback_neighbour", http("/to-neighbour", redirect("http://127.0.0.2/image.png")),
         reason="blocked_address", detail="127.0.0.2"),
    Case("redirect_to_localhost", http("/to-localhost", redirect("http://localhost/control.png")),
         reason="blocked_address"),
    Case("redirect_to_file", http("/to-file", redirect("file:///etc/passwd")), reason="invalid_source"),
    Case("redirect_loop", http("/loop", redirect("/loop")), reason="too_many_redirects"),
    # Hostile or failing HTTP servers (PPL_MAX_RETRIES=0: transient failures are recorded at once).
    Case("http_html_as_image", http("/page.png", body(b"<html><body>login</body></html>", "image/png")),
         reason="not_an_image"),
    Case("http_404", http("/gone.png", body(b"no", "text/plain", 404)), reason="http_error"),
    Case("http_503", http("/busy.png", body(b"later", "text/plain", 503)), reason="http_unavailable"),
    Case("http_nul_in_status_line", http("/nul-status.png", nul_in_status_line), reason="http_error",
         detail="Not\\x00Found"),
    Case("http_declares_a_gigabyte", http("/huge.png", declared_huge), reason="too_large", detail="Content-Length"),
    Case("http_endless_body", http("/endless.png", endless), reason="too_large"),
    Case("http_body_cut_short", http("/short.png", cut_short), reason="connection_failed"),
    Case("http_too_slow", http("/slow.png", slow), reason="timeout"),
    Case("http_connection_refused", lambda w: {"source": f"http://127.0.0.1:{w.closed_port}/image.png"},
         reason="connection_failed"),
    # Wrong, unknown and unstorable task arguments.
    Case("arg_source_int", kwargs(source=12), reason="invalid_arguments", detail="int"),
    Case("arg_source_null", kwargs(source=None), reason="invalid_arguments", detail="NoneType"),
    Case("arg_source_list", kwargs(source=["{root}/control.png"]), reason="invalid_arguments", detail="list"),
    Case("arg_source_object", kwargs(source={"url": "http://example.com/x.png"}), reason="invalid_arguments"),
    Case("arg_source_bool", kwargs(source=True), reason="invalid_arguments", detail="bool"),
    Case("arg_source_missing", kwargs(), reason="invalid_arguments"),
    Case("arg_source_empty", kwargs(source=""), reason="invalid_arguments"),
    Case("arg_source_blank", kwargs(source="   \t "), reason="invalid_arguments"),
    Case("arg_source_too_long", kwargs(source="http://example.com/" + "a" * 5000), reason="invalid_arguments",
         detail="characters"),
    Case("arg_source_nul", kwargs(source="{root}/control.png\x00.jpg"), reason="invalid_arguments", detail="NUL"),
    Case("arg_source_lone_surrogate", kwargs(source="{root}/\ud800.png"), reason="invalid_arguments",
         detail="surrogate"),
    Case("arg_unknown_keyword", kwargs(source="{root}/control.png#unknown", callback="http://evil.example.com/"),
         reason="invalid_arguments", detail="callback"),
    Case("arg_unknown_keyword_with_nul", kwargs(source="{root}/control.png#nul-key", **{"a\x00b": 1}),
         reason="invalid_arguments", detail="a\\x00b"),
    Case("arg_positional", kwargs(), args=("file:///uploads/control.png",), reason="invalid_arguments",
         detail="positional"),
    Case("arg_external_id_int", kwargs(source="{root}/control.png#id-int", external_id=42),
         reason="invalid_arguments", detail="external_id"),
    Case("arg_external_id_too_long", kwargs(source="{root}/control.png#id-long", external_id="e" * 300),
         reason="invalid_arguments", detail="external_id"),
    Case("arg_external_id_nul", kwargs(source="{root}/control.png#id-nul", external_id="id\x00"),
         reason="invalid_arguments", detail="external_id"),
    Case("arg_metadata_list", kwargs(source="{root}/control.png#meta-list", metadata=[1, 2]),
         reason="invalid_arguments", detail="list"),
    Case("arg_metadata_string", kwargs(source="{root}/control.png#meta-str", metadata="{}"),
         reason="invalid_arguments", detail="str"),
    Case("arg_metadata_oversized", kwargs(source="{root}/control.png#meta-big", metadata={"blob": "m" * 5000}),
         reason="invalid_arguments", detail="bytes of JSON"),
    Case("arg_metadata_infinity", kwargs(source="{root}/control.png#meta-inf", metadata={"score": float("inf")}),
         reason="invalid_arguments", detail="JSON"),
    Case("arg_metadata_nul", kwargs(source="{root}/control.png#meta-nul", metadata={"note": "a\x00b"}),
         reason="invalid_arguments", detail="NUL"),
    # Deeply nested but small metadata is valid and is stored as it came.
    Case("metadata_deeply_nested", lambda w: {"source": w.file("nested.png", png_bytes(noise(12, 10, "deep"))),
                                              "metadata": {"tree": deep_list(400)}}, verdict=(12, 10, "PNG")),
]


# -- the run ------------------------------------------------------------------------------------------------------

POSITIONAL_PRODUCER = """
import json, sys
from celery import Celery
app = Celery(broker=sys.argv[1])
app.conf.task_serializer = "json"
for args, kwargs in json.loads(sys.stdin.read()):
    app.send_task("detect_image", args=args, kwargs=kwargs, queue="detect")
"""


def produce_positional(broker_url: str, jobs: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> None:
    """As ``produce``, for the jobs that also carry positional arguments (which ``produce`` cannot send)."""
    subprocess.run([sys.executable, "-c", POSITIONAL_PRODUCER, broker_url], input=json.dumps(jobs), text=True,
                   check=True, timeout=60, cwd="/")


def shown(value: str) -> str:
    """A string as a failure row can hold it: NUL and unpaired surrogates escaped (PostgreSQL text takes neither)."""
    return value.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def failure_key(job: dict[str, Any]) -> tuple[str, str]:
    """The column that identifies a job's failure row: its external id where it is a string, else its source."""
    if isinstance(job.get("external_id"), str):
        return "external_id", shown(job["external_id"])
    assert isinstance(job.get("source"), str), f"cannot identify the row of {job!r}"
    return "source", shown(job["source"])


@pytest.fixture
def world_worker(world: World, database_url: str, redis_url: str, tiny_model_dir: Path,
                 tmp_path: Path) -> Iterator[WorkerProcess]:
    env = dict(os.environ)
    env.update({"PPL_DATABASE_URL": database_url, "PPL_BROKER_URL": redis_url, "PPL_MODEL_DIR": str(tiny_model_dir),
                "PPL_BACKEND": "torch", "PPL_FILE_ROOTS": str(world.root), "PPL_BATCH_SIZE": "16",
                "PPL_BATCH_TIMEOUT_MS": "200", "PPL_METRICS_PORT": "0", "PPL_VISIBILITY_TIMEOUT_S": "120",
                # The test server is reachable; its neighbours and the redirect targets are not.
                "PPL_URL_ALLOWLIST": "127.0.0.1/32",
                # Transient failures (503, refused, cut short, slow) recorded at once rather than re-sent.
                "PPL_MAX_RETRIES": "0", "PPL_FETCH_CONNECT_TIMEOUT_S": "1", "PPL_FETCH_READ_TIMEOUT_S": "1",
                "PPL_MAX_DOWNLOAD_BYTES": str(MAX_DOWNLOAD_BYTES)})
    worker = WorkerProcess(env, tmp_path / "worker.log", name="hostile").start()
    yield worker
    worker.stop()


def rows_by_key(engine: Any) -> tuple[dict[str, list[dict]], dict[tuple[str, str], list[dict]]]:
    """Verdicts by external id; failures by (column, value) for both external id and source."""
    with engine.connect() as conn:
        verdicts = conn.execute(text("select * from verdicts")).mappings().all()
        failures = conn.execute(text("select * from detection_failures")).mappings().all()
    by_external_id: dict[str, list[dict]] = {}
    for row in verdicts:
        by_external_id.setdefault(row["external_id"], []).append(dict(row))
    by_failure: dict[tuple[str, str], list[dict]] = {}
    for row in failures:
        by_failure.setdefault(("source", row["source"]), []).append(dict(row))
        if row["external_id"] is not None:
            by_failure.setdefault(("external_id", row["external_id"]), []).append(dict(row))
    return by_external_id, by_failure


def test_every_hostile_input_gets_its_reason_and_the_worker_stays_healthy(world: World, world_worker: WorkerProcess,
                                                                          database_url: str) -> None:
    assert len(CASES) >= 35 and len({case.name for case in CASES}) == len(CASES)
    jobs = {case.name: case.make(world) for case in CASES}
    for name, job in jobs.items():
        job.setdefault("external_id", f"hostile-{name}")
    keys = {name: failure_key(job) for name, job in jobs.items()}
    assert len(set(keys.values())) == len(keys), "two cases would share a failure row"

    broker = world_worker.env["PPL_BROKER_URL"]
    produce(broker, [jobs[case.name] for case in CASES if not case.args])
    produce_positional(broker, [(case.args, jobs[case.name]) for case in CASES if case.args])

    engine = db.make_engine(database_url)
    try:
        def unanswered() -> list[str]:
            verdicts, failures = rows_by_key(engine)
            return [name for name, job in jobs.items()
                    if job["external_id"] not in verdicts and keys[name] not in failures]

        try:
            wait_until(lambda: not unanswered(), timeout=ALL_DONE_WAIT_S, what="a row for every hostile job")
        except AssertionError:
            missing = ", ".join(unanswered())
            raise AssertionError(f"no row after {ALL_DONE_WAIT_S:.0f} s for: {missing}\nworker alive: "
                                 f"{world_worker.alive}; log tail:\n{world_worker.log()[-4000:]}") from None
        verdicts, failures = rows_by_key(engine)

        problems = []
        for case in CASES:
            job = jobs[case.name]
            got_verdicts = verdicts.get(job["external_id"], [])
            got_failures = failures.get(keys[case.name], [])
            if len(got_verdicts) + len(got_failures) != 1:
                problems.append(f"{case.name}: expected one row, got verdicts {got_verdicts} failures "
                                f"{[(f['reason'], f['detail']) for f in got_failures]}")
            elif case.reason is not None:
                if not got_failures:
                    v = got_verdicts[0]
                    problems.append(f"{case.name}: expected failure {case.reason!r}, got a verdict "
                                    f"{v['width']}x{v['height']} {v['format']}")
                    continue
                failure = got_failures[0]
                if failure["reason"] != case.reason or case.detail not in failure["detail"]:
                    problems.append(f"{case.name}: expected {case.reason!r} with {case.detail!r} in the detail, "
                                    f"got {failure['reason']!r}: {failure['detail']!r}")
                if failure["attempts"] != 1:
                    problems.append(f"{case.name}: recorded {failure['attempts']} times (redelivered?)")
            else:
                if not got_verdicts:
                    failure = got_failures[0]
                    problems.append(f"{case.name}: expected a verdict {case.verdict}, got failure "
                                    f"{failure['reason']!r}: {failure['detail']!r}")
                    continue
                verdict = got_verdicts[0]
                if (verdict["width"], verdict["height"], verdict["format"]) != case.verdict:
                    problems.append(f"{case.name}: expected {case.verdict}, got "
                                    f"{(verdict['width'], verdict['height'], verdict['format'])}")
                if not 0.0 <= verdict["score"] <= 1.0 or verdict["source"] != job["source"]:
                    problems.append(f"{case.name}: verdict score {verdict['score']} source {verdict['source']!r}")
                if verdict["metadata"] != job.get("metadata"):
                    problems.append(f"{case.name}: metadata stored as {str(verdict['metadata'])[:200]}")
        assert not problems, "\n".join(problems)
        with engine.connect() as conn:  # nothing beyond one row per job
            total = conn.execute(text("select (select count(*) from verdicts) + "
                                      "(select count(*) from detection_failures)")).scalar()
        assert total == len(CASES)

        # Still healthy: the same process judges a fresh job after all that.
        assert world_worker.alive, world_worker.log()[-4000:]
        fresh = {"source": world.file("fresh.png", png_bytes(noise(31, 17, "fresh"))), "external_id": "fresh"}
        produce(broker, [fresh])
        wait_until(lambda: "fresh" in rows_by_key(engine)[0], timeout=30, what="the verdict of a fresh job")
        assert rows_by_key(engine)[0]["fresh"][0]["width"] == 31
    finally:
        engine.dispose()

    # Every case above is handled on purpose: no traceback, no batch handed back, no catch-all reason.
    log = world_worker.log()
    for sign in ("Traceback", "unexpected error", "batch failed", "handed back", "decode_error"):
        assert sign not in log, f"{sign!r} in the worker log:\n{log[-6000:]}"
    assert world_worker.alive
