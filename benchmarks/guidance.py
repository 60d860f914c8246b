"""Guidance on the digits: does guiding help this small model, and at what weight?

For each weight w in {1, 1.25, 1.5, 2, 3} (w = 1 is unguided) and three kinds of guidance:

* autoguidance: the model (the demo's `tiny` preset, 150 kimg) guided by an early snapshot of
  the same run (50 kimg), every evaluation;
* autoguidance inside a guidance interval (lo, hi] of noise levels (default 0.28 < sigma <= 1.6,
  the middle range EDM2's interval paper found, *unverified* for 8x8 pixel digits); outside it
  the guide is not evaluated;
* classifier-free: a model trained with `--cond-drop 0.1`, guided by its own zero-label branch;

the benchmark samples `per_class` images per digit (deterministic Heun, 18 steps) through the
onnxruntime exports and reports the pixel Fréchet distance against the test split, the
independent classifier's accuracy, and the guide's evaluations per image. No target is set on
the figures: the point is to report honestly whether guidance helps here. The checkpoints are
the demo's (or `--ckpt`, `--guide`, `--cfg-ckpt`), trained here when missing (~2.5 min each on
an idle 2-core CPU).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from typing import Any

from benchmarks.common import RESULTS_DIR, save, table
from edm_deploy.runtime.core.contract import DelegatingDenoiser

WEIGHTS = (1.0, 1.25, 1.5, 2.0, 3.0)


def trained(outdir: str, echo, cond_drop: float = 0.0) -> str:
    """A complete tiny-preset run in `outdir` (trained here when missing); returns its ckpt.pt."""
    from edm_deploy.training.checkpoint import load_checkpoint
    from edm_deploy.training.training_loop import options_from_preset, training_loop

    ckpt = os.path.join(outdir, "ckpt.pt")
    options = options_from_preset("tiny", outdir=outdir, cond_drop=cond_drop)
    if os.path.exists(ckpt):
        done = float((load_checkpoint(ckpt).get("training_state") or {}).get("cur_nimg", 0)) / 1000
        if done >= options.duration_kimg:
            return ckpt
        options.resume = ckpt
    echo(f"training {outdir} (tiny preset, cond_drop {cond_drop})")
    training_loop(options, echo=None, progress=False)
    return ckpt


def snapshot(run_dir: str, kimg: int = 50) -> str:
    path = os.path.join(run_dir, f"network-snapshot-{kimg:06d}.pt")
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing: the guide is the run's {kimg}-kimg snapshot (snapshot_kimg 50)")
    return path


def onnx_of(ckpt: str, workdir: str) -> str:
    from edm_deploy.export.pipeline import export_checkpoint

    out = os.path.join(workdir, os.path.basename(os.path.dirname(ckpt)) + "-" + os.path.basename(ckpt)[:-3] + ".onnx")
    return export_checkpoint(ckpt, out, max_batch=1000).path


class CountingGuide(DelegatingDenoiser):
    """Counts the guide's rows, so guide evaluations per image can be reported."""

    def __init__(self, den):
        super().__init__(den)
        self.rows = 0

    def __call__(self, x, sigma, class_labels=None):
        self.rows += int(x.shape[0])
        return self.den(x, sigma, class_labels)


