"""The main job: digits from a fresh clone to images and a report, in one resumable command.

Steps (each skipped when its output is already complete, so a rerun resumes):

1. train a class-conditional EDM (the `tiny` preset) on scikit-learn's 8x8 handwritten digits
   (train split), writing ``demo/train/`` (ckpt.pt resume point, snapshots, log, stats);
2. export the EMA network to ``demo/model.onnx`` (fp32) and ``demo/model-fp16.onnx``, each
   verified against the torch model;
3. sample a 10x10 class grid through the NumPy runtime with onnxruntime -> ``demo/grid.png``;
4. sample ``per_class`` images per class (deterministic Heun, 18 steps, NFE 35) and score them
   with an independent classifier (an RBF SVM trained on the real train split, checked on the
   test split): per-class accuracy, and the Fréchet distance between sample and test-set pixels
   next to the train-vs-test distance as a yardstick; write ``demo/report.md`` and ``report.json``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional

from edm_deploy.runtime.errors import InputError
from edm_deploy.runtime.fileio import atomic_write_bytes

GRID_UPSCALE = 4


def _done_kimg(ckpt_path: str) -> Optional[float]:
    """kimg reached by a resume point, or None if there is none."""
    if not os.path.exists(ckpt_path):
        return None
    from edm_deploy.training.checkpoint import load_checkpoint

    state = load_checkpoint(ckpt_path).get("training_state") or {}
    return float(state.get("cur_nimg", 0)) / 1000


def train_step(outdir: str, duration_kimg: Optional[float], seed: int, echo: Callable[[str], None]) -> str:
    from edm_deploy.training.training_loop import options_from_preset, training_loop

    run_dir = os.path.join(outdir, "train")
    ckpt = os.path.join(run_dir, "ckpt.pt")
    options = options_from_preset("tiny", outdir=run_dir, seed=seed, duration_kimg=duration_kimg)
    done = _done_kimg(ckpt)
    if done is not None and done >= options.duration_kimg:
        echo(f"[1/4] training: already done ({done:.0f} kimg in {ckpt})")
        return ckpt
    if done is not None:
        echo(f"[1/4] training: resuming {ckpt} at {done:.1f} of {options.duration_kimg:.0f} kimg")
        options.resume = ckpt
    else:
        echo(f"[1/4] training the tiny class-conditional EDM on the digits for {options.duration_kimg:.0f} kimg")
    training_loop(options, echo=None, progress=True)
    return ckpt


def export_step(ckpt: str, outdir: str, echo: Callable[[str], None]) -> dict[str, str]:
    from edm_deploy.export.onnx_export import export_onnx
    from edm_deploy.export.verify import verify_artifact
    from edm_deploy.loading import load
    from edm_deploy.runtime.backends.onnxrt import read_onnx_manifest
    from edm_deploy.runtime.fileio import sha256_file
    from edm_deploy.training.checkpoint import load_checkpoint, load_network

    ckpt_hash = sha256_file(ckpt)
    paths = {"fp32": os.path.join(outdir, "model.onnx"), "fp16": os.path.join(outdir, "model-fp16.onnx")}
    raw = None
    for precision, path in paths.items():
        if os.path.exists(path) and read_onnx_manifest(path).get("source", {}).get("sha256") == ckpt_hash:
            echo(f"[2/4] export {precision}: up to date ({path})")
            continue
        raw = raw or load_checkpoint(ckpt)
        net = load_network(raw)
        result = export_onnx(net, raw["network"], path, fp16=precision == "fp16", max_batch=1000, opt_batch=100,
                             source_path=ckpt)
        report = verify_artifact(path, net, load(path, device="cpu"), precision)
        echo(f"[2/4] export {precision}: {path} ({result.size_bytes / 1e6:.1f} MB, {result.seconds:.1f} s); "
             f"verified: max rel L2 {report.max_rel_l2:.1e} -> {'PASS' if report.passed else 'FAIL'}")
        if not report.passed:
            raise InputError(f"the exported {precision} model does not match the checkpoint:\n{report.table()}")
    return paths


def grid_step(model_path: str, outdir: str, echo: Callable[[str], None], columns: int = 10) -> str:
    from edm_deploy.loading import load
    from edm_deploy.runtime.generate import sample_batch
    from edm_deploy.runtime.writers import GridWriter

    den = load(model_path, device="cpu")
    path = os.path.join(outdir, "grid.png")
    grid = GridWriter(path, den.label_dim * columns, columns=columns, upscale=GRID_UPSCALE, pad=2)
    for cls in range(den.label_dim):
        seeds = [1_000_000 + cls * columns + k for k in range(columns)]
        images, _ = sample_batch(den, seeds, cls, {"num_steps": 18})
        grid.submit(images, seeds)
    grid.close()
    echo(f"[3/4] class grid (row k = digit k, {columns} seeds each) -> {path}")
    return path


def evaluate_step(paths: dict[str, str], per_class: int, echo: Callable[[str], None]) -> dict[str, Any]:
    from edm_deploy.loading import load
    from edm_deploy.runtime.sampling import nfe
    from edm_deploy.runtime.timing import TimedDenoiser
    from edm_deploy.training.dataset import load_digits_split
    from edm_deploy.training.digits_eval import frechet_pixels, sample_digits, score_samples, train_classifier

    echo(f"[4/4] scoring {per_class} samples per class with an independent classifier")
    classifier, clf_acc = train_classifier()
    tr_x, _, te_x, _ = load_digits_split()
    results: dict[str, Any] = {"classifier": "RBF SVM on the digits train split (pixels)",
                               "classifier_test_accuracy": clf_acc, "per_class_samples": per_class,
                               "nfe": nfe(18), "fd_train_test": frechet_pixels(tr_x, te_x)}
    for precision, path in paths.items():
        with load(path, device="cpu") as loaded:
            den = TimedDenoiser(loaded)
            start = time.perf_counter()
            samples, classes = sample_digits(den, per_class=per_class, seed=0, num_steps=18, batch=500)
            wall = time.perf_counter() - start
        results[precision] = {
            "model": path, "backend": den.describe(), **score_samples(samples, classes, classifier, te_x),
            "img_per_s": len(samples) / wall, "overhead_fraction": max(0.0, 1 - den.eval_seconds / wall),
        }
    return results


def format_report(r: dict[str, Any], train_seconds: Optional[float]) -> str:
    fp32, fp16 = r["fp32"], r["fp16"]
    lines = [
        "# edm-deploy demo report",
        "",
        "Class-conditional EDM (`tiny` preset) trained on scikit-learn's 8x8 digits"
        + (f" in {train_seconds / 60:.1f} min" if train_seconds else "") + "; samples from the exported ONNX",
        f"model through the NumPy runtime + onnxruntime (CPU), deterministic Heun, 18 steps (NFE {r['nfe']}).",
        "",
        f"Independent classifier: {r['classifier']}, test-split accuracy {r['classifier_test_accuracy']:.1%}.",
        "",
        "| | fp32 ONNX | fp16 ONNX |",
        "|---|---|---|",
        f"| classifier accuracy, mean over classes | {fp32['accuracy']:.1%} | {fp16['accuracy']:.1%} |",
        f"| Fréchet distance samples vs test (pixels) | {fp32['fd_samples_test']:.2f} | {fp16['fd_samples_test']:.2f} |",
        f"| yardstick: Fréchet distance train vs test | {r['fd_train_test']:.2f} | {r['fd_train_test']:.2f} |",
        f"| FD ratio (samples / yardstick) | {fp32['fd_samples_test'] / r['fd_train_test']:.2f} | {fp16['fd_samples_test'] / r['fd_train_test']:.2f} |",
        f"| images/s (CPU, {r['per_class_samples'] * 10} images) | {fp32['img_per_s']:.1f} | {fp16['img_per_s']:.1f} |",
        f"| sampler overhead (wall time outside the network) | {fp32['overhead_fraction']:.1%} | {fp16['overhead_fraction']:.1%} |",
        "",
        "Per-class accuracy (fp32): " + ", ".join(f"{c}: {a:.0%}" for c, a in enumerate(fp32["per_class"])),
        "",
        "Targets: accuracy >= 90 % and FD within 3x the train-vs-test FD: "
        + ("met" if fp32["accuracy"] >= 0.9 and fp32["fd_samples_test"] <= 3 * r["fd_train_test"] else "NOT met"),
    ]
    return "\n".join(lines) + "\n"


def run_demo(outdir: str = "demo", duration_kimg: Optional[float] = None, per_class: int = 100, seed: int = 0,
             echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the whole demo; returns the report data."""
    os.makedirs(outdir, exist_ok=True)
    start = time.perf_counter()
    ckpt = train_step(outdir, duration_kimg, seed, echo)
    train_seconds = _train_seconds(ckpt)
    paths = export_step(ckpt, outdir, echo)
    grid = grid_step(paths["fp32"], outdir, echo)
    results = evaluate_step(paths, per_class, echo)
    results.update({"grid": grid, "checkpoint": ckpt, "train_seconds": train_seconds,
                    "demo_seconds_this_run": time.perf_counter() - start})
    report = format_report(results, train_seconds)
    atomic_write_bytes(os.path.join(outdir, "report.md"), report.encode())
    atomic_write_bytes(os.path.join(outdir, "report.json"), json.dumps(results, indent=2).encode())
    echo("")
    echo(report)
    return results


def _train_seconds(ckpt: str) -> Optional[float]:
    from edm_deploy.training.checkpoint import load_checkpoint

    state = load_checkpoint(ckpt).get("training_state") or {}
    return float(state["total_time"]) if "total_time" in state else None
