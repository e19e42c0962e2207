"""``ppl reconstruct``: pixel-aligned reconstructions of real images by a local diffusers pipeline (RPR donors).

RPR composites patches of a generator's reconstruction of a real image into that real image, so every real
training image needs a reconstruction of exactly its size, pixel for pixel. This module makes them from a
Hugging Face-format pipeline folder, offline (``local_files_only``):

* ``vae``: encode and decode through the pipeline's ``AutoencoderKL`` (a sampled latent, or its mode);
* ``inpaint``: the inpainting pipeline at ``strength`` with an empty prompt (the PPL paper's recipe with
  Stable Diffusion inpainting, and DRCT's with its keep-everything mask).

Each image is padded (reflected at its right and bottom edges) to the multiple the VAE needs and the output
is cropped back, so the reconstruction lies on its input pixel for pixel. Outputs are lossless PNGs at the
input's relative path with ``.png``, written to a hidden temporary name and renamed, so a killed run never
leaves a partial image under a name ``ppl train`` reads. A rerun skips outputs that are already there and
valid; every random draw comes from a generator seeded by the file's relative path and ``seed``, so the
same file gets the same noise whatever else is in its batch or how often the run was resumed.

What is reconstructed depends on the input folder's layout (``layout``): a GenImage tree's real training
images (``<generator>/train/nature/``), a folders or paired tree's ``real/`` (``train/real/`` when split), or
every image of a plain folder. ``OUT`` mirrors the paths relative to the input folder, which is what
``ppl train --reconstructions OUT`` (``data.reconstructions``) pairs on.

``OUT/reconstruct.json`` holds the settings (written first: a rerun with other settings into the same folder
is refused, so one folder never mixes two recipes) and, at the end, the counts and every skipped input with
its reason.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ppl_model.categories import Precision
from ppl_model.data.datasets import DataLayoutError, detect_layout
from ppl_model.errors import PPLError
from ppl_model.imageio import UnreadableImage, decode_rgb, list_images

METHODS = ("vae", "inpaint")
LATENTS = ("sample", "mode")
MASKS = ("auto", "keep", "repaint")
PRECISIONS = ("auto", *Precision)
LAYOUTS = ("auto", "genimage", "folders", "plain")
REPORT_NAME = "reconstruct.json"
PARTIAL_SUFFIX = ".partial"  # temporary outputs: hidden and with no image suffix, so no reader lists them
INSTALL_HINT = 'pip install -e ".[reconstruct]"'
DEFAULT_MAX_PIXELS = 2048 * 2048


class ReconstructError(PPLError):
    """A reconstruction job that cannot run as asked (settings, folders, pipeline)."""


class MissingDependency(PPLError):
    """The optional ``diffusers`` dependency is not installed."""


@dataclass(frozen=True)
class ReconstructOptions:
    method: str = "vae"
    latent: str = "sample"  # vae: draw the latent from the encoder's distribution, or take its mode
    strength: float = 0.25  # inpaint: how far into the noise schedule the image is taken
    steps: int = 50  # inpaint: scheduler steps for strength 1 (strength · steps are run)
    guidance: float = 1.0  # inpaint: classifier-free guidance; above 1 it doubles the UNet's work
    mask: str = "auto"  # inpaint: keep (all 0) on an inpainting UNet, repaint (all 1) on a plain one
    seed: int = 0
    batch_size: int = 8
    device: str = "auto"
    precision: str = "auto"  # fp16 on CUDA, fp32 on the CPU
    layout: str = "auto"
    generators: tuple[str, ...] = ()  # genimage: the generator folders whose real images are reconstructed
    max_pixels: int = DEFAULT_MAX_PIXELS

    def validate(self) -> None:
        checks = [
            (self.method in METHODS, f"--method must be one of {', '.join(METHODS)}"),
            (self.latent in LATENTS, f"--latent must be one of {', '.join(LATENTS)}"),
            (self.mask in MASKS, f"--mask must be one of {', '.join(MASKS)}"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
            (self.layout in LAYOUTS, f"--layout must be one of {', '.join(LAYOUTS)}"),
            (0.0 < self.strength <= 1.0, "--strength must be in (0, 1]"),
            (self.steps >= 1, "--steps must be ≥ 1"),
            (self.guidance >= 0.0, "--guidance must be ≥ 0"),
            (self.batch_size >= 1, "--batch-size must be ≥ 1"),
            (self.max_pixels >= 1, "--max-pixels must be ≥ 1"),
        ]
        if self.method == "inpaint":
            # The pipeline runs int(steps · strength) steps and refuses zero.
            checks.append((int(self.steps * self.strength) >= 1,
                           f"--steps {self.steps} at --strength {self.strength} leaves no denoising step; "
                           "raise --steps or --strength"))
        errors = [message for ok, message in checks if not ok]
        if errors:
            raise ReconstructError("; ".join(errors))

    def recipe(self) -> dict[str, Any]:
        """The settings that decide the pixels (not batch size, device, layout or limits)."""
        keys = ("method", "latent", "seed") if self.method == "vae" else (
            "method", "strength", "steps", "guidance", "mask", "seed")
        values = asdict(self)
        return {key: values[key] for key in keys}


@dataclass
class ReconstructReport:
    status: str
    pipeline: str
    images: str
    out: str
    layout: str
    recipe: dict[str, Any]
    device: str = ""
    dtype: str = ""
    inputs: int = 0
    written: int = 0
    already_done: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return asdict(self) | {"skipped_count": len(self.skipped)}


# -- the dependency ----------------------------------------------------------------------------------------------


def import_diffusers() -> Any:
    """``diffusers``, imported only by this command (an optional extra)."""
    try:
        return importlib.import_module("diffusers")
    except ImportError as exc:
        raise MissingDependency(f"`ppl reconstruct` needs diffusers, which is not installed ({exc}); "
                                f"install the extra: {INSTALL_HINT}") from None


def dtype_keyword(diffusers: Any) -> str:
    """``from_pretrained``'s dtype argument: ``dtype`` where diffusers has renamed ``torch_dtype`` (which then
    warns). Passed at load time, not by ``.to()``, so modules a model keeps in fp32 stay so."""
    renamed = hasattr(getattr(getattr(diffusers, "utils", None), "deprecation_utils", None), "_resolve_dtype")
    major = int(str(getattr(diffusers, "__version__", "0")).split(".")[0] or 0)
    return "dtype" if renamed or major >= 1 else "torch_dtype"


# -- which files, where ------------------------------------------------------------------------------------------


def select_inputs(images_dir: Path, layout: str = "auto", generators: Sequence[str] = ()) -> tuple[str, list[Path]]:
    """The real images to reconstruct under ``images_dir``, and the layout that chose them."""
    if layout == "auto":
        try:
            layout = detect_layout(images_dir)
        except DataLayoutError:
            layout = "plain"
        layout = "folders" if layout == "paired" else layout
    if layout == "genimage":
        found = sorted(d.name for d in images_dir.iterdir() if d.is_dir())
        unknown = sorted(set(generators) - set(found))
        if unknown:
            raise ReconstructError(f"{images_dir}: no generator folder(s) {', '.join(unknown)}")
        chosen = [g for g in found if not generators or g in generators]
        folders = [images_dir / g / "train" / "nature" for g in chosen]
        return layout, [p for folder in folders if folder.is_dir() for p in list_images(folder)]
    if generators:
        raise ReconstructError("--generators applies to a GenImage tree only")
    if layout == "folders":
        base = images_dir / "train" if (images_dir / "train" / "real").is_dir() else images_dir
        if not (base / "real").is_dir():
            raise ReconstructError(f"{images_dir}: the folders layout needs a real/ folder")
        return layout, list_images(base / "real")
    return "plain", list_images(images_dir)


def output_path(out_dir: Path, relative: Path) -> Path:
    return out_dir / relative.with_suffix(".png")


def file_seed(relative: str, seed: int) -> int:
    """A 63-bit seed from the file's relative path and the run's seed: the same file always draws the same noise."""
    digest = hashlib.sha256(f"{seed}\0{relative}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def oriented_size(path: Path) -> tuple[int, int] | None:
    """(width, height) after EXIF orientation, from the header alone; None when the header is unreadable."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = int(img.getexif().get(0x0112, 1))
    except Exception:  # any header the decoder refuses: decode_rgb will say why, for the report
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def is_finished(out_path: Path, expected: tuple[int, int] | None) -> bool:
    """A PNG of the input's size is already there and every chunk's checksum holds (outputs appear only by
    rename, so whole; the check catches a file damaged since, without decompressing the pixels)."""
    if expected is None or not out_path.is_file():
        return False
    try:
        with Image.open(out_path, formats=["PNG"]) as img:
            size = img.size
            img.verify()
    except Exception:  # unreadable in any way: made again
        return False
    return size == expected


