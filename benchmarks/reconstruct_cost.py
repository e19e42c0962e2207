"""Cost per image of ``ppl reconstruct`` (vae and inpaint) on a random-initialised pipeline built here.

Two pipeline shapes, both diffusers' own classes saved with ``save_pretrained`` and loaded back the way the
command loads them (offline, from the folder):

* ``tiny``: the test suite's shapes (VAE factor 4, a 9-channel UNet of two blocks, a 1-layer text encoder):
  the command's own overhead (decoding, padding, PNG writing, resuming checks) more than model time;
* ``sd1``: Stable Diffusion 1.x inpainting's shapes (VAE 128-256-512-512, UNet 320-640-1280-1280 with 9 input
  channels and 768-wide cross-attention, a CLIP ViT-L/14-shaped text encoder): what a real checkpoint costs,
  since random weights cost the same arithmetic as trained ones.

Images are random-noise RGB squares of ``--size`` pixels. Times cover the reconstruction loop only (model
loading is reported apart), after ``--warmup`` images run into a scratch folder. Prints one JSON object.

    .venv/bin/python benchmarks/reconstruct_cost.py --shape tiny --size 64 --images 32
    .venv/bin/python benchmarks/reconstruct_cost.py --shape sd1 --size 512 --images 2 --warmup 0 --batch-size 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ppl_model.reconstruct import ReconstructOptions, reconstruct_folder

TOKENS = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>", "t</w>", "low</w>",
          "er</w>", "<unk>", "<|startoftext|>", "<|endoftext|>"]


def build_pipeline(shape: str, folder: Path) -> Path:
    """Save a random-initialised SD inpainting pipeline of ``shape`` (tiny or sd1) into ``folder``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    if shape == "tiny":
        vae = AutoencoderKL(block_out_channels=(8, 8, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                            up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4,
                            norm_num_groups=4, sample_size=32)
        unet = UNet2DConditionModel(sample_size=8, in_channels=9, out_channels=4, layers_per_block=1,
                                    block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
                                    attention_head_dim=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
        text = CLIPTextConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, max_position_embeddings=8, projection_dim=16)
        max_length = 8
    else:
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                            sample_size=512)
        unet = UNet2DConditionModel(sample_size=64, in_channels=9, out_channels=4, layers_per_block=2,
                                    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                    attention_head_dim=8,
                                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        text = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
        max_length = 77
    vocab_dir = folder / "vocab"
    vocab_dir.mkdir(parents=True, exist_ok=True)
    (vocab_dir / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(TOKENS)}))
    (vocab_dir / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    tokenizer = CLIPTokenizer(vocab_file=str(vocab_dir / "vocab.json"), merges_file=str(vocab_dir / "merges.txt"),
                              model_max_length=max_length)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe: Any = StableDiffusionInpaintPipeline(vae=vae, text_encoder=CLIPTextModel(text), tokenizer=tokenizer,
                                               unet=unet, scheduler=scheduler, safety_checker=None,
                                               feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


def make_images(folder: Path, count: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img_{i:04d}.png")
    return folder


def measure(pipeline: Path, work: Path, method: str, args: argparse.Namespace) -> dict[str, Any]:
    options = ReconstructOptions(method=method, strength=args.strength, steps=args.steps,
                                 batch_size=args.batch_size, device=args.device)
    if args.warmup:
        warm = make_images(work / f"warm-{method}", args.warmup, args.size)
        reconstruct_folder(pipeline, warm, work / f"warm-out-{method}", options, progress=False)
    started = time.perf_counter()
    report = reconstruct_folder(pipeline, work / "images", work / f"out-{method}", options, progress=False)
    total = time.perf_counter() - started
    return {"method": method, "images": report.written, "loop_seconds": report.seconds,
            "seconds_per_image": round(report.seconds / report.written, 4),
            "images_per_second": report.images_per_second, "load_and_loop_seconds": round(total, 3),
            **({"strength": args.strength, "steps": args.steps, "denoising_steps": int(args.steps * args.strength)}
               if method == "inpaint" else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny", choices=["tiny", "sd1"])
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--images", type=int, default=32, help="timed images per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed images per method first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--methods", default="vae,inpaint")
    parser.add_argument("--steps", type=int, default=8, help="inpaint scheduler steps (int(steps·strength) run)")
    parser.add_argument("--strength", type=float, default=0.25)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reconstruct-cost-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        pipeline = build_pipeline(args.shape, work)
        build_seconds = time.perf_counter() - started
        make_images(work / "images", args.images, args.size)
        results = [measure(pipeline, work, method, args) for method in args.methods.split(",")]
    print(json.dumps({"shape": args.shape, "size": args.size, "batch_size": args.batch_size,
                      "device": "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device,
                      "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                      "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "build_seconds": round(build_seconds, 1), "results": results}, indent=2))


if __name__ == "__main__":
    main()
