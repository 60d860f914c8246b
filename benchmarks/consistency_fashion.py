"""Consistency tuning (ECT) of the Fashion-MNIST preset: which settings reach two-step quality.

Why: on the digits, ECT looked weak (NFE 2 at 1.30x the teacher's Heun-35 pixel FD) and no ECT
setting was ever varied. Here every row tunes the same teacher (the `fashion-mnist` preset of
benchmarks/fashion.py) for the same number of images with one setting changed from the base,
and is scored like the teacher: the independent classifier's accuracy and the Fréchet distance
of its features against the training split (training/fashion_eval.py), at NFE 1, 2 and 3, each
divided by the teacher's Heun-35 on the same seeds. The time points of NFE 2 and 3 are picked per
row on a grid, by the same distance on held-out seeds (500, disjoint from the scored ones);
ECT's CIFAR-10 mid point 0.821 is on the grid. The best settings are then tuned for longer and
scored with Inception FID-10k by benchmarks/fashion.py (--tuned).

The tuning cost is (tuned kimg x seconds per ECT image) / (teacher kimg x seconds per EDM image),
the two step times measured side by side in this process on the same network, the EDM step at the
teacher's batch and the ECT step at the row's (the cost of an image depends on the batch: on a
2-core Xeon an ECT image cost less at batch 32 than at 128).

The base (ECT's published CIFAR-10 run, scaled to a short tuning): RAdam at lr 1e-4, batch 128,
dropout 0.2 (the target under the same dropout mask), the gap halving (q = 2) four times over the
run, ln t ~ N(-1.1, 2.0^2), the L2 metric weighted by 1 / (t - r), k = 8, b = 1, and an EMA
half-life of a tenth of the run (ECT's beta 0.9999 per step is an 887-kimg half-life, made for
25.6 Mimg; over a 30-kimg tuning it would leave the EMA at the teacher's weights).
Rows are cached in the fashion cache (results.json), so a rerun only tunes what is missing.

Whether the teacher matters: `--other-teacher CKPT --other ROWS@KIMG` tunes a second teacher (for
example one trained with `--dropout 0.1`) with the same settings, scored against its own Heun-35,
in a table of its own; its tunings and exports are named by its checkpoint's hash, so they never
reuse the first teacher's.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks import fashion
from benchmarks.common import measure, replace_section, save, table

BEGIN, END = "<!-- benchmarks.consistency_fashion:begin -->", "<!-- benchmarks.consistency_fashion:end -->"
SCORE_IMAGES = 2000  # seeds 0..1999 are scored

# row name -> (what changed, TrainingOptions overrides over the base)
ROWS: dict[str, tuple[str, dict]] = {
    "base": ("ECT's CIFAR-10 settings, scaled to the run", {}),
    "dropout0": ("dropout 0", {"dropout": 0.0}),
    "dropout0.1": ("dropout 0.1", {"dropout": 0.1}),
    "dropout0.4": ("dropout 0.4 (ECT, ImageNet-64)", {"dropout": 0.4}),
    "q256": ("q 256, never halving (ECT's 1-hour run)", {"ect_q": 256.0, "ect_stage_kimg": 1e6}),
    "pmean": ("ln t ~ N(-0.8, 1.6^2) (ECT, ImageNet-64)", {"ect_p_mean": -0.8, "ect_p_std": 1.6}),
    "huber": ("pseudo-Huber c 0.017 (ECT's 0.00054 sqrt(d))", {"ect_c": 0.017}),
    "lr2e-4": ("lr 2e-4", {"lr": 2e-4}),
    "lr1e-3": ("lr 1e-3 (the teacher's)", {"lr": 1e-3}),
    "batch32": ("batch 32 (4x the steps per image)", {"batch": 32}),
    "ema25": ("EMA half-life a quarter of the run", {"ema_halflife_fraction": 0.25}),
}


def base_options(kimg: float) -> dict[str, Any]:
    """The base (ECT's CIFAR-10 optimiser and dropout) for a run of `kimg`, over the fashion-mnist consistency
    preset, which may since have taken the ablation's winner."""
    return {"lr": 1e-4, "dropout": 0.2, "optimizer": "radam", "ect_q": 2.0,
            "duration_kimg": kimg, "ect_stage_kimg": kimg / 4, "ema_halflife_kimg": kimg / 10,
            "kimg_per_tick": max(kimg / 10, 1.0), "snapshot_kimg": kimg, "ckpt_seconds": 120}


def combined(names: list[str]) -> tuple[str, dict]:
    """The rows' changes together: (what changed, overrides)."""
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"error: unknown rows {', '.join(unknown)}; rows: {', '.join(ROWS)}")
    return " + ".join(ROWS[n][0] for n in names), {k: v for n in names for k, v in ROWS[n][1].items()}


