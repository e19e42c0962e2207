"""HEIC/HEIF (pillow-heif) and AVIF (Pillow's own plugin) through ppl_model.imageio and the worker's allow-list,
with the pixel cap, EXIF orientation and reason codes of the other formats; and the frame count of animated
files. Every file is written here by the libraries themselves."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ppl_model.imageio import UnreadableImage, decode, decode_rgb, list_images, register_heif_opener
from tests import provenance_files as files
from worker.decoding import ALLOWED_FORMATS, decode_image
from worker.settings import Settings
from worker.sources import SourceError

REPO = Path(__file__).resolve().parent.parent
RED, BLUE = (255, 0, 0), (0, 0, 255)


def left_red_right_blue(size: tuple[int, int] = (64, 32)) -> Image.Image:
    width, height = size
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2:] = BLUE
    return Image.fromarray(pixels)


def close(colour: tuple[int, ...], expected: tuple[int, int, int], tolerance: int = 40) -> bool:
    return all(abs(int(a) - b) <= tolerance for a, b in zip(colour, expected, strict=True))


def written(kind: str, image: Image.Image, exif: bytes | None = None) -> bytes:
    params = {"exif": exif} if exif else {}
    if kind == "heic-8":
        return files.encode(image, "HEIF", quality=90, **params)
    if kind == "heic-10":
        return files.heic_10_bit(image, **params)
    return files.encode(image, "AVIF", quality=90, **params)  # Pillow's encoder writes 8-bit AVIF only


KINDS = ["heic-8", "heic-10", "avif-8"]


@pytest.mark.parametrize("kind", KINDS)
def test_heic_and_avif_decode_to_rgb_with_their_format_and_bit_depth(kind: str) -> None:
    data = written(kind, left_red_right_blue())
    with Image.open(io.BytesIO(data)) as img:
        assert img.info.get("bit_depth", 8) == (10 if kind == "heic-10" else 8)  # the file is what it says
    decoded = decode(data)
    assert (decoded.format, decoded.image.mode, decoded.image.size, decoded.frames) == (
        "AVIF" if kind.startswith("avif") else "HEIF", "RGB", (64, 32), 1)
    assert close(decoded.image.getpixel((4, 16)), RED) and close(decoded.image.getpixel((60, 16)), BLUE)


@pytest.mark.parametrize("kind", KINDS)
def test_exif_orientation_is_applied_once(kind: str) -> None:
    """Orientation 6 (rotate 90° clockwise to display): a 64×32 image with red on the left is shown 32×64 with red
    on top. libheif applies HEIF's irot itself (pillow-heif then resets the EXIF tag), AVIF's comes through EXIF:
    either way, once."""
    image, _ = decode_rgb(written(kind, left_red_right_blue(), files.exif_with_orientation(6)))
    assert image.size == (32, 64)
    assert close(image.getpixel((16, 4)), RED) and close(image.getpixel((16, 60)), BLUE)


@pytest.mark.parametrize("kind", KINDS)
def test_the_worker_accepts_them_under_the_same_limits(kind: str) -> None:
    assert {"HEIF", "AVIF"} <= ALLOWED_FORMATS
    data = written(kind, left_red_right_blue(), files.exif_with_orientation(6))
    decoded = decode_image(data, Settings())
    assert (decoded.width, decoded.height) == (32, 64)
    with pytest.raises(SourceError) as info:  # the pixel cap, from the header, before any pixel is decoded
        decode_image(data, Settings(max_pixels=1000))
    assert info.value.reason == "too_large" and "over the limit of 1000" in info.value.detail
    with pytest.raises(SourceError) as info:
        decode_image(data[: len(data) // 2], Settings())
    assert info.value.reason in ("corrupt", "not_an_image")  # truncated: the codes of every other format


@pytest.mark.parametrize("kind", KINDS)
def test_a_decoder_outside_the_allowed_formats_never_sees_them(kind: str) -> None:
    with pytest.raises(UnreadableImage) as info:
        decode_rgb(written(kind, left_red_right_blue()), formats={"JPEG", "PNG"})
    assert info.value.reason == "unsupported_format"
    assert ("AVIF" if kind.startswith("avif") else "HEIF") in info.value.detail


def test_a_heif_collection_is_judged_by_its_primary_image() -> None:
    register_heif_opener()
    first, primary = Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)
    buffer = io.BytesIO()
    first.save(buffer, "HEIF", save_all=True, append_images=[primary], primary_index=1, quality=90)
    decoded = decode(buffer.getvalue())
    assert decoded.frames == 2 and close(decoded.image.getpixel((8, 8)), BLUE)


def animation(image_format: str, **params: object) -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, (0, 255, 0), BLUE)]
    buffer = io.BytesIO()
    frames[0].save(buffer, image_format, save_all=True, append_images=frames[1:], duration=50, **params)
    return buffer.getvalue()


@pytest.mark.parametrize(("image_format", "params"), [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True}),
                                                       ("AVIF", {"quality": 95}), ("TIFF", {})])
def test_animations_are_counted_and_their_first_frame_judged(image_format: str, params: dict) -> None:
    decoded = decode(animation(image_format, **params))
    assert decoded.frames == 3 and close(decoded.image.getpixel((8, 8)), RED)


def test_an_apng_default_image_is_not_counted_as_a_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((9, 9, 9), RED, BLUE)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:], default_image=True, duration=50)
    decoded = decode(buffer.getvalue())
    assert decoded.frames == 2 and decoded.image.getpixel((4, 4)) == RED
    assert decode(files.plain("PNG")).frames == 1
    assert PngImagePlugin  # the plugin writes APNG: no other tool involved


def test_folders_list_heic_and_avif_files(tmp_path: Path) -> None:
    for name in ("a.heic", "b.HEIF", "c.avif", "d.hif", "e.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.heic", "b.HEIF", "c.avif", "d.hif"]


def test_pillow_heif_is_registered_on_the_first_decode_not_on_import() -> None:
    code = ("import sys, ppl_model.imageio, ppl_model.provenance, ppl_model.inference.scan; "
            "before = {m for m in ('pillow_heif', 'c2pa') if m in sys.modules}; "
            "from PIL import Image; from ppl_model.imageio import decode_rgb; from tests import provenance_files; "
            "decode_rgb(provenance_files.plain('JPEG')); "
            "print(sorted(before), Image.OPEN['HEIF'][0].__module__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=True)
    assert done.stdout.split() == ["[]", "pillow_heif.as_plugin"]
