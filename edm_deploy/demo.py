"""The main job: from a fresh clone to images and a report, in one resumable command.

Two datasets (`DemoProfile`): the quick story on scikit-learn's 8x8 digits (minutes), and the
same story on real images, Fashion-MNIST at 32x32 (about two hours on a 2-core CPU). Steps (each
skipped when its output is already complete, so a rerun resumes):

1. train a class-conditional EDM (the profile's preset: `tiny` on the digits' train split,
   `fashion-mnist` on Fashion-MNIST's), writing ``demo/train/`` (ckpt.pt resume point, snapshots,
   log, stats);
2. export the EMA network to ``demo/model.onnx`` (fp32), ``demo/model-fp16.onnx`` and
   ``demo/model-int8.onnx``, each verified against the torch model;
3. sample a 10x10 class grid through the NumPy runtime with onnxruntime -> ``demo/grid.png``;
4. consistency-tune the model with ECT for a few minutes (``demo/consistency/``) and export it,
   verified, to ``demo/model-consistency.onnx``;
5. sample ``per_class`` images per class (deterministic Heun, 18 steps, NFE 35, and the fast
   rows) and score them with an independent classifier trained on the real training split and
   checked on the test split (the digits: an RBF SVM on pixels, with the Fréchet distance of
   pixels; Fashion-MNIST: a small CNN, with the Fréchet distance of its features): per-class
   accuracy, and the distance between samples and the test split next to the train-vs-test
   distance as a yardstick; write ``demo/report.md`` and ``report.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from edm_deploy.runtime.core.fileio import atomic_write_bytes

GRID_UPSCALE = 4
GRID_NAME, REPORT_NAME = "grid.png", "report.md"  # in the demo's output folder


@dataclass(frozen=True)
class DemoProfile:
    """What differs between the demo's datasets: the data, its presets, its judge and the fast rows shown."""

    data: str  # the --data value and the training source
    preset: str  # the training preset, and the consistency preset of the same name
    description: str  # how the report names the model
    fast: dict  # the fast solver row: the best fast setting of the profile's benchmark
    searched: dict  # the solver and NFE of the searched-schedule row
    consistency_sigmas: dict  # NFE -> the consistency solver's time points
    autoguidance: tuple  # (snapshot kimg of the guide, weight, (lo, hi] interval or None)
    judge: Callable[[str, Callable[[str], None]], Any]  # (outdir, echo) -> a judge (training.*_eval)


def _digits_judge(outdir: str, echo: Callable[[str], None]):
    from edm_deploy.training.digits_eval import DigitsJudge

    return DigitsJudge()


def _fashion_judge(outdir: str, echo: Callable[[str], None]):
    from edm_deploy.training.fashion_eval import FashionDemoJudge

    return FashionDemoJudge(os.path.join(outdir, "classifier"), echo=lambda line: echo(f"[5/5] {line}"))


PROFILES = {p.data: p for p in (
    # The fast rows: the best fast solver at NFE <= 6 on this model (benchmarks/solvers.py), a GITS
    # schedule for NFE 4, the consistency mid point that was best on held-out seeds
    # (benchmarks/consistency.py), autoguidance by the run's own early snapshot (benchmarks/guidance.py:
    # FD 0.1263 vs 0.1265).
    DemoProfile("digits", "tiny", "Class-conditional EDM (`tiny` preset) trained on scikit-learn's 8x8 digits",
                fast={"solver": "ipndm", "nfe": 5}, searched={"solver": "ipndm", "nfe": 4},
                consistency_sigmas={1: [80.0], 2: [80.0, 2.0]}, autoguidance=(50, 1.25, (0.28, 1.6)),
                judge=_digits_judge),
    # Fashion-MNIST (benchmarks/RESULTS.md, real images): UniPC at NFE 5 is the fewest-NFE solver
    # within 10 % of Heun-35's FID (also on its searched schedule); the 50-kimg snapshot at w 1.2 is
    # the autoguide the benchmark chose; 1.5 is the middle point chosen on held-out seeds for a model
    # tuned with the fashion-mnist consistency preset (benchmarks/consistency_fashion.py).
    DemoProfile("fashion-mnist", "fashion-mnist",
                "Class-conditional EDM (`fashion-mnist` preset) trained on Fashion-MNIST (32x32, padded)",
                fast={"solver": "unipc", "nfe": 5}, searched={"solver": "unipc", "nfe": 5},
                consistency_sigmas={1: [80.0], 2: [80.0, 1.5]}, autoguidance=(50, 1.2, None),
                judge=_fashion_judge),
)}
DIGITS = PROFILES["digits"]