def write_png(pixels: np.ndarray, path: Path) -> None:
    """Write then rename: the final name only ever holds a whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    try:
        Image.fromarray(pixels).save(partial, format="PNG")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def remove_partials(out_dir: Path) -> int:
    """Temporary files a killed run left behind."""
    stale = [p for p in out_dir.rglob(f".*{PARTIAL_SUFFIX}") if p.is_file()]
    for path in stale:
        path.unlink()
    return len(stale)


def pad_to_multiple(pixels: np.ndarray, multiple: int) -> np.ndarray:
    """Reflect the right and bottom edges out to a multiple of ``multiple``; the image stays at the top left."""
    height, width = pixels.shape[:2]
    pad_h, pad_w = -height % multiple, -width % multiple
    if not pad_h and not pad_w:
        return pixels
    return np.pad(pixels, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")


# -- the models --------------------------------------------------------------------------------------------------


def resolve_device(device: str, precision: str) -> tuple[torch.device, torch.dtype]:
    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ReconstructError(f"--device {device}: CUDA is not available here")
    if precision == "auto":
        precision = "fp16" if target.type == "cuda" else "fp32"
    if precision != "fp32" and target.type != "cuda":
        raise ReconstructError(f"--precision {precision} needs a CUDA device; the CPU runs fp32")
    return target, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    # On the CPU whatever the device, so a file draws the same noise on every machine.
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def _to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """(N, 3, H, W) in [0, 1] to HWC uint8, rounded as diffusers' own PIL conversion rounds."""
    scaled = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return list(scaled.permute(0, 2, 3, 1).cpu().numpy())


