"""Small image generators trained here on crops of real photos: the fakes of the project's own benchmark.

Each family is a convolutional autoencoder whose decoder upsamples in a different way, because the
upsampling layers are what leave a generator's spectral traces. ``reconstruct`` gives fakes that are
pixel-aligned with their real crops (what RPR needs); ``sample_images`` decodes latents that encode no
real crop, fakes with no real partner. Images are float32 NCHW tensors in [0, 1] throughout.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

UPSAMPLERS = ("transposed", "nearest_conv", "pixel_shuffle", "bilinear_conv")
SAMPLE_MODES = ("interpolate", "gaussian")


@dataclass(frozen=True)
class GeneratorSpec:
    name: str
    upsampler: str
    downsample: int  # latent spatial downsampling factor
    latent_channels: int = 8
    width: int = 32  # base channel count

    def __post_init__(self) -> None:
        if self.upsampler not in UPSAMPLERS:
            raise ValueError(f"unknown upsampler {self.upsampler!r}; expected one of {UPSAMPLERS}")
        if self.downsample not in (4, 8):
            raise ValueError(f"downsample must be 4 or 8, got {self.downsample}")
        if self.latent_channels < 1 or self.width < 1:
            raise ValueError("latent_channels and width must be positive")

    @property
    def stages(self) -> int:
        """Number of ×2 stages in the encoder and in the decoder."""
        return int(math.log2(self.downsample))


# What each family imitates:
#   transposed    stride-2 3×3 transposed convs: uneven kernel overlap, checkerboard artifacts like early
#                 GAN and VAE decoders (DCGAN, ProGAN-era);
#   nearest_conv  nearest-neighbour ×2 then 3×3 conv: the Stable Diffusion VAE decoder's upsampling;
#   pixel_shuffle 3×3 conv to 4× channels then depth-to-space: ESPCN / sub-pixel super-resolution;
#   bilinear_conv bilinear ×2 then 3×3 conv: smooth upsampling, the faintest periodic trace;
#   *_x8          a coarser latent (÷8): blurrier reconstructions, stronger decoder traces.
FAMILIES: dict[str, GeneratorSpec] = {
    spec.name: spec
    for spec in (
        GeneratorSpec("ae_transposed_x4", "transposed", 4),
        GeneratorSpec("ae_nearest_x4", "nearest_conv", 4),
        GeneratorSpec("ae_shuffle_x4", "pixel_shuffle", 4),
        GeneratorSpec("ae_bilinear_x4", "bilinear_conv", 4),
        GeneratorSpec("ae_transposed_x8", "transposed", 8),
    )
}


def _upsample_block(kind: str, c_in: int, c_out: int) -> nn.Sequential:
    """One ×2 upsampling stage of the decoder, in the family's own way."""
    if kind == "transposed":
        return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1), nn.GELU())
    if kind == "nearest_conv":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1),
                             nn.GELU())
    if kind == "pixel_shuffle":
        return nn.Sequential(nn.Conv2d(c_in, 4 * c_out, 3, padding=1), nn.PixelShuffle(2), nn.GELU())
    if kind == "bilinear_conv":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                             nn.Conv2d(c_in, c_out, 3, padding=1), nn.GELU())
    raise ValueError(f"unknown upsampler {kind!r}")


class ConvAutoencoder(nn.Module):
    """Stride-2 conv encoder → ``latent_channels`` latent at 1/downsample → decoder with the spec's upsampler."""

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__()
        self.spec = spec
        channels = [min(spec.width * 2**i, 4 * spec.width) for i in range(spec.stages)]  # w, 2w, 4w (capped)
        encoder: list[nn.Module] = []
        c_in = 3
        for c_out in channels:
            encoder += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU()]
            c_in = c_out
        encoder.append(nn.Conv2d(c_in, spec.latent_channels, 1))
        self.encoder = nn.Sequential(*encoder)
        decoder: list[nn.Module] = [nn.Conv2d(spec.latent_channels, c_in, 3, padding=1), nn.GELU()]
        for c_out in [*reversed(channels[:-1]), channels[0]]:  # mirror of the encoder
            decoder.append(_upsample_block(spec.upsampler, c_in, c_out))
            c_in = c_out
        decoder += [nn.Conv2d(c_in, 3, 3, padding=1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*decoder)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def _check_images(crops: torch.Tensor, downsample: int) -> None:
    if crops.ndim != 4 or crops.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(crops.shape)}")
    if crops.shape[0] == 0:
        raise ValueError("no images given")
    height, width = crops.shape[-2:]
    if height % downsample or width % downsample:
        raise ValueError(f"image size {height}×{width} is not a multiple of the downsample factor {downsample}: "
                         "reconstructions would not be pixel-aligned with their inputs")