def default_outdir(data: str) -> str:
    """Where a demo of `data` goes unless told: demo/ for the digits, demo-<data>/ otherwise."""
    return "demo" if data == DIGITS.data else f"demo-{data.split('-')[0]}"


def _done_kimg(ckpt_path: str) -> Optional[float]:
    """kimg reached by a resume point, or None if there is none."""
    if not os.path.exists(ckpt_path):
        return None
    from edm_deploy.training.checkpoint import load_checkpoint

    state = load_checkpoint(ckpt_path).get("training_state") or {}
    return float(state.get("cur_nimg", 0)) / 1000


def train_step(outdir: str, duration_kimg: Optional[float], seed: int, echo: Callable[[str], None],
               profile: DemoProfile = DIGITS) -> str:
    from edm_deploy.training.training_loop import options_from_preset, training_loop

    run_dir = os.path.join(outdir, "train")
    ckpt = os.path.join(run_dir, "ckpt.pt")
    options = options_from_preset(profile.preset, outdir=run_dir, seed=seed, duration_kimg=duration_kimg)
    done = _done_kimg(ckpt)
    if done is not None and done >= options.duration_kimg:
        echo(f"[1/5] training: already done ({done:.0f} kimg in {ckpt})")
        return ckpt
    if done is not None:
        echo(f"[1/5] training: resuming {ckpt} at {done:.1f} of {options.duration_kimg:.0f} kimg")
        options.resume = ckpt
    else:
        echo(f"[1/5] training the {profile.preset} class-conditional EDM on {profile.data} for "
             f"{options.duration_kimg:.0f} kimg")
    training_loop(options, echo=None, progress=True)
    return ckpt


def consistency_step(ckpt: str, outdir: str, duration_kimg: Optional[float], echo: Callable[[str], None],
                     profile: DemoProfile = DIGITS) -> str:
    """Consistency-tune the trained model (ECT, a few minutes) and export it, verified: demo/model-consistency.onnx."""
    from edm_deploy.export.pipeline import export_checkpoint
    from edm_deploy.runtime.backends.onnxrt import read_onnx_manifest
    from edm_deploy.runtime.core.fileio import sha256_file

    overrides = {} if duration_kimg is None else {"duration_kimg": duration_kimg}
    tuned = tune_step(ckpt, os.path.join(outdir, "consistency"), lambda line: echo(f"[4/5] {line}"),
                      preset=profile.preset, **overrides)
    path = os.path.join(outdir, CONSISTENCY_MODEL)
    if os.path.exists(path) and read_onnx_manifest(path).get("source", {}).get("sha256") == sha256_file(tuned):
        echo(f"[4/5] export consistency-tuned: up to date ({path})")
        return path
    outcome = export_checkpoint(tuned, path, max_batch=1000, opt_batch=100)
    echo(f"[4/5] export consistency-tuned: {path} ({outcome.size_bytes / 1e6:.1f} MB); verified: max derivative "
         f"error {outcome.report.max_deriv:.1e} -> PASS")
    return path


def tune_step(teacher: str, run_dir: str, echo: Callable[[str], None], preset: str = "tiny", **overrides: Any) -> str:
    """Consistency-tune (ECT, `--consistency --preset PRESET`) the demo's model into `run_dir`; resumes a stopped run.

    `overrides` are TrainingOptions fields over the consistency preset. A finished run of the
    same teacher is kept as it is.
    """
    from edm_deploy.runtime.core.fileio import sha256_file
    from edm_deploy.runtime.core.manifest import CONSISTENCY_KEY
    from edm_deploy.training.checkpoint import load_checkpoint
    from edm_deploy.training.options import consistency_options, resume_options
    from edm_deploy.training.training_loop import training_loop

    ckpt = os.path.join(run_dir, "ckpt.pt")
    options = consistency_options(teacher, preset, outdir=run_dir, **overrides)
    if os.path.exists(ckpt):
        stored = load_checkpoint(ckpt)
        state = stored["training_state"]
        record = stored["network"].get(CONSISTENCY_KEY) or {}
        if record.get("from_sha256") != sha256_file(teacher):  # the teacher was retrained since: start over
            echo(f"consistency tuning: {ckpt} tuned another teacher than {teacher}; tuning again")
            shutil.rmtree(run_dir)
            return tune_step(teacher, run_dir, echo, preset, **overrides)
        if state["cur_nimg"] >= options.duration_kimg * 1000:
            echo(f"consistency tuning: already done ({state['cur_nimg'] / 1000:.0f} kimg in {ckpt})")
            return ckpt
        options = resume_options(ckpt, outdir=run_dir, duration_kimg=options.duration_kimg)
        echo(f"consistency tuning: resuming {ckpt} at {state['cur_nimg'] / 1000:.1f} of {options.duration_kimg:.0f} kimg")
    else:
        echo(f"consistency tuning (ECT) of {teacher} for {options.duration_kimg:.0f} kimg into {run_dir}")
    training_loop(options, echo=None, progress=True)
    return ckpt


