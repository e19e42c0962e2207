"""``ppl bench synth``'s aggregation and report: mean ± std over seeds, ``results.json``'s summary and
``report.md``'s tables."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppl_model.evaluation.metrics import METRICS
from ppl_model.synthbench.config import SynthBenchConfig, fmt

# ------------------------------------------------------------------------------------------ 7. aggregation


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1; null below two values) over the finite values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    return {"mean": float(np.mean(finite)) if n else None,
            "std": float(np.std(finite, ddof=1)) if n > 1 else None, "n": n}


TELEMETRY_KEYS = ("patch_cosine_start", "patch_cosine_end", "patch_cosine_max", "cls_std_start", "cls_std_end",
                  "bce_end", "pcl_end", "patch_end", "collapse_warnings")


def summarise(runs: dict[str, dict[str, Any]], cfg: SynthBenchConfig) -> dict[str, Any]:
    """Mean ± std over seeds, per ``<regime>/<arm>``: per family, mean over unseen, local edits, robustness,
    CDE summaries, training telemetry."""
    from ppl_model.analysis.cde import SUMMARY_KEYS

    out: dict[str, Any] = {}
    for method in cfg.methods:
        records = [seed_runs[method] for seed_runs in runs.values() if method in seed_runs]
        if not records:
            continue
        block: dict[str, Any] = {"seeds": len(records)}
        block["per_family"] = {name: {metric: _stats([r["subsets"][name][metric] for r in records])
                                      for metric in METRICS}
                               for name in cfg.all_families if all(name in r["subsets"] for r in records)}
        block["mean_unseen"] = {metric: _stats([r["mean_unseen"][metric] for r in records]) for metric in METRICS}
        block["mean_edits"] = {metric: _stats([r["mean_edits"].get(metric) for r in records]) for metric in METRICS}
        robust = [r["robustness"] for r in records if r["robustness"]]
        block["robustness_seeds"] = len(robust)
        # The clean reference over the same seeds as the perturbed rows.
        block["robustness_clean"] = {metric: _stats([r["mean_unseen"][metric] for r in records if r["robustness"]])
                                     for metric in METRICS}
        if robust:
            block["robustness"] = {name: {metric: _stats([r[name]["mean_unseen"][metric] for r in robust])
                                          for metric in METRICS} for name in robust[0]}
        block["cde"] = {key: _stats([r["cde"][key]["mean"] for r in records]) for key in SUMMARY_KEYS}
        block["telemetry"] = {key: _stats([r["telemetry"][key] for r in records]) for key in TELEMETRY_KEYS}
        block["threshold"] = _stats([r["threshold"] for r in records])
        block["wall_seconds"] = {stage: _stats([r["wall_seconds"][stage] for r in records])
                                 for stage in ("train", "eval", "analyze")}
        out[method] = block
    return out


def machine_info() -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _yes_no(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "no")


def _slash(counts: dict[str, int]) -> str:
    return " / ".join(str(counts[split]) for split in ("train", "val", "test"))


def _pm(stats: dict[str, Any] | None, digits: int = 3) -> str:
    if not stats or stats.get("mean") is None:
        return "n/a"
    text = fmt(stats["mean"], digits)
    return text if stats.get("std") is None else f"{text} ± {fmt(stats['std'], digits)}"


CDE_READING = {
    "normalized_entropy_fake": "higher = evidence spread over more patches",
    "top1_mass_fake": "lower = less reliance on one patch",
    "top5pct_mass_fake": "lower = less reliance on the top 5 % of patches",
    "gini_fake": "lower = more even",
    "flip_rate": "lower = fewer fakes (predicted fake) flip to real when their most influential patch is masked",
    "random_patch_accuracy_drop": "accuracy lost when one random patch is masked (real and fake)",
    "normalized_entropy_real": "the same entropy on real images (evidence for 'fake' on reals, for reference)",
}


def _regime_tables(results: dict[str, Any], regime: str) -> list[str]:
    bench, agg = results["benchmark"], results["aggregate"]
    arms = [arm for arm in bench["arms"] if f"{regime}/{arm}" in agg]
    if not arms:
        return []
    blocks = {arm: agg[f"{regime}/{arm}"] for arm in arms}
    train_family = bench["train_family"]
    families = results["families"]
    edits = [name for name, fam in families.items() if fam["kind"].startswith("local edit")]
    lines = [f"## Regime `{regime}`", "",
             f"### Headline: mean over the {len(results['unseen'])} unseen families", "",
             "| arm | AUROC | AP | acc @ calibrated threshold | real acc | fake acc | local edits AUROC | "
             f"{train_family} AUROC |", "|---|---|---|---|---|---|---|---|"]
    for arm, block in blocks.items():
        unseen = block["mean_unseen"]
        lines.append(f"| {arm} | **{_pm(unseen['auroc'])}** | {_pm(unseen['ap'])} | {_pm(unseen['acc'])} | "
                     f"{_pm(unseen['acc_real'])} | {_pm(unseen['acc_fake'])} | "
                     f"{_pm(block['mean_edits'].get('auroc'))} | "
                     f"{_pm(block['per_family'].get(train_family, {}).get('auroc'))} |")
    lines += ["", "### AUROC per family", "", f"| family | kind | {' | '.join(arms)} |",
              "|---|---|" + "---|" * len(arms)]
    for name, fam in families.items():
        label = f"{name} (train)" if name == train_family else name
        cells = " | ".join(_pm(blocks[a]["per_family"].get(name, {}).get("auroc")) for a in arms)
        lines.append(f"| {label} | {fam['kind']} | {cells} |")
    lines += ["", "### AP per family", "", f"| family | {' | '.join(arms)} |", "|---|" + "---|" * len(arms)]
    for name in families:
        label = f"{name} (train)" if name == train_family else name
        cells = " | ".join(_pm(blocks[a]["per_family"].get(name, {}).get("ap")) for a in arms)
        lines.append(f"| {label} | {cells} |")
    if edits:
        lines += ["", f"Local-edit families: {', '.join(edits)}."]
    lines += ["", "### Few-Patch Bias on the analysis images (CDE)", "",
              f"| summary | {' | '.join(arms)} | reading |", "|---|" + "---|" * len(arms) + "---|"]
    for key, reading in CDE_READING.items():
        lines.append(f"| {key} | {' | '.join(_pm(blocks[a]['cde'].get(key)) for a in arms)} | {reading} |")
    lines += ["", "### Training telemetry (collapse indicators)", "",
              f"| quantity | {' | '.join(arms)} |", "|---|" + "---|" * len(arms)]
    for key in TELEMETRY_KEYS:
        lines.append(f"| {key} | {' | '.join(_pm(blocks[a]['telemetry'].get(key)) for a in arms)} |")
    lines.append(f"| threshold (fake probability) | {' | '.join(_pm(blocks[a]['threshold']) for a in arms)} |")
    if all("robustness" in block for block in blocks.values()):
        seeds_note = f"{blocks[arms[0]]['robustness_seeds']} seed(s)"
        lines += ["", f"### Robustness: mean AUROC over unseen families ({seeds_note})", "",
                  f"| perturbation | {' | '.join(arms)} |", "|---|" + "---|" * len(arms)]
        lines.append(f"| none | {' | '.join(_pm(blocks[a]['robustness_clean']['auroc']) for a in arms)} |")
        for name in blocks[arms[0]]["robustness"]:
            lines.append(f"| {name} | {' | '.join(_pm(blocks[a]['robustness'][name]['auroc']) for a in arms)} |")
    lines += ["", "### Wall time per detector (s): train / eval / analyze", "", "| arm | seconds |", "|---|---|"]
    for arm, block in blocks.items():
        w = block["wall_seconds"]
        lines.append(f"| {arm} | {_pm(w['train'], 0)} / {_pm(w['eval'], 0)} / {_pm(w['analyze'], 0)} |")
    return [*lines, ""]


def write_report(results: dict[str, Any], path: str | Path) -> None:
    """The markdown report: set-up, then per regime the ablation, per-family, CDE, telemetry, robustness."""
    bench = results["benchmark"]
    seeds = results.get("seeds", [])
    pre = results.get("pretrained")
    lines = [
        "# synthbench: cross-generator detection on self-trained generators, ablation by ingredient",
        "",
        f"Preset `{bench['preset']}`; every detector trains on **{bench['train_family']}** only and is tested on "
        f"every family; {len(seeds)} seed(s) {seeds} per arm; figures are mean ± sample std over seeds. "
        f"Accuracy is at each detector's own threshold, calibrated to a {bench['target_fpr']:.0%} false-positive "
        "rate on the validation real crops; AUROC and AP need no threshold.",
        "",
        f"Real photos split by source photo (train / val / test): {_slash(results['splits']['photos'])} photos, "
        f"{_slash(results['splits']['crops'])} crops of {bench['crop_size']} px (never resized). Generators: "
        f"{bench['generator_steps']} steps on train-split crops. Detector: {results['detector']['summary']}. "
        f"CDE fill: {bench['cde_fill']}.",
        "",
    ]
    if pre:
        lines += [f"Pretrained stand-in (regime `pretrained-lora`): {bench['pretrain_steps']} steps of masked-patch "
                  f"reconstruction on train-split real crops (loss on the {bench['pretrain_target']} patches), "
                  f"MSE {fmt(pre['first_loss'])} → "
                  f"{fmt(pre['final_loss'])}, {fmt(pre['train_seconds'], 0)} s; then frozen, LoRA "
                  f"({', '.join(bench['lora_overrides'])}).", ""]
    for regime in bench["regimes"]:
        lines += _regime_tables(results, regime)
    families = results["families"]
    lines += ["## Generators", "", "| family | kind | made by | val L1 | train s | cached |",
              "|---|---|---|---|---|---|"]
    for name, fam in families.items():
        lines.append(f"| {name} | {fam['kind']} | {fam['made_by']} | {fmt(fam.get('val_l1'), 4)} | "
                     f"{fmt(fam.get('train_seconds'), 0)} | {_yes_no(fam.get('cached'))} |")
    machine = results["machine"]
    lines += ["", "## Wall times", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in results["wall_seconds"].items()]
    lines += ["", f"Machine: {machine['platform']}, {machine['cpu_count']} CPU(s), torch {machine['torch']}"
              + (f", GPU {machine['gpu']}" if machine.get("gpu") else ", no GPU") + ".", ""]
    Path(path).write_text("\n".join(lines))