def train_autoencoder(spec: GeneratorSpec, crops: torch.Tensor, *, steps: int, batch_size: int = 32,
                      lr: float = 2e-3, seed: int = 0, progress: bool = False) -> ConvAutoencoder:
    """Fits one family to reconstruct ``crops`` (L1 + MSE, AdamW); same seed, same weights."""
    _check_images(crops, spec.downsample)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        model = ConvAutoencoder(spec)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr)
    crops = crops.float()
    model.train()
    for _ in tqdm(range(steps), desc=spec.name, disable=not progress):
        batch = crops[torch.randint(0, crops.shape[0], (batch_size,), generator=generator)]
        out = model(batch)
        loss = F.l1_loss(out, batch) + F.mse_loss(out, batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return model.eval()


@torch.no_grad()
def _encode_all(model: ConvAutoencoder, crops: torch.Tensor, batch_size: int) -> torch.Tensor:
    _check_images(crops, model.spec.downsample)
    return torch.cat([model.encode(chunk.float()) for chunk in crops.split(batch_size)])


@torch.no_grad()
def _decode_all(model: ConvAutoencoder, latents: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model.decode(chunk) for chunk in latents.split(batch_size)]).clamp(0, 1)


def reconstruct(model: ConvAutoencoder, crops: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The paired fakes: each crop through the autoencoder, same H×W, pixel-aligned with its input."""
    model.eval()
    return _decode_all(model, _encode_all(model, crops, batch_size), batch_size)


def sample_latents(model: ConvAutoencoder, reference_crops: torch.Tensor, count: int, *, seed: int,
                   mode: str = "interpolate", batch_size: int = 64) -> torch.Tensor:
    """Latents that encode no real crop: convex mixes of two references' latents, or a per-channel Gaussian."""
    if mode not in SAMPLE_MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; expected one of {SAMPLE_MODES}")
    model.eval()
    refs = _encode_all(model, reference_crops, batch_size)
    generator = torch.Generator().manual_seed(seed)
    if mode == "gaussian":
        mean = refs.mean(dim=(0, 2, 3), keepdim=True)
        std = refs.std(dim=(0, 2, 3), keepdim=True)
        return mean + std * torch.randn((count, *refs.shape[1:]), generator=generator)
    if refs.shape[0] < 2:
        raise ValueError("interpolation needs at least two reference crops")
    first = torch.randint(0, refs.shape[0], (count,), generator=generator)
    second = (first + torch.randint(1, refs.shape[0], (count,), generator=generator)) % refs.shape[0]  # ≠ first
    weight = 0.3 + 0.4 * torch.rand((count, 1, 1, 1), generator=generator)
    return weight * refs[first] + (1 - weight) * refs[second]


def sample_images(model: ConvAutoencoder, reference_crops: torch.Tensor, count: int, *, seed: int,
                  mode: str = "interpolate", batch_size: int = 64) -> torch.Tensor:
    """Unpaired fakes: decoded ``sample_latents``, (count, 3, H, W) in [0, 1] at the references' size."""
    latents = sample_latents(model, reference_crops, count, seed=seed, mode=mode, batch_size=batch_size)
    return _decode_all(model, latents, batch_size)


def to_uint8_images(tensor: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) or (3, H, W) floats in [0, 1] → RGB PIL images, rounded to the nearest grey level."""
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 4 or tensor.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(tensor.shape)}")
    arrays = (tensor.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]


def crops_from_images(images: list[Image.Image], size: int, per_image: int, seed: int) -> torch.Tensor:
    """Random size×size windows, never resized (resampling would add traces of its own); images
    smaller than the crop are skipped. Returns (N, 3, size, size) floats in [0, 1], N may be 0."""
    rng = np.random.default_rng(seed)
    crops: list[np.ndarray] = []
    for image in images:
        if image.width < size or image.height < size:
            continue
        array = np.asarray(image.convert("RGB"))
        for _ in range(per_image):
            top = int(rng.integers(0, image.height - size + 1))
            left = int(rng.integers(0, image.width - size + 1))
            crops.append(array[top:top + size, left:left + size])
    if not crops:
        return torch.empty((0, 3, size, size))
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div(255).contiguous()


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_generator(model: ConvAutoencoder, spec: GeneratorSpec, path: Path | str) -> None:
    """Weights to ``path`` (safetensors), spec to ``path`` with a .json suffix."""
    path = Path(path)
    if model.spec != spec:
        raise ValueError(f"model was built from {model.spec}, not {spec}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    _sidecar(path).write_text(json.dumps(asdict(spec), indent=2) + "\n")


def load_generator(path: Path | str) -> tuple[ConvAutoencoder, GeneratorSpec]:
    """The model (eval mode) and spec saved by ``save_generator``; no pickle involved."""
    path = Path(path)
    for file in (path, _sidecar(path)):
        if not file.is_file():
            raise FileNotFoundError(f"generator file missing: {file}")
    try:
        spec = GeneratorSpec(**json.loads(_sidecar(path).read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{_sidecar(path)} is not a generator spec: {err}") from err
    model = ConvAutoencoder(spec)
    try:
        model.load_state_dict(load_file(str(path)))
    except (RuntimeError, SafetensorError) as err:  # unreadable file; missing, unexpected or mis-shaped tensors
        raise ValueError(f"weights in {path} do not match spec {spec}: {err}") from err
    return model.eval(), spec


def local_edit_masks(count: int, height: int, width: int, *, area: float, seed: int,
                     feather: float = 2.0) -> torch.Tensor:
    """Soft elliptical region masks ``(count, 1, H, W)`` in [0, 1], each covering about ``area`` of the image at
    a random place, aspect and position, with a linear ramp ``feather`` pixels wide across the edge (the
    blend an inpainting pipeline applies)."""
    if not 0 < area < 1:
        raise ValueError("area must be in (0, 1)")
    generator = torch.Generator().manual_seed(seed)
    ys = torch.arange(height, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
    masks = torch.empty(count, 1, height, width)
    for k in range(count):
        aspect = 0.6 + float(torch.rand((), generator=generator))  # x semi-axis / y semi-axis
        semi_x = min(math.sqrt(area * height * width * aspect / math.pi), width / 2)
        semi_y = min(area * height * width / (math.pi * semi_x), height / 2)
        cx = semi_x + float(torch.rand((), generator=generator)) * (width - 2 * semi_x)
        cy = semi_y + float(torch.rand((), generator=generator)) * (height - 2 * semi_y)
        radius = (((xs - cx) / semi_x) ** 2 + ((ys - cy) / semi_y) ** 2).sqrt()
        masks[k, 0] = ((1 - radius) * min(semi_x, semi_y) / feather + 0.5).clamp(0, 1)
    return masks


def local_edits(model: ConvAutoencoder, crops: torch.Tensor, *, area: float, seed: int,
                batch_size: int = 64) -> torch.Tensor:
    """Locally edited fakes: each crop with one region regenerated by ``model`` (its reconstruction there) and
    blended in; the rest of the image keeps its real pixels, so the traces are uneven by construction."""
    masks = local_edit_masks(crops.shape[0], crops.shape[-2], crops.shape[-1], area=area, seed=seed)
    regenerated = reconstruct(model, crops, batch_size)
    return (masks * regenerated + (1 - masks) * crops.float()).clamp(0, 1)