def tune(teacher: str, run_dir: str, overrides: dict[str, Any], echo) -> str:
    """Tune `teacher` into `run_dir` (resuming a stopped run); returns its checkpoint."""
    from edm_deploy.training.checkpoint import load_checkpoint
    from edm_deploy.training.options import consistency_options
    from edm_deploy.training.training_loop import training_loop

    ckpt = os.path.join(run_dir, "ckpt.pt")
    options = consistency_options(teacher, fashion.PRESET, outdir=run_dir, **overrides)
    if os.path.exists(ckpt):
        state = load_checkpoint(ckpt)["training_state"] or {}
        if state.get("cur_nimg", 0) >= options.duration_kimg * 1000:
            return ckpt
        options.resume = ckpt
    echo(f"  tuning {run_dir} for {options.duration_kimg:g} kimg")
    training_loop(options, echo=None, progress=True)
    return ckpt


def raw_weights(ckpt: str) -> str:
    """A copy of `ckpt` whose exported weights are the trained network's own, not its EMA (written once)."""
    import torch

    from edm_deploy.runtime.core.fileio import atomic_path
    from edm_deploy.training.checkpoint import load_checkpoint

    out = os.path.join(os.path.dirname(ckpt), "ckpt-raw.pt")
    if not os.path.exists(out):
        raw = load_checkpoint(ckpt)
        raw["ema"], raw["training_state"] = raw["training_state"]["net"], None
        with atomic_path(out) as tmp:
            torch.save(raw, tmp)
    return out


def consistency_plan(den, sigmas):
    return fashion.plan_for(den, {"solver": "consistency", "sigmas": [float(v) for v in sigmas]})


def score_tuned(onnx: str, scorer: fashion.Scorer, nfes=(1, 2, 3)) -> dict[str, Any]:
    from edm_deploy.loading import load

    out = {}
    with load(onnx, device="cpu") as den:
        for nfe in nfes:
            choice = fashion.choose_points(den, scorer, nfe)
            row = scorer(den, consistency_plan(den, choice["sigmas"]), SCORE_IMAGES, inception=False)
            out[str(nfe)] = dict(row, tried=choice["tried"])
    return out