class Reconstructor:
    """Turns a batch of same-size RGB arrays (padded to ``multiple``) into their reconstructions."""

    multiple: int = 8

    def __call__(self, pixels: list[np.ndarray], seeds: list[int]) -> list[np.ndarray]:
        raise NotImplementedError


def _load_error(pipeline_dir: Path, exc: Exception) -> ReconstructError:
    return ReconstructError(f"{pipeline_dir}: cannot load the pipeline offline ({type(exc).__name__}: {exc})")


class VaeReconstructor(Reconstructor):
    """An ``AutoencoderKL`` round trip: encode, take a latent (sampled or the mode), decode."""

    def __init__(self, pipeline_dir: Path, options: ReconstructOptions, device: torch.device, dtype: torch.dtype):
        diffusers = import_diffusers()
        # A pipeline folder (vae/ inside) or a VAE folder of its own.
        subfolder = "vae" if (pipeline_dir / "vae" / "config.json").is_file() else None
        if subfolder is None and not (pipeline_dir / "config.json").is_file():
            raise ReconstructError(f"{pipeline_dir}: neither a pipeline folder with vae/ nor a VAE folder")
        try:
            vae = diffusers.AutoencoderKL.from_pretrained(pipeline_dir, subfolder=subfolder, local_files_only=True,
                                                          **{dtype_keyword(diffusers): dtype})
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise _load_error(pipeline_dir, exc) from None
        self.vae = vae.to(device).eval()
        self.device, self.dtype = device, dtype
        self.sample = options.latent == "sample"
        self.multiple = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.inference_mode()
    def __call__(self, pixels: list[np.ndarray], seeds: list[int]) -> list[np.ndarray]:
        batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).to(self.device, self.dtype) / 127.5 - 1
        posterior = self.vae.encode(batch).latent_dist
        latents = posterior.mean
        if self.sample:
            noise = torch.stack([torch.randn(latents.shape[1:], generator=g)
                                 for g in _seeded_generators(seeds)])
            latents = latents + posterior.std * noise.to(self.device, latents.dtype)
        decoded = self.vae.decode(latents).sample
        return _to_uint8(decoded / 2 + 0.5)


