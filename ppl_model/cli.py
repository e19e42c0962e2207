"""``ppl``: the model-side command line. Each subcommand parses its arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ppl_model import reconstruct
from ppl_model.categories import Backend, Precision
from ppl_model.config import ConfigError, load_config
from ppl_model.errors import PPLError
from ppl_model.training.runner import run_training


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    if args.reconstructions is not None:
        cfg.data.reconstructions = args.reconstructions
    info = run_training(cfg, args.data, args.out, baseline=args.baseline, resume=args.resume,
                        show_progress=not args.no_progress)
    if info is not None:
        val = info.training.get("validation") or {}
        summary = f" val acc {val['acc']:.3f} (real {val['acc_real']:.3f}, fake {val['acc_fake']:.3f})" if val else ""
        print(f"model {info.version_id} written to {args.out}{summary}")
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    options = reconstruct.ReconstructOptions(
        method=args.method, latent=args.latent, strength=args.strength, steps=args.steps, guidance=args.guidance,
        mask=args.mask, seed=args.seed, batch_size=args.batch_size, device=args.device, precision=args.precision,
        layout=args.layout, generators=tuple(g for g in (args.generators or "").split(",") if g),
        max_pixels=args.max_pixels)
    report = reconstruct.reconstruct_folder(args.pipeline, args.images, args.out, options,
                                            progress=not args.no_progress)
    rate = f" ({report.images_per_second:.3g} images/s)" if report.written else ""
    print(f"{report.written} reconstruction(s) written to {args.out}{rate}, {report.already_done} already there, "
          f"{len(report.skipped)} input(s) skipped ({report.layout} layout); report in {args.out}/reconstruct.json")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from ppl_model.analysis.cde import SUMMARY_KEYS, analyze

    summary = analyze(args.model, args.images, args.out, baseline=args.baseline, batch_size=args.batch_size,
                      seed=args.seed, progress=not args.no_progress)
    for key in SUMMARY_KEYS:
        stats = summary[key]
        mean = "n/a" if stats["mean"] is None else f"{stats['mean']:.4f}"
        std = "" if stats["std"] is None else f" ± {stats['std']:.4f}"
        print(f"{key:28s} {mean}{std}  (n = {stats['n']})")
    print(f"fill: {summary['fill_description']}")
    print(f"{summary['images']} images analysed, {len(summary['skipped'])} skipped; heatmaps and summary.json in "
          f"{args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from ppl_model.inference.export import FP16_TOLERANCE, TOLERANCE, ExportError, export_onnx

    try:
        report = export_onnx(args.model, fp16=args.fp16)
    except ExportError as exc:
        print(f"ppl export: {exc}", file=sys.stderr)
        return 1
    limit = FP16_TOLERANCE if args.fp16 else TOLERANCE
    for batch, diff in report.max_abs_diff.items():
        print(f"batch {batch}: max |onnxruntime - torch| = {diff:.3g} (limit {limit})")
    print(f"wrote {report.path}")
    return 0


def _build_engine(args: argparse.Namespace) -> int:
    from ppl_model.inference.tensorrt_engine import build_engine

    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    sidecar = build_engine(args.model, precision=precision, min_batch=args.min_batch, opt_batch=args.opt_batch,
                           max_batch=args.max_batch)
    print(f"built a {sidecar.precision} engine for {sidecar.gpu_name} with TensorRT {sidecar.tensorrt_version}, "
          f"batch {sidecar.min_batch}..{sidecar.max_batch} (optimised for {sidecar.opt_batch})")
    return 0


def _scan(args: argparse.Namespace) -> int:
    from ppl_model.inference.backends import load_backend
    from ppl_model.inference.preprocess import Preprocessing
    from ppl_model.inference.scan import run_scan
    from ppl_model.provenance import ProvenancePolicy

    provenance = ProvenancePolicy.from_files(args.c2pa_trust_anchors,
                                             trust_unsigned_metadata=args.trust_unsigned_metadata)
    backend = load_backend(args.backend, args.model, precision=args.precision, max_batch=args.batch_size * args.tiles)
    info = backend.info
    prep = Preprocessing.for_model(info, tiles=args.tiles)
    fmt = "csv" if args.out and args.out.suffix.lower() == ".csv" else "jsonl"
    out = args.out.open("w", newline="") if args.out else sys.stdout
    try:
        summary = run_scan(args.paths, backend, prep, info.threshold, out, fmt, how=args.aggregate,
                           batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress,
                           provenance=provenance)
    finally:
        if args.out:
            out.close()
    print(json.dumps({"backend": backend.name, "model": info.version_id, **summary}), file=sys.stderr)
    return 0


def _bench_engine(args: argparse.Namespace) -> int:
    from ppl_model.bench.engine import markdown_table, run_engine_bench

    def csv_ints(text: str) -> list[int]:
        return [int(v) for v in text.split(",") if v]

    result = run_engine_bench(args.arch, args.size, args.backends.split(","), csv_ints(args.batch_sizes),
                              jpeg=not args.no_jpeg, iters=args.iters, min_seconds=args.min_seconds)
    print(markdown_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _bench_synth(args: argparse.Namespace) -> int:
    import time

    from ppl_model.synthbench.benchmark import run_benchmark
    from ppl_model.synthbench.config import SynthBenchConfig
    from ppl_model.synthbench.stages import detector_config

    cfg = SynthBenchConfig.preset_named("quick" if args.quick else args.scale).with_overrides(args.bench_set)
    if args.seeds is not None:
        cfg = cfg.with_overrides([f"seeds={args.seeds}"])
    if args.train_family:
        cfg = cfg.with_overrides([f'train_family="{args.train_family}"'])
    if args.no_robustness:
        cfg = cfg.with_overrides(["robustness=false"])
    if args.target_fpr is not None:
        cfg = cfg.with_overrides([f"target_fpr={args.target_fpr}"])
    if args.arms:
        cfg = cfg.with_overrides([f"arms={json.dumps(args.arms.split(','))}"])
    if args.regimes:
        cfg = cfg.with_overrides([f"regimes={json.dumps(args.regimes.split(','))}"])
    cfg.validate()
    exp = detector_config(args.config, cfg, args.set)
    progress = sys.stderr.isatty() if args.progress is None else args.progress

    def log(message: str) -> None:
        print(f"[synthbench {time.strftime('%H:%M:%S')}] {message}", flush=True)

    result = run_benchmark(args.photos, args.out, cfg, exp, config_path=args.config, progress=progress, log=log,
                           cache=args.cache)
    for method, block in result["aggregate"].items():
        unseen = block["mean_unseen"]
        print(f"{method:34s} mean over unseen families: AUROC {unseen['auroc']['mean']:.3f}  "
              f"AP {unseen['ap']['mean']:.3f}  acc at calibrated threshold {unseen['acc']['mean']:.3f}  "
              f"({block['seeds']} seed(s))")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ppl_model.evaluation.evaluate import evaluate_model, format_table

    if args.calibrate and args.target_fpr is None:
        raise ConfigError("--calibrate needs --target-fpr, e.g. --target-fpr 0.01")
    result = evaluate_model(args.model, args.data, layout=args.layout, backend=args.backend,
                            robustness=args.robustness, target_fpr=args.target_fpr if args.calibrate else None,
                            roc_png=args.roc, batch_size=args.batch_size, workers=args.workers,
                            progress=not args.no_progress)
    if "calibrated" in result:
        print(f"threshold calibrated to {result['threshold']:.6g} for a false-positive rate of at most "
              f"{args.target_fpr} (was {result['calibrated']['previous_threshold']:.6g}); written to model.json")
    print(format_table(result))
    if result["skipped"]:
        print(f"{len(result['skipped'])} unreadable file(s) skipped", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppl", description="PPL AI-generated image detector: model side")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line (before the command)")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a detector (PPL, or the plain baseline)",
                                description="Train a PPL detector on a data folder and write a model directory.")
    train.add_argument("--config", required=True, help="TOML config (see configs/)")
    train.add_argument("--data", required=True, help="data folder (genimage, paired or folders layout)")
    train.add_argument("--out", required=True, help="output folder: model directory, metrics.jsonl, checkpoints/")
    train.add_argument("--baseline", action="store_true",
                       help="plain BCE fine-tuning: RPR, PCL and the patch loss off, all else identical")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    train.add_argument("--reconstructions", metavar="DIR",
                       help="reconstructions of the real training images, at their paths relative to --data (what "
                            "`ppl reconstruct --images DATA --out DIR` writes): each becomes a fake paired with its "
                            "real image, so RPR composites it (sets data.reconstructions)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")
    train.set_defaults(handler=_train)

    rec = commands.add_parser(
        "reconstruct", help="pixel-aligned reconstructions of real images by a local diffusers pipeline (RPR donors)",
        description="Reconstruct real images through a local Hugging Face-format diffusers pipeline (nothing is "
                    "downloaded) into lossless PNGs of the same size at the same relative paths, for RPR. "
                    "--images may be a GenImage tree (its <generator>/train/nature/ images are reconstructed), a "
                    "real/ + fake/ tree (its real/ images) or a plain folder (every image); OUT mirrors the paths "
                    "relative to --images. Point `ppl train --reconstructions OUT` at the result, or, for a plain "
                    "DATA/real folder, write to DATA/<name> to get the paired layout. A rerun resumes: finished "
                    "files are skipped. Unreadable inputs are skipped and listed in OUT/reconstruct.json. "
                    'Needs the optional extra: pip install -e ".[reconstruct]".')
    rec.add_argument("--pipeline", required=True,
                     help="local diffusers pipeline folder (model_index.json; for --method vae a folder with vae/, "
                          "or a VAE folder itself), e.g. a copy of an SD 1.x inpainting checkpoint")
    rec.add_argument("--images", required=True, help="folder of real images (GenImage, real/ + fake/, or plain)")
    rec.add_argument("--out", required=True, help="output folder, outside --images (PNGs + reconstruct.json)")
    rec.add_argument("--method", default="vae", choices=reconstruct.METHODS,
                     help="vae: encode/decode through the pipeline's AutoencoderKL; inpaint: the inpainting pipeline "
                          "at --strength with an empty prompt, the paper's recipe (default vae)")
    rec.add_argument("--latent", default="sample", choices=reconstruct.LATENTS,
                     help="vae: a latent drawn from the encoder's distribution (seeded per file) or its mode "
                          "(default sample)")
    rec.add_argument("--strength", type=float, default=0.25,
                     help="inpaint: how far into the noise schedule each image goes, (0, 1] (default 0.25)")
    rec.add_argument("--steps", type=int, default=50,
                     help="inpaint: scheduler steps at strength 1; int(steps × strength) are run (default 50)")
    rec.add_argument("--guidance", type=float, default=1.0,
                     help="inpaint: classifier-free guidance scale (default 1.0, i.e. off). With an empty prompt "
                          "guidance has nothing to steer towards: above 1 it only doubles the cost")
    rec.add_argument("--mask", default="auto", choices=reconstruct.MASKS,
                     help="inpaint: keep (all-black mask: the UNet sees the whole image, DRCT's choice) or repaint "
                          "(all-white); auto: keep on an inpainting UNet (9 input channels), repaint on a plain one, "
                          "where keep would paste the original latents back and reduce to a VAE round trip")
    rec.add_argument("--seed", type=int, default=0,
                     help="combined with each file's relative path into that file's seed: reruns are bit-identical")
    rec.add_argument("--batch-size", type=int, default=8, help="images of the same size per forward pass (default 8)")
    rec.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    rec.add_argument("--precision", default="auto", choices=reconstruct.PRECISIONS,
                     help="auto: fp16 on CUDA, fp32 on the CPU (fp16 and bf16 need CUDA)")
    rec.add_argument("--layout", default="auto", choices=reconstruct.LAYOUTS,
                     help="which images of --images are real: auto detects GenImage (<gen>/train/nature), folders "
                          "(real/, or train/real/) or plain (every image)")
    rec.add_argument("--generators", metavar="A,B",
                     help="GenImage: only these generator folders' real images (default all; the paper trains on "
                          "one, e.g. stable_diffusion_v_1_4)")
    rec.add_argument("--max-pixels", type=int, default=2048 * 2048,
                     help="skip (and report as too_large) images over this many pixels (default 2048×2048)")
    rec.add_argument("--no-progress", action="store_true", help="no progress bar (the bar shows images/s)")
    rec.set_defaults(handler=_reconstruct)

    evaluate = commands.add_parser("eval", help="accuracy, AP and AUROC per generator; calibration; robustness")
    evaluate.add_argument("--model", required=True, help="model directory")
    evaluate.add_argument("--data", required=True, help="evaluation data folder")
    evaluate.add_argument("--layout", default="auto", choices=["auto", "genimage", "folders", "paired"])
    evaluate.add_argument("--json", type=Path, help="also write the figures as JSON")
    evaluate.add_argument("--calibrate", action="store_true",
                          help="choose the threshold on this data for --target-fpr and write it into model.json")
    evaluate.add_argument("--target-fpr", type=float, help="false-positive rate (real called fake) to calibrate to")
    evaluate.add_argument("--robustness", action="store_true",
                          help="also under JPEG 95/75/60/30, Gaussian blur σ 1/2, downscale 0.5/0.75")
    evaluate.add_argument("--roc", type=Path, help="write the ROC curves as a PNG")
    evaluate.add_argument("--backend", default=Backend.AUTO, choices=list(Backend))
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--workers", type=int, default=4, help="decoding threads")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(handler=_eval)

    analysis = commands.add_parser("analyze", help="Few-Patch-Bias analysis: counterfactual effect of every patch")
    analysis.add_argument("--model", required=True, help="model directory")
    analysis.add_argument("--images", required=True, help="folder of images (real/ + fake/ for labels)")
    analysis.add_argument("--out", required=True, type=Path, help="folder for summary.json, images.jsonl, heatmaps/")
    analysis.add_argument("--baseline", default="zero", choices=["zero", "mean", "black"],
                          help="fill of a masked patch: normalised zero (the model's mean colour, as in the paper), "
                               "the images' mean colour, or black")
    analysis.add_argument("--batch-size", type=int, default=256, help="masked copies per forward pass")
    analysis.add_argument("--seed", type=int, default=0, help="draws the random patch of the accuracy-drop test")
    analysis.add_argument("--no-progress", action="store_true")
    analysis.set_defaults(handler=_analyze)

    export = commands.add_parser("export", help="write MODEL/model.onnx and check it against torch")
    export.add_argument("--model", required=True, help="model directory")
    export.add_argument("--fp16", action="store_true",
                        help="write model.fp16.onnx, computed in float16 (for fp16 engines under TensorRT 11)")
    export.set_defaults(handler=_export)

    engine = commands.add_parser("build-engine", help="build a TensorRT engine from MODEL/model.onnx (GPU)")
    engine.add_argument("--model", required=True, help="model directory (run `ppl export` first)")
    precision = engine.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="fp16 kernels")
    precision.add_argument("--bf16", action="store_true", help="bf16 kernels")
    engine.add_argument("--min-batch", type=int, default=1)
    engine.add_argument("--opt-batch", type=int, default=32)
    engine.add_argument("--max-batch", type=int, default=128)
    engine.set_defaults(handler=_build_engine)

    scan = commands.add_parser("scan", help="judge image files offline (no services needed)")
    scan.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    scan.add_argument("--model", required=True, help="model directory")
    scan.add_argument("--backend", default=Backend.AUTO, choices=list(Backend))
    scan.add_argument("--precision", default=Precision.FP32, choices=list(Precision), help="torch on CUDA")
    scan.add_argument("--out", type=Path, help="FILE.jsonl or FILE.csv (default: JSON lines on stdout)")
    scan.add_argument("--tiles", type=int, default=1, help="judge up to this many crops per image")
    scan.add_argument("--aggregate", default="max", choices=["max", "mean"], help="how crops combine")
    scan.add_argument("--batch-size", type=int, default=64, help="images per inference call")
    scan.add_argument("--workers", type=int, default=4, help="decoding threads")
    scan.add_argument("--c2pa-trust-anchors", metavar="PEM",
                      help="root certificates (a PEM file) whose C2PA signing chains are trusted; without it a "
                           "validating manifest is 'valid', never 'trusted'")
    scan.add_argument("--trust-unsigned-metadata", action="store_true",
                      help="let unsigned metadata that declares a generator (IPTC source type, A1111/ComfyUI "
                           "chunks, a known generator's name) label an image fake (decision 'metadata'); by "
                           "default it is recorded as evidence only")
    scan.add_argument("--no-progress", action="store_true")
    scan.set_defaults(handler=_scan)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    bench_engine = bench.add_parser("engine", help="images/s and latency per batch size for each backend")
    bench_engine.add_argument("--arch", default="clip", choices=["clip", "dinov2"])
    bench_engine.add_argument("--size", default="tiny", choices=["tiny", "vit-b-16", "vit-l-14"])
    bench_engine.add_argument("--backends", default="torch,onnxruntime,tensorrt",
                              help="comma-separated; unavailable ones are reported and skipped")
    bench_engine.add_argument("--batch-sizes", default="1,8,32", help="comma-separated")
    bench_engine.add_argument("--no-jpeg", action="store_true", help="only pre-made tensors, no input pipeline")
    bench_engine.add_argument("--iters", type=int, default=10, help="timed calls at least (per batch size)")
    bench_engine.add_argument("--min-seconds", type=float, default=1.0, help="time each case at least this long")
    bench_engine.add_argument("--json", type=Path, help="also write the figures as JSON")
    bench_engine.set_defaults(handler=_bench_engine)

    synth = bench.add_parser(
        "synth", help="cross-generator benchmark on generators trained here from real photos (GenImage stand-in)",
        description="Split real photos by source photo, train conv-autoencoder generators on train-split crops, "
                    "train every ablation arm (baseline, patch dropout, RPR, PCL and their combinations) from "
                    "scratch and as LoRA on a backbone pretrained here, on one family; test on every family, "
                    "analyse patch reliance. "
                    "Writes OUT/results.json and OUT/report.md; generators, crops and datasets are cached under "
                    "OUT/cache, so a rerun with the same settings only retrains the detectors.")
    synth.add_argument("--photos", required=True, help="folder of real photos")
    synth.add_argument("--out", required=True, type=Path, help="output folder (results.json, report.md, runs/, cache/)")
    synth.add_argument("--scale", default="full", choices=["quick", "full", "gpu"],
                       help="preset: quick smoke run, full CPU run (~45-60 min on 2 cores with configs/tiny.toml), "
                            "gpu (224-px crops, 14-px patches, more crops and generator steps)")
    synth.add_argument("--quick", action="store_true", help="same as --scale quick")
    synth.add_argument("--seeds", type=int, help="detector seeds per method (default: the preset's; full: 3)")
    synth.add_argument("--train-family", help="the one family the detectors train on (default ae_nearest_x4)")
    synth.add_argument("--no-robustness", action="store_true", help="skip the degraded-input evaluation")
    synth.add_argument("--target-fpr", type=float,
                       help="each arm's threshold calls this fraction of the validation reals fake (default 0.05)")
    synth.add_argument("--arms", help="comma-separated ablation arms (default: baseline, patch-dropout, rpr, pcl, "
                                      "rpr+pcl, rpr+pcl+patch-head; also rpr+pcl-paper-form)")
    synth.add_argument("--regimes", help="comma-separated: scratch, pretrained-lora (default both)")
    synth.add_argument("--cache", type=Path, help="cache folder (default OUT/cache); runs may share one, e.g. one "
                                                  "process per regime, started once the first has built the data")
    synth.add_argument("--config", default="configs/tiny.toml",
                       help="detector TOML config (default: configs/tiny.toml, relative to the current directory)")
    synth.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a detector config value, e.g. --set train.epochs=40 (repeatable)")
    synth.add_argument("--bench-set", action="append", default=[], metavar="FIELD=VALUE",
                       help="override a benchmark setting, e.g. --bench-set generator_steps=3000 (repeatable; "
                            "fields of SynthBenchConfig)")
    synth.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bars (default: when stderr is a terminal); stage lines are always printed")
    synth.set_defaults(handler=_bench_synth)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except PPLError as exc:  # what the user asked for cannot be done as asked: one line (bugs keep tracebacks)
        if args.debug:
            raise
        print(f"ppl {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