def step_cost_ratio(teacher: str, batch: int = 128, ect_batch: int | None = None, repeats: int = 3,
                    steps: int = 3) -> dict[str, Any]:
    """Seconds per ECT image / seconds per EDM image on the teacher's network, interleaved in one process: the
    EDM step at the teacher's `batch`, the ECT step at `ect_batch` (default the same)."""
    import torch

    from edm_deploy.training.checkpoint import build_network, load_checkpoint
    from edm_deploy.training.consistency_loss import ECTLoss
    from edm_deploy.training.dataset import load_fashion_mnist
    from edm_deploy.training.loss import EDMLoss

    ckpt = load_checkpoint(teacher)
    images, labels = load_fashion_mnist("train")
    ect_batch = ect_batch or batch

    def stepper(loss_fn, dropout: float, rows: int):
        x = torch.from_numpy(images[:rows]).float() / 127.5 - 1
        y = torch.eye(10)[torch.from_numpy(labels[:rows])]
        network = dict(ckpt["network"], init_kwargs=dict(ckpt["network"]["init_kwargs"], dropout=dropout))
        net = build_network(network).train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-5)

        def run():
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss_fn(net, x, y).sum().div(rows).backward()
                opt.step()
        return run

    edm, ect = stepper(EDMLoss(), 0.0, batch), stepper(ECTLoss(stage_kimg=1e9), 0.2, ect_batch)
    times: dict[str, list] = {"edm": [], "ect": []}
    for _ in range(repeats):
        times["edm"].append(measure(edm, repeats=1, warmup=0)["median_s"] / steps)
        times["ect"].append(measure(ect, repeats=1, warmup=0)["median_s"] / steps)
    edm_s, ect_s = float(np.median(times["edm"])), float(np.median(times["ect"]))
    return {"edm_step_s": edm_s, "ect_step_s": ect_s, "edm_batch": batch, "ect_batch": ect_batch,
            "ratio": (ect_s / ect_batch) / (edm_s / batch)}


@dataclass
class Teacher:
    """A teacher and what every row tuned from it shares."""

    ckpt: str
    sha: str  # the first 16 hex digits of the checkpoint's SHA-256: the key of its results
    kimg: float  # its training length, the denominator of a row's cost
    dropout: float  # the dropout it was trained with
    prefix: str  # its tunings' and exports' file names start so: "" for the benchmark's own teacher
    reference: dict[str, Any]  # its Heun-35 on the scored seeds


def prepare_teacher(ckpt: str, cache: str, scorer: fashion.Scorer, results: fashion.Results,
                    own: bool) -> Teacher:
    """`ckpt` scored at Heun-35; `own` keeps the file names the cache had before a second teacher could be
    tuned, any other teacher's are prefixed by its hash so its tunings never reuse the first one's."""
    from edm_deploy.loading import load
    from edm_deploy.training.checkpoint import load_checkpoint

    sha = fashion.file_sha256(ckpt)[:16]
    data = load_checkpoint(ckpt)
    kimg = float((data.get("meta") or {}).get("kimg") or 0)
    dropout = float(data["network"]["init_kwargs"].get("dropout", 0.0))
    prefix = "" if own else f"t{sha[:8]}-"
    with load(fashion.export(ckpt, cache, "fp32", f"{prefix}teacher"), device="cpu") as den:
        ref = results.get_or_compute(f"clf:{sha}:heun@35:n{SCORE_IMAGES}", lambda: scorer(
            den, fashion.plan_for(den, {"solver": "heun", "nfe": 35}), SCORE_IMAGES, inception=False))
    return Teacher(ckpt, sha, kimg, dropout, prefix, ref)