class InpaintReconstructor(Reconstructor):
    """The pipeline's inpainting at ``strength`` with an empty prompt, one seeded generator per file."""

    def __init__(self, pipeline_dir: Path, options: ReconstructOptions, device: torch.device, dtype: torch.dtype):
        diffusers = import_diffusers()
        index_path = pipeline_dir / "model_index.json"
        if not index_path.is_file():
            raise ReconstructError(f"{pipeline_dir}: no model_index.json, so not a diffusers pipeline folder")
        components = json.loads(index_path.read_text())
        # The safety checker would black out "unsafe" reconstructions and is not needed to reconstruct.
        extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in components else {}
        try:
            pipe = diffusers.AutoPipelineForInpainting.from_pretrained(pipeline_dir, local_files_only=True,
                                                                       **{dtype_keyword(diffusers): dtype}, **extra)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise _load_error(pipeline_dir, exc) from None
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device)
        self.options = options
        self.multiple = int(pipe.vae_scale_factor)
        # An inpainting UNet (9 input channels) sees the whole image through a keep-everything mask; a plain
        # UNet would paste the original latents back wherever the mask keeps them, i.e. everywhere.
        inpainting_unet = getattr(pipe.unet.config, "in_channels", 4) == 9
        self.mask_value = 255 if options.mask == "repaint" or (options.mask == "auto" and not inpainting_unet) else 0

    @torch.inference_mode()
    def __call__(self, pixels: list[np.ndarray], seeds: list[int]) -> list[np.ndarray]:
        height, width = pixels[0].shape[:2]
        images = [Image.fromarray(p) for p in pixels]
        masks = [Image.new("L", (width, height), self.mask_value) for _ in pixels]
        result = self.pipe(prompt=[""] * len(pixels), image=images, mask_image=masks, height=height, width=width,
                           strength=self.options.strength, num_inference_steps=self.options.steps,
                           guidance_scale=self.options.guidance, generator=_seeded_generators(seeds),
                           output_type="pt")
        return _to_uint8(result.images)


def load_reconstructor(pipeline_dir: Path, options: ReconstructOptions, device: torch.device,
                       dtype: torch.dtype) -> Reconstructor:
    if not pipeline_dir.is_dir():
        raise ReconstructError(f"pipeline folder not found: {pipeline_dir}")
    cls = VaeReconstructor if options.method == "vae" else InpaintReconstructor
    return cls(pipeline_dir, options, device, dtype)


# -- the job -----------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    path: Path
    relative: str
    out: Path
    size: tuple[int, int] | None


def _batches(jobs: list[_Job], batch_size: int) -> Iterable[list[_Job]]:
    """Same-size images together (a batch is one tensor); sorted, so the batches are the same on every run."""
    def size_key(job: _Job) -> tuple[int, int]:
        return job.size or (0, 0)

    for _, group in itertools.groupby(sorted(jobs, key=lambda j: (size_key(j), j.relative)), key=size_key):
        members = list(group)
        for start in range(0, len(members), batch_size):
            yield members[start:start + batch_size]


def _write_report(out_dir: Path, report: ReconstructReport) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_NAME
    partial = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    partial.write_text(json.dumps(report.as_json(), indent=2) + "\n")
    os.replace(partial, path)


def _check_same_recipe(out_dir: Path, pipeline: str, recipe: dict[str, Any]) -> None:
    path = out_dir / REPORT_NAME
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    before = {"pipeline": previous.get("pipeline"), **previous.get("recipe", {})}
    now = {"pipeline": pipeline, **recipe}
    if before != now:
        changed = ", ".join(f"{k} {before.get(k)!r} → {v!r}" for k, v in now.items() if before.get(k) != v)
        raise ReconstructError(f"{out_dir} holds reconstructions made with other settings ({changed}); "
                               "choose another --out, or rerun with the same settings to resume")