PRECISIONS = ("fp32", "fp16", "int8")
CONSISTENCY_MODEL = "model-consistency.onnx"


def schedule_file(profile: DemoProfile) -> str:
    """The searched schedule, kept in the demo's folder so a rerun only re-scores."""
    return f"schedule-{profile.searched['solver']}-nfe{profile.searched['nfe']}.json"


def export_step(ckpt: str, outdir: str, echo: Callable[[str], None]) -> dict[str, str]:
    """fp32, fp16 and int8 ONNX files, each verified (the export pipeline: stage, verify, move)."""
    from edm_deploy.export.pipeline import export_checkpoint
    from edm_deploy.runtime.backends.onnxrt import read_onnx_manifest
    from edm_deploy.runtime.core.fileio import sha256_file

    ckpt_hash = sha256_file(ckpt)
    paths = {p: os.path.join(outdir, "model.onnx" if p == "fp32" else f"model-{p}.onnx") for p in PRECISIONS}
    for precision, path in paths.items():
        if os.path.exists(path) and read_onnx_manifest(path).get("source", {}).get("sha256") == ckpt_hash:
            echo(f"[2/5] export {precision}: up to date ({path})")
            continue
        outcome = export_checkpoint(ckpt, path, precision=precision, max_batch=1000, opt_batch=100)
        echo(f"[2/5] export {precision}: {path} ({outcome.size_bytes / 1e6:.1f} MB, {outcome.seconds:.1f} s); "
             f"verified: max derivative error {outcome.report.max_deriv:.1e} -> PASS")
    return paths


def grid_step(model_path: str, outdir: str, echo: Callable[[str], None], columns: int = 10,
              profile: DemoProfile = DIGITS) -> str:
    from edm_deploy.loading import load
    from edm_deploy.runtime.output.writers import GridWriter
    from edm_deploy.runtime.sampling.generate import sample_batch

    path = os.path.join(outdir, GRID_NAME)
    with load(model_path, device="cpu") as den:
        grid = GridWriter(path, den.label_dim * columns, columns=columns, scale=GRID_UPSCALE, pad=2)
        for cls in range(den.label_dim):
            seeds = [1_000_000 + cls * columns + k for k in range(columns)]
            images, _ = sample_batch(den, seeds, cls, {"num_steps": 18})
            grid.submit(images, seeds)
    grid.close()
    echo(f"[3/5] class grid (row k = class k of {profile.data}, {columns} seeds each) -> {path}")
    return path


def _scored(den, per_class: int, judge, **sampler: Any) -> dict[str, Any]:
    from edm_deploy.runtime.core.timing import TimedDenoiser
    from edm_deploy.training.digits_eval import sample_classes

    timed = TimedDenoiser(den)
    start = time.perf_counter()
    samples, classes = sample_classes(timed, per_class=per_class, seed=0, batch=500, **sampler)
    wall = time.perf_counter() - start
    return {"backend": timed.describe(), **judge.score(samples, classes),
            "img_per_s": len(samples) / wall, "overhead_fraction": max(0.0, 1 - timed.eval_seconds / wall)}