def case(den, guide, w: float, interval, per_class: int, classifier, test_images) -> dict[str, Any]:
    from edm_deploy.runtime.sampling.generate import guided
    from edm_deploy.training.digits_eval import sample_digits, score_samples

    counter = None if guide is None else CountingGuide(guide)
    model = den if w == 1.0 else guided(den, counter, w, interval)
    if guide is None and w != 1.0:  # classifier-free: count the model's unconditional rows instead
        model.guide_calls = 0
    start = time.perf_counter()
    samples, classes = sample_digits(model, per_class=per_class, seed=0, num_steps=18, batch=500)
    wall = time.perf_counter() - start
    scores = score_samples(samples, classes, classifier, test_images)
    if counter is not None:
        guide_evals = counter.rows / len(samples)
    elif w != 1.0:
        guide_evals = model.guide_calls * 1.0 / math.ceil(len(samples) / 500)  # one 2B call per guided evaluation
    else:
        guide_evals = 0.0
    return {"w": w, "accuracy": scores["accuracy"], "fd": scores["fd_samples_test"], "guide_evals_per_image": guide_evals,
            "img_per_s": len(samples) / wall}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="the model [default: demo/train/ckpt.pt, trained if missing]")
    parser.add_argument("--guide", default=None, help="the autoguide [default: the model run's 50-kimg snapshot]")
    parser.add_argument("--cfg-ckpt", default=None, help="a model trained with --cond-drop 0.1 [default: trained]")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--interval", default="0.28,1.6")
    parser.add_argument("--no-write", action="store_true", help="do not redraw docs/guidance.png")
    args = parser.parse_args(argv)

    from edm_deploy.loading import load
    from edm_deploy.training.dataset import load_digits_split
    from edm_deploy.training.digits_eval import frechet_pixels, train_classifier

    echo = print
    ckpt = args.ckpt or trained(os.path.join("demo", "train"), echo)
    guide_ckpt = args.guide or snapshot(os.path.dirname(ckpt))
    cfg_ckpt = args.cfg_ckpt or trained(os.path.join(RESULTS_DIR, "guidance-cfg"), echo, cond_drop=0.1)
    lo, hi = (float(v) for v in args.interval.split(","))
    classifier, clf_acc = train_classifier()
    tr_x, _, te_x, _ = load_digits_split()
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="edm-guidance-") as workdir:
        paths = {name: onnx_of(p, workdir) for name, p in (("model", ckpt), ("guide", guide_ckpt), ("cfg", cfg_ckpt))}
        with load(paths["model"], device="cpu") as den, load(paths["guide"], device="cpu") as guide, \
                load(paths["cfg"], device="cpu") as cfg:
            for w in WEIGHTS:
                for kind, model, g, interval in (("autoguidance", den, guide, None),
                                                 (f"autoguidance, interval ({lo:g}, {hi:g}]", den, guide, (lo, hi)),
                                                 ("classifier-free (cond-drop 0.1 model)", cfg, None, None)):
                    echo(f"{kind}: w = {w:g}")
                    rows.setdefault(kind, []).append(case(model, g, w, interval, args.per_class, classifier, te_x))
    yardstick = frechet_pixels(tr_x, te_x)
    header = ["guidance", "w", "accuracy", "FD vs test", "guide evals/img", "img/s"]
    body = [[kind, r["w"], f"{r['accuracy']:.1%}", round(r["fd"], 4), round(r["guide_evals_per_image"], 1),
             round(r["img_per_s"], 1)] for kind, rs in rows.items() for r in rs]
    print(table(body, header))
    print(f"yardstick: FD train vs test {yardstick:.4f}; classifier test accuracy {clf_acc:.1%}")
    payload = {"rows": rows, "fd_train_test": yardstick, "classifier_test_accuracy": clf_acc, "per_class": args.per_class,
               "interval": [lo, hi], "model": ckpt, "guide": guide_ckpt, "cfg_model": cfg_ckpt}
    print("saved", save("guidance", payload))
    if not args.no_write:
        plot(rows, yardstick, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "guidance.png"))
    return payload


def plot(rows: dict, yardstick: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, rs in rows.items():
        ax_fd.plot([r["w"] for r in rs], [r["fd"] for r in rs], marker="o", label=kind)
        ax_acc.plot([r["w"] for r in rs], [100 * r["accuracy"] for r in rs], marker="o", label=kind)
    ax_fd.axhline(yardstick, color="gray", linestyle="--", label="train vs test")
    ax_fd.set(xlabel="guidance weight w (1 = unguided)", ylabel="pixel Fréchet distance vs test", title="FD (lower is better)")
    ax_acc.set(xlabel="guidance weight w (1 = unguided)", ylabel="classifier accuracy (%)", title="accuracy")
    ax_fd.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("plot", path)


if __name__ == "__main__":
    main()