def reconstruct_folder(pipeline_dir: str | Path, images_dir: str | Path, out_dir: str | Path,
                       options: ReconstructOptions, *, progress: bool = True) -> ReconstructReport:
    """Reconstruct every selected image under ``images_dir`` into ``out_dir``; returns (and writes) the report."""
    options.validate()
    pipeline_dir, images_dir, out_dir = Path(pipeline_dir), Path(images_dir), Path(out_dir)
    import_diffusers()  # before any work: without the extra the command says so and stops
    if not images_dir.is_dir():
        raise ReconstructError(f"image folder not found: {images_dir}")
    out_resolved, images_resolved = out_dir.resolve(), images_dir.resolve()
    if out_resolved == images_resolved or out_resolved.is_relative_to(images_resolved):
        raise ReconstructError(f"--out {out_dir} is inside --images {images_dir}: its outputs would be read as "
                               "inputs (and as a data folder of their own); choose a folder outside it")
    device, dtype = resolve_device(options.device, options.precision)
    layout, inputs = select_inputs(images_dir, options.layout, options.generators)
    if not inputs:
        raise ReconstructError(f"no images to reconstruct under {images_dir} ({layout} layout)")
    recipe = options.recipe()
    report = ReconstructReport("running", str(pipeline_dir.resolve()), str(images_resolved), str(out_resolved),
                               layout, recipe, device=str(device), dtype=str(dtype).removeprefix("torch."),
                               inputs=len(inputs))
    if not pipeline_dir.is_dir():
        raise ReconstructError(f"pipeline folder not found: {pipeline_dir}")
    if out_dir.is_dir():
        _check_same_recipe(out_dir, report.pipeline, recipe)
        remove_partials(out_dir)

    jobs: list[_Job] = []
    claimed: dict[Path, str] = {}
    for path in inputs:
        relative = path.relative_to(images_dir)
        target = output_path(out_dir, relative)
        if target in claimed:  # a.jpg and a.png in one folder would both become a.png
            report.skipped.append({"path": relative.as_posix(), "reason": "duplicate_name",
                                   "detail": f"{claimed[target]} already maps to {target.name}"})
            continue
        claimed[target] = relative.as_posix()
        jobs.append(_Job(path, relative.as_posix(), target, oriented_size(path)))
    pending = [job for job in jobs if not is_finished(job.out, job.size)]
    report.already_done = len(jobs) - len(pending)

    reconstructor = load_reconstructor(pipeline_dir, options, device, dtype) if pending else None
    # Written before the first output (and only once the pipeline has loaded): the recipe a resumed run must match.
    _write_report(out_dir, report)
    started = time.perf_counter()
    bar = tqdm(total=len(pending), desc=f"reconstruct ({options.method})", unit="img", disable=not progress,
               dynamic_ncols=True)
    try:
        for batch in _batches(pending, options.batch_size):
            decoded: list[tuple[_Job, np.ndarray]] = []
            for job in batch:
                try:
                    img, _ = decode_rgb(job.path, max_pixels=options.max_pixels)
                except UnreadableImage as exc:
                    report.skipped.append({"path": job.relative, "reason": str(exc.reason), "detail": exc.detail})
                    bar.update(1)
                    continue
                decoded.append((job, np.asarray(img)))
            assert reconstructor is not None
            # Header sizes can differ from decoded ones (an odd APNG): one tensor per decoded padded size.
            by_shape: dict[tuple[int, ...], list[tuple[_Job, np.ndarray]]] = {}
            for job, pixels in decoded:
                by_shape.setdefault(pad_to_multiple(pixels, reconstructor.multiple).shape, []).append((job, pixels))
            for group in by_shape.values():
                padded = [pad_to_multiple(pixels, reconstructor.multiple) for _, pixels in group]
                outputs = reconstructor(padded, [file_seed(job.relative, options.seed) for job, _ in group])
                for (job, pixels), output in zip(group, outputs, strict=True):
                    height, width = pixels.shape[:2]
                    write_png(np.ascontiguousarray(output[:height, :width]), job.out)
                    report.written += 1
                    bar.update(1)
    finally:
        bar.close()
    report.seconds = round(time.perf_counter() - started, 3)
    report.images_per_second = round(report.written / report.seconds, 4) if report.seconds > 0 else 0.0
    report.status = "done"
    _write_report(out_dir, report)
    return report