def evaluate_step(paths: dict[str, str], per_class: int, echo: Callable[[str], None],
                  guide_ckpt: Optional[str] = None, consistency_model: Optional[str] = None,
                  schedule_path: Optional[str] = None, profile: DemoProfile = DIGITS,
                  outdir: str = "demo") -> dict[str, Any]:
    from edm_deploy.loading import load
    from edm_deploy.runtime.sampling.guidance import GuidedDenoiser
    from edm_deploy.runtime.sampling.reference import nfe

    echo(f"[5/5] scoring {per_class} samples per class with an independent classifier")
    judge = profile.judge(outdir, echo)
    results: dict[str, Any] = {"classifier": judge.description, "classifier_test_accuracy": judge.test_accuracy,
                               "distance": judge.distance, "per_class_samples": per_class, "nfe": nfe(18),
                               "fd_train_test": judge.yardstick, "data": profile.data}
    for precision, path in paths.items():
        with load(path, device="cpu") as den:
            judge.check(den)
            results[precision] = {"model": path, **_scored(den, per_class, judge, num_steps=18)}
    with load(paths["fp32"], device="cpu") as den:
        results["fast"] = {**profile.fast, **_scored(den, per_class, judge, num_steps=None, **profile.fast)}
        sigmas, search_seconds = _searched_schedule(den, paths["fp32"], schedule_path, profile.searched)
        results["searched"] = {**profile.searched, "sigmas": sigmas, "search_seconds": search_seconds,
                               **_scored(den, per_class, judge, num_steps=None, solver=profile.searched["solver"],
                                         sigmas=sigmas)}
        if guide_ckpt is not None:
            _, weight, interval = profile.autoguidance
            with load(guide_ckpt, device="cpu") as guide:
                guided = GuidedDenoiser(den, guide, weight, interval or (0.0, float("inf")))
                results["autoguidance"] = {"guide": guide_ckpt, "guidance": weight,
                                           "interval": None if interval is None else list(interval),
                                           **_scored(guided, per_class, judge, num_steps=18)}
    if consistency_model is not None:
        with load(consistency_model, device="cpu") as den:
            for count, sigmas in profile.consistency_sigmas.items():
                results[f"consistency_nfe{count}"] = {"sigmas": sigmas, **_scored(
                    den, per_class, judge, num_steps=None, solver="consistency", sigmas=sigmas)}
    return results


def _searched_schedule(den: Any, model_path: str, schedule_path: Optional[str],
                       searched: dict) -> tuple[list[float], float]:
    """The GITS-style schedule for `searched` (solver, nfe) on this model: searched once, kept in the demo's folder."""
    from edm_deploy.runtime.core.fileio import sha256_file
    from edm_deploy.runtime.sampling.schedule_file import read_schedule, write_schedule
    from edm_deploy.runtime.sampling.schedule_search import search_schedule

    model_sha256 = sha256_file(model_path)
    if schedule_path and os.path.exists(schedule_path):
        sigmas, meta = read_schedule(schedule_path)
        if meta.get("model_sha256") == model_sha256 and meta.get("solver") == searched["solver"] \
                and meta.get("nfe") == searched["nfe"]:
            return [float(v) for v in sigmas], float(sum((meta.get("search") or {}).get("seconds", {}).values()))
    start = time.perf_counter()
    found = search_schedule(den, **searched)
    seconds = time.perf_counter() - start
    if schedule_path:
        write_schedule(schedule_path, found.sigmas, model_sha256=model_sha256, **found.metadata())
    return [float(v) for v in found.sigmas], seconds