def parse_final(spec: str) -> tuple[str, float]:
    """"dropout0+lr1e-3@86" -> ("dropout0+lr1e-3", 86.0), with one error line for a malformed one."""
    names, _, kimg = spec.partition("@")
    try:
        return names, float(kimg)
    except ValueError:
        raise SystemExit(f"error: {spec!r}: expected ROWS@KIMG, e.g. dropout0+lr1e-3@86") from None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kimg", type=float, default=30.0, help="tuning length of every ablation row [30]")
    p.add_argument("--rows", default=",".join(ROWS), help="rows to run, comma-separated")
    p.add_argument("--combine", action="append", default=[],
                   help="a further row: rows whose changes are combined (e.g. dropout0,huber); may be repeated")
    p.add_argument("--final", action="append", default=[], metavar="ROWS@KIMG",
                   help="chosen settings (rows joined by +, e.g. dropout0+lr1e-3@60) tuned for longer, shown below "
                        "the rows; may be repeated")
    p.add_argument("--final-raw", action="append", default=[], metavar="ROWS@KIMG",
                   help="a --final run scored with its trained weights instead of their EMA; may be repeated")
    p.add_argument("--ckpt", default=None, help="the teacher [default: benchmarks/fashion.py's cached preset run]")
    p.add_argument("--other-teacher", default=None, metavar="CKPT",
                   help="a second teacher (e.g. trained with --dropout 0.1) tuned with the --other settings")
    p.add_argument("--other", action="append", default=[], metavar="ROWS@KIMG",
                   help="settings tuned from --other-teacher, in a table of their own; may be repeated")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.other and not args.other_teacher:
        raise SystemExit("error: --other needs --other-teacher CKPT")
    finals = [(*parse_final(spec), False) for spec in args.final] + [(*parse_final(s), True) for s in args.final_raw]
    others = [parse_final(spec) for spec in args.other]
    echo = print
    cache = fashion.cache_dir()
    clf = fashion.judge(cache, echo)
    from edm_deploy.training.dataset import load_fashion_mnist
    from edm_deploy.training.presets import preset

    train_x, _ = load_fashion_mnist("train")
    scorer = fashion.Scorer(clf, clf.stats(train_x), None, None, 500)
    results = fashion.Results(os.path.join(cache, "results.json"))
    first = args.ckpt or fashion.teacher(cache, echo)
    own = os.path.realpath(first) == os.path.realpath(fashion.teacher_path(cache))
    teacher = prepare_teacher(first, cache, scorer, results, own=own)
    teacher_batch = int(preset(fashion.PRESET)["batch"])

    def cost_at(t: Teacher, batch: int) -> dict[str, Any]:
        """The ECT/EDM cost per image with the ECT step at `batch` (the first key: the teacher's batch)."""
        key = f"step-cost:{t.sha}" + ("" if batch == teacher_batch else f":b{batch}")
        return results.get_or_compute(key, lambda: step_cost_ratio(t.ckpt, teacher_batch, batch))

    cost = cost_at(teacher, teacher_batch)
    rows = {name: ROWS[name] for name in args.rows.split(",") if name}
    for names in args.combine:
        rows[names.replace(",", "+")] = combined(names.split(","))

    def run_row(t: Teacher, name: str, what: str, changes: dict, kimg: float, raw: bool = False) -> dict[str, Any]:
        overrides = {**base_options(kimg), **changes}
        if "ema_halflife_fraction" in overrides:  # a share of the run, whatever its length
            overrides["ema_halflife_kimg"] = kimg * overrides.pop("ema_halflife_fraction")
        tag = f"{t.prefix}{name}-{kimg:g}kimg"

        def compute():
            start = time.perf_counter()
            ckpt = tune(t.ckpt, os.path.join(cache, "ect", tag), overrides, echo)
            tune_s = time.perf_counter() - start
            onnx = fashion.export(raw_weights(ckpt) if raw else ckpt, cache, "fp32", f"ect-{tag}" + "-raw" * raw)
            return {"checkpoint": ckpt, "tune_s_this_run": tune_s, "overrides": overrides,
                    "scores": score_tuned(onnx, scorer)}

        row_cost = cost_at(t, int(overrides.get("batch", teacher_batch)))
        key = f"ect:{t.sha}:{name}:{kimg:g}kimg" + (":raw" if raw else "")
        row = dict(results.get_or_compute(key, compute), what=what + (", no EMA" if raw else ""), kimg=kimg,
                   cost_fraction=kimg * row_cost["ratio"] / t.kimg)
        s, ref = row["scores"], t.reference
        echo(f"  {name:12s} {kimg:g} kimg " + "  ".join(
            f"NFE {n}: FD {s[n]['classifier_fd']:.2f} ({s[n]['classifier_fd'] / ref['classifier_fd']:.2f}x) "
            f"acc {s[n]['accuracy']:.1%}" for n in ("1", "2", "3")))
        return row

    out_rows = {name: run_row(teacher, name, what, changes, args.kimg) for name, (what, changes) in rows.items()}
    final = {}
    for names, kimg, raw in finals:
        what, changes = combined(names.split("+"))
        final[f"{names}@{kimg:g}" + (" (no EMA)" if raw else "")] = run_row(teacher, names, what, changes, kimg, raw=raw)
    out = {"kimg": args.kimg, "teacher": teacher.ckpt, "teacher_kimg": teacher.kimg,
           "teacher_dropout": teacher.dropout, "reference": teacher.reference,
           "step_cost": cost, "rows": out_rows, "final": final,
           "cost_fraction": args.kimg * cost["ratio"] / teacher.kimg}
    if args.other_teacher:
        other = prepare_teacher(args.other_teacher, cache, scorer, results, own=False)
        other_rows = {}
        for names, kimg in others:
            what, changes = combined(names.split("+"))
            other_rows[f"{names}@{kimg:g}"] = run_row(other, names, what, changes, kimg)
        out["other"] = {"teacher": other.ckpt, "teacher_kimg": other.kimg, "dropout": other.dropout,
                        "reference": other.reference, "rows": other_rows}
    text = markdown(out)
    print(text)
    save("consistency_fashion", out)
    if not args.no_write:
        replace_section(text, BEGIN, END, fashion.RESULTS_MD)
    return out


