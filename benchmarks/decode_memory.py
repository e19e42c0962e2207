"""Peak memory of decoding decompression-bomb-like images: the worker's bounded path against the old one.

    .venv/bin/python benchmarks/decode_memory.py            # the bombs, 8 at once on 8 threads
    .venv/bin/python benchmarks/decode_memory.py --modes    # measured peak per mode against the estimate
    .venv/bin/python benchmarks/decode_memory.py --small    # time per small JPEG, old path against new

Every measurement runs in a fresh subprocess and reads the peak resident set size of that process alone
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``; ``ru_maxrss`` where that is refused), so
one run's peak cannot hide in another's. Figures: docs/PERFORMANCE.md, "Decode memory".

The files are small on disk and huge decoded: a float32 TIFF of 8000×8000 (deflate), an RGBA PNG of
8000×8000 in one half-transparent colour, a 64-megapixel JPEG. The old path (``Image.open`` + ``load`` +
``exif_transpose`` + the conversion to RGB as it was before ppl_model.imageio, without any budget) runs on
one file of each kind only, three threads, to keep this machine's memory safe (about 4.5 GB at its peak).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    from ppl_model.imageio import MemoryBudget


MiB = 1 << 20
BOMB_SIDE = 8000


# -- files --------------------------------------------------------------------------------------------------------


def _encode(image: Image.Image, format: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    return buffer.getvalue()


def bomb(kind: str, side: int = BOMB_SIDE) -> bytes:
    if kind == "float_tiff":
        return _encode(Image.new("F", (side, side), 0.25), "TIFF", compression="tiff_deflate")
    if kind == "rgba_png":
        return _encode(Image.new("RGBA", (side, side), (200, 40, 40, 128)), "PNG", optimize=False)
    if kind == "jpeg_64mp":
        return _encode(Image.new("RGB", (side, side), (30, 160, 90)), "JPEG", quality=90)
    raise ValueError(kind)


def gradient(mode: str, side: int) -> Image.Image:
    """A smooth image in ``mode`` (quick to encode, small on disk)."""
    ramp = np.linspace(0, 1, side, dtype=np.float32)
    plane = np.add.outer(ramp, ramp) / 2
    if mode == "F":
        return Image.fromarray(plane)
    if mode == "I;16":
        return Image.fromarray((plane * 4095).astype(np.uint16))
    rgb = Image.fromarray(np.stack([plane * 255, plane[::-1] * 255, plane.T * 255], axis=-1).astype(np.uint8))
    if mode == "RGBA":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.fromarray((plane * 255).astype(np.uint8)))
        return rgba
    if mode == "P":
        return rgb.convert("P")
    return rgb.convert(mode)


MODE_CASES: dict[str, tuple[str, str, dict[str, Any]]] = {  # name: (mode, format, save parameters)
    "jpeg_rgb": ("RGB", "JPEG", {"quality": 90}),
    "jpeg_rgb_progressive": ("RGB", "JPEG", {"quality": 90, "progressive": True}),
    "jpeg_rgb_rotated": ("RGB", "JPEG", {"quality": 90, "exif": b"rotate"}),
    "jpeg_l": ("L", "JPEG", {"quality": 90}),
    "jpeg_cmyk": ("CMYK", "JPEG", {"quality": 90}),
    "png_rgb": ("RGB", "PNG", {}),
    "png_rgba": ("RGBA", "PNG", {}),
    "png_la": ("LA", "PNG", {}),
    "png_p_transparent": ("P", "PNG", {"transparency": 0}),
    "png_16bit": ("I;16", "PNG", {}),
    "tiff_float": ("F", "TIFF", {"compression": "tiff_deflate"}),
    "tiff_12bit": ("I;16", "TIFF", {}),
    "tiff_rgb_deflate": ("RGB", "TIFF", {"compression": "tiff_deflate"}),
    "webp_rgb": ("RGB", "WEBP", {"lossless": True}),
    "gif_p": ("P", "GIF", {}),
    "apng_default_image": ("RGB", "PNG", {"default_image": True}),
    "bmp_rgb": ("RGB", "BMP", {}),
    "bmp_bitfields_layout": ("RGB", "BMP", {"layout": True}),
}


def mode_file(name: str, side: int) -> bytes:
    mode, format, params = MODE_CASES[name]
    params = dict(params)
    if params.get("layout"):  # 32-bit BI_BITFIELDS, R/G/B in bytes 1/2/3: Pillow refuses, imageio decodes
        rgb = np.asarray(gradient("RGB", side))[::-1]
        pixels = np.zeros((side, side, 4), dtype=np.uint8)
        pixels[..., 1:] = rgb
        dib = struct.pack("<IiiHHIIiiII", 108, side, side, 1, 32, 3, pixels.nbytes, 2835, 2835, 0, 0)
        dib += struct.pack("<IIII", 0x0000FF00, 0x00FF0000, 0xFF000000, 0) + b"\x00" * 52
        return b"BM" + struct.pack("<IHHI", 14 + 108 + pixels.nbytes, 0, 0, 14 + 108) + dib + pixels.tobytes()
    if params.get("default_image"):  # an APNG whose default image is not part of the animation: 2 frames after it
        frames = [gradient(mode, side), gradient(mode, side).transpose(Image.Transpose.ROTATE_90)]
        return _encode(gradient(mode, side).point(lambda v: 255 - v), format, save_all=True, append_images=frames,
                       duration=50, **params)
    if params.get("exif") == b"rotate":
        exif = Image.Exif()
        exif[0x0112] = 6
        params["exif"] = exif
    return _encode(gradient(mode, side), format, **params)


# -- measuring ----------------------------------------------------------------------------------------------------


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size (Linux 4.0+)
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Peak:
    """Peak RSS of this process from now on, in bytes."""

    def __init__(self) -> None:
        self.exact = _reset_peak()
        self.start = _status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.exact:
            return _status_kib("VmHWM") * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def old_decode(data: bytes) -> Image.Image:
    """The decode path before ppl_model.imageio: no byte budget, whole-image numpy conversions."""
    with Image.open(io.BytesIO(data)) as img:
        img.seek(0)
        img.load()
        return _old_to_rgb(ImageOps.exif_transpose(img))


def _old_to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "F":
        data64 = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = min(0.0, float(data64.min())), float(data64.max())
        if low >= 0.0 and high <= 1.0:
            grey = np.rint(data64 * 255.0).astype(np.uint8)
        else:
            grey = np.rint((data64 - low) * (255.0 / max(high - low, 1e-12))).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (128, 128, 128, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def child_batch(kinds: list[str], threads: int, path: str, folder: Path) -> dict:
    """Decode one file of each kind in ``kinds`` at once on ``threads`` threads; peak RSS and each result."""
    decode: Callable[[bytes], Image.Image] = old_decode
    budget: MemoryBudget | None = None
    if path != "old":  # not even imported for it: worker.decoding changes how this process's malloc behaves
        from worker.decoding import decode_image, process_budget
        from worker.settings import Settings

        settings = Settings.from_env()
        budget = process_budget(settings)

        def decode(data: bytes) -> Image.Image:
            return decode_image(data, settings).image

    # Written by the parent: making them here would leave the encoder's freed memory in this process's heap,
    # where the decodes would reuse it unseen.
    files = {kind: (folder / kind).read_bytes() for kind in set(kinds)}
    results: list[dict] = [{} for _ in kinds]
    barrier = threading.Barrier(len(kinds))
    semaphore = threading.Semaphore(threads)

    def run(index: int, kind: str) -> None:
        barrier.wait()
        with semaphore:
            started = time.perf_counter()
            try:
                image = decode(files[kind])
                centre = image.getpixel((image.width // 2, image.height // 2))
                results[index] = {"kind": kind, "result": f"{image.width}x{image.height} RGB, centre {centre}"}
                del image  # as the pipeline does once its crops are cut
            except Exception as exc:  # the new path's SourceError (not imported for the old one)
                if not hasattr(exc, "reason"):
                    raise
                results[index] = {"kind": kind, "result": f"refused: {exc.reason} ({getattr(exc, 'detail', '')[:90]})"}
            results[index]["seconds"] = round(time.perf_counter() - started, 2)

    workers = [threading.Thread(target=run, args=(i, kind)) for i, kind in enumerate(kinds)]
    peak = Peak()
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out = {"path": path, "files": len(kinds), "threads": threads, "seconds": round(time.perf_counter() - started, 1),
           "rss_before_mib": round(peak.start / MiB), "peak_rss_mib": round(peak.peak() / MiB),
           "peak_exact": peak.exact, "results": results}
    if budget is not None:
        out["budget_peak_mib"] = round(budget.peak / MiB)
        out["budget_mib"] = round(budget.total / MiB)
    return out


def child_mode(name: str, side: int, folder: Path) -> dict:
    from ppl_model.imageio import _open, _seek_first_displayed, _Source, decode_rgb, decoded_bytes

    data = (folder / name).read_bytes()
    with _open(_Source(data, name), None) as img:  # as decode_rgb opens, seeks and estimates
        _seek_first_displayed(img)
        estimate = decoded_bytes(img)
    peak = Peak()
    image, _ = decode_rgb(data)
    measured = peak.peak() - peak.start
    del image
    return {"case": name, "pixels": side * side, "measured_mib": round(measured / MiB, 1),
            "estimate_mib": round(estimate / MiB, 1), "measured_per_pixel": round(measured / (side * side), 2),
            "within": measured <= estimate}


def spawn(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"child {args} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- main ---------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", action="store_true", help="measured peak per mode against the estimate")
    parser.add_argument("--side", type=int, default=4000, help="--modes: image side in pixels")
    parser.add_argument("--small", action="store_true", help="time per small JPEG (640×480), old path against new")
    parser.add_argument("--case", action="append", choices=sorted(MODE_CASES), help="--modes: only these cases")
    parser.add_argument("--json", action="store_true", help="--modes: one JSON object per case")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "mode":
            print(json.dumps(child_mode(args.child[1], int(args.child[2]), Path(args.child[3]))))
        else:
            path, threads, folder, *kinds = args.child
            print(json.dumps(child_batch(kinds, int(threads), path, Path(folder))))
        return
    with tempfile.TemporaryDirectory() as folder:
        run_all(args, Path(folder))


def small_jpegs(repeat: int = 300) -> None:
    """The common case must not pay for the bounds: one thread, a 640×480 JPEG decoded ``repeat`` times."""
    from worker.decoding import decode_image
    from worker.settings import Settings

    noise = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), "JPEG", quality=85)
    settings = Settings()
    paths = (("old path", lambda: old_decode(data)), ("bounded path", lambda: decode_image(data, settings)))
    for name, decode in paths:
        decode()
        started = time.perf_counter()
        for _ in range(repeat):
            decode()
        print(f"{name}: {1000 * (time.perf_counter() - started) / repeat:.2f} ms per 640x480 JPEG")


def run_all(args: argparse.Namespace, folder: Path) -> None:
    if args.small:
        small_jpegs()
        return
    if args.modes:
        if not args.json:
            print(f"{'case':24} {'pixels':>10} {'measured MiB':>13} {'estimate MiB':>13} {'B/pixel':>8}  within")
        for name in args.case or MODE_CASES:
            (folder / name).write_bytes(mode_file(name, args.side))
            r = spawn("mode", name, str(args.side), str(folder))
            if args.json:
                print(json.dumps(r))
                continue
            print(f"{r['case']:24} {r['pixels']:>10} {r['measured_mib']:>13} {r['estimate_mib']:>13} "
                  f"{r['measured_per_pixel']:>8}  {r['within']}")
        return
    sizes = {}
    for kind in ("float_tiff", "rgba_png", "jpeg_64mp"):
        data = bomb(kind)
        (folder / kind).write_bytes(data)
        sizes[kind] = len(data)
    print("files:", ", ".join(f"{kind} {size // 1024} KiB" for kind, size in sizes.items()))
    three = ["float_tiff", "rgba_png", "jpeg_64mp"]
    eight = ["float_tiff", "rgba_png", "jpeg_64mp"] * 2 + ["float_tiff", "rgba_png"]
    runs = [("old", 3, three), ("bounded", 3, three), ("bounded", 8, eight)]
    for path, threads, kinds in runs:
        r = spawn(path, str(threads), str(folder), *kinds)
        budget = f", budget peak {r['budget_peak_mib']} of {r['budget_mib']} MiB" if "budget_mib" in r else ""
        print(f"\n{path} path, {r['files']} files on {r['threads']} threads: peak RSS {r['peak_rss_mib']} MiB "
              f"(before {r['rss_before_mib']} MiB, +{r['peak_rss_mib'] - r['rss_before_mib']} MiB){budget}, "
              f"{r['seconds']} s" + ("" if r["peak_exact"] else " [ru_maxrss]"))
        for item in r["results"]:
            print(f"  {item['kind']:11} {item['seconds']:6.2f} s  {item['result']}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