def format_report(r: dict[str, Any], train_seconds: Optional[float], profile: DemoProfile = DIGITS) -> str:
    cols = [p for p in PRECISIONS if p in r]
    yard = r["fd_train_test"]

    def row(label: str, cell) -> str:
        return f"| {label} | " + " | ".join(cell(r[p]) for p in cols) + " |"

    lines = [
        "# edm-deploy demo report",
        "",
        profile.description
        + (f" in {train_seconds / 60:.1f} min" if train_seconds else "") + "; samples from the exported ONNX",
        f"models through the NumPy runtime + onnxruntime (CPU), deterministic Heun, 18 steps (NFE {r['nfe']}).",
        "",
        f"Independent classifier: {r['classifier']}, test-split accuracy {r['classifier_test_accuracy']:.1%}.",
        "",
        "| | " + " | ".join(f"{p} ONNX" for p in cols) + " |",
        "|---|" + "---|" * len(cols),
        row("classifier accuracy, mean over classes", lambda c: f"{c['accuracy']:.1%}"),
        row(r["distance"], lambda c: f"{c['fd_samples_test']:.3f}"),
        row("yardstick: Fréchet distance train vs test", lambda c: f"{yard:.3f}"),
        row("FD ratio (samples / yardstick)", lambda c: f"{c['fd_samples_test'] / yard:.2f}"),
        row(f"images/s (CPU, {r['per_class_samples'] * 10} images)", lambda c: f"{c['img_per_s']:.1f}"),
        row("sampler overhead (wall time outside the network)", lambda c: f"{c['overhead_fraction']:.1%}"),
        "",
        "Per-class accuracy (fp32): " + ", ".join(f"{c}: {a:.0%}" for c, a in enumerate(r["fp32"]["per_class"])),
    ]
    extra = []
    fast = r.get("fast")
    if fast:
        extra.append(f"| {fast['solver']} at NFE {fast['nfe']} (fp32 ONNX) | {fast['accuracy']:.1%} | "
                     f"{fast['fd_samples_test']:.3f} | {fast['img_per_s']:.1f} |")
    searched = r.get("searched")
    if searched:
        extra.append(f"| {searched['solver']} at NFE {searched['nfe']} on a searched schedule "
                     f"({searched['search_seconds']:.0f} s search) | {searched['accuracy']:.1%} | "
                     f"{searched['fd_samples_test']:.3f} | {searched['img_per_s']:.1f} |")
    guided = r.get("autoguidance")
    if guided:
        where = "" if guided["interval"] is None else " for {:g} < sigma <= {:g}".format(*guided["interval"])
        extra.append(f"| Heun NFE {r['nfe']}, autoguided by the {profile.autoguidance[0]}-kimg snapshot, "
                     f"w = {guided['guidance']:g}{where} | "
                     f"{guided['accuracy']:.1%} | {guided['fd_samples_test']:.3f} | {guided['img_per_s']:.1f} |")
    for nfe, sigmas in profile.consistency_sigmas.items():
        c = r.get(f"consistency_nfe{nfe}")
        if c:
            extra.append(f"| consistency-tuned (ECT) at NFE {nfe}, sigmas {', '.join(f'{v:g}' for v in sigmas)} | "
                         f"{c['accuracy']:.1%} | {c['fd_samples_test']:.3f} | {c['img_per_s']:.1f} |")
    if extra:
        base = r["fp32"]
        lines += ["", "Faster or better per evaluation (same seeds):", "",
                  "| sampling | accuracy | FD vs test | images/s |", "|---|---|---|---|",
                  f"| Heun NFE {r['nfe']} (fp32 ONNX) | {base['accuracy']:.1%} | {base['fd_samples_test']:.3f} | {base['img_per_s']:.1f} |",
                  *extra]
    lines += ["", "Targets: accuracy >= 90 % and FD within 3x the train-vs-test FD: "
              + ("met" if r["fp32"]["accuracy"] >= 0.9 and r["fp32"]["fd_samples_test"] <= 3 * yard else "NOT met")]
    return "\n".join(lines) + "\n"


def run_demo(outdir: str = "demo", duration_kimg: Optional[float] = None, per_class: int = 100, seed: int = 0,
             echo: Callable[[str], None] = print, tune_kimg: Optional[float] = None,
             data: str = "digits") -> dict[str, Any]:
    """Run (or resume) the whole demo on `data` (a `PROFILES` key); returns the report data.
    `tune_kimg`: the consistency tuning's length."""
    profile = PROFILES[data]
    os.makedirs(outdir, exist_ok=True)
    start = time.perf_counter()
    ckpt = train_step(outdir, duration_kimg, seed, echo, profile)
    train_seconds = _train_seconds(ckpt)
    paths = export_step(ckpt, outdir, echo)
    grid = grid_step(paths["fp32"], outdir, echo, profile=profile)
    guide = os.path.join(os.path.dirname(ckpt), f"network-snapshot-{profile.autoguidance[0]:06d}.pt")
    consistency_model = consistency_step(ckpt, outdir, tune_kimg, echo, profile)
    results = evaluate_step(paths, per_class, echo, guide_ckpt=guide if os.path.exists(guide) else None,
                            consistency_model=consistency_model,
                            schedule_path=os.path.join(outdir, schedule_file(profile)), profile=profile,
                            outdir=outdir)
    results.update({"grid": grid, "checkpoint": ckpt, "train_seconds": train_seconds,
                    "demo_seconds_this_run": time.perf_counter() - start})
    report = format_report(results, train_seconds, profile)
    atomic_write_bytes(os.path.join(outdir, REPORT_NAME), report.encode())
    atomic_write_bytes(os.path.join(outdir, "report.json"), json.dumps(results, indent=2).encode())
    echo("")
    echo(report)
    return results


def _train_seconds(ckpt: str) -> Optional[float]:
    from edm_deploy.training.checkpoint import load_checkpoint

    state = load_checkpoint(ckpt).get("training_state") or {}
    return float(state["total_time"]) if "total_time" in state else None