def cells(rows: dict[str, Any], ref: dict[str, Any]) -> list[list[str]]:
    out = []
    for name, row in rows.items():
        s = row["scores"]
        out.append([name, row["what"], f"{row['cost_fraction']:.2f}x"] + [
            f"{s[n]['classifier_fd'] / ref['classifier_fd']:.2f}x ({s[n]['accuracy']:.0%})" for n in ("1", "2", "3")
        ] + [", ".join(f"{v:g}" for v in s[n]["sigmas"]) for n in ("2", "3")])
    return out


def markdown(out: dict[str, Any]) -> str:
    ref = out["reference"]
    head = ["row", "changed from the base", "cost", "NFE 1", "NFE 2", "NFE 3", "NFE 2 points", "NFE 3 points"]
    rows = cells(out["rows"], ref)
    final = []
    if out.get("final"):
        final = ["", "Chosen settings tuned for longer (the cost column: the tuning's share of the teacher's training "
                 "cost):", "", "```", table(cells(out["final"], ref), head), "```"]
    if out.get("other"):
        o = out["other"]
        oref = o["reference"]
        final += ["", f"The same settings tuned from another teacher, `{os.path.basename(os.path.dirname(o['teacher']))}`: "
                  f"the same preset trained with dropout {o['dropout']:g} for {o['teacher_kimg']:g} kimg. Its Heun-35 "
                  f"scores classifier FD {oref['classifier_fd']:.2f} ({oref['classifier_fd'] / ref['classifier_fd']:.2f}x "
                  f"the first teacher's), accuracy {oref['accuracy']:.1%}; the cells are against this teacher's own "
                  "Heun-35 on the same seeds:", "", "```", table(cells(o["rows"], oref), head), "```"]
    return "\n".join([
        BEGIN, "## Consistency tuning settings on Fashion-MNIST (`benchmarks/consistency_fashion.py`)", "",
        f"Every row tunes the `fashion-mnist` teacher ({out['teacher_kimg']:g} kimg, trained with dropout "
        f"{out['teacher_dropout']:g}) for {out['kimg']:g} kimg, "
        f"{out['cost_fraction']:.2f}x the teacher's training cost at its batch (an ECT step costs "
        f"{out['step_cost']['ratio']:.2f}x an EDM step, measured side by side; the cost column is per row, "
        f"a row with another batch measured at its own). Cells: classifier FD / the "
        f"teacher's Heun-35 ({ref['classifier_fd']:.2f}, accuracy {ref['accuracy']:.1%}) on the same "
        f"{SCORE_IMAGES} seeds, and the classifier's accuracy (Inception FID for the chosen model only, in the "
        f"real-images table: on every row it would cost more than this CPU had).", "", "```", table(rows, head), "```", *final, END]) + "\n"


if __name__ == "__main__":
    main()
