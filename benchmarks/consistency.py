"""One or two evaluations per image: the digits model consistency-tuned with ECT, against its teacher's solvers.

The teacher is the demo's `tiny` preset model (``--ckpt``, else the demo's when complete, else
trained here as `benchmarks/precision.py` does). It is tuned with `edm-deploy train --consistency
--preset tiny` (Easy Consistency Tuning, `training/consistency_loss.py`; ``--tune-duration-kimg``,
``--tune-ect-q`` and the other ``--tune-*`` flags override the preset), then both are exported to ONNX and sampled through the
NumPy runtime with onnxruntime on the CPU, on the same 1000 images (100 per class, seeds 0-999,
the latents `training.digits_eval.sample_digits` draws), scored as the demo does: pixel Fréchet
distance against the 359-image test split and the independent classifier's accuracy.

The tuned model is sampled with the consistency sampler of ECT (its `generator_fn`): x =
D(sigma_max z; sigma_max), then for each further time point s, x = D(x + s eps; s), eps from the
seed's own noise stream: the runtime's `consistency` solver (`runtime/sampling/solvers.py`). The time points for NFE 2 and 3 are chosen on a grid by the FD against the
*train* split of 500 held-out seeds (100000-100499), then scored on seeds 0-999 against the test
split like everything else; ECT's CIFAR-10 mid point 0.821 is always on the grid.

The teacher runs Heun at NFE 35 (the reference), iPNDM at NFE 3-5 (the best training-free solver
there, `benchmarks/solvers.py`) and Euler at NFE 1-3; the tuned model also runs Heun-35, to show
why an ODE solver on a consistency model is a mistake. The tuning cost is given in kimg and in
wall time (both runs' own clocks, from their checkpoints), and - since these CPUs are shared and
wall times of runs made at different moments are not comparable - as a ratio measured side by
side here: the time of one ECT step against one EDM step of the same network and batch,
interleaved in one process; tuning cost / training cost = (tuned kimg x ECT step) / (teacher kimg
x EDM step).

Targets (issue 21): NFE 2 FD within 10 % of the teacher's Heun-35, NFE 1 within 50 %, tuning
cost no more than the teacher's own training. The table goes into benchmarks/RESULTS.md (its own
section, replaced on a rerun) and the plot into docs/consistency-fd-vs-nfe.png.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import tempfile
import time
from typing import Any, Optional

import numpy as np

from benchmarks import common
from benchmarks.common import RESULTS_DIR, fd_vs_nfe_axes, measure, save, save_figure, table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_MD = os.path.join(REPO, "benchmarks", "RESULTS.md")
PLOT = os.path.join(REPO, "docs", "consistency-fd-vs-nfe.png")
BEGIN, END = "<!-- benchmarks.consistency:begin -->", "<!-- benchmarks.consistency:end -->"
SIGMA_MAX = 80.0  # ECT's t_max, EDM's sigma_max
ECT_MID = 0.821  # ECT's 2-step mid point on CIFAR-10 (ct_train.py --mid_t)
MID_GRID = (0.2, 0.5, ECT_MID, 1.2, 2.0, 4.0, 6.0, 10.0)
SELECT_SEEDS = range(100_000, 100_500)
TEACHER_RUNS = [("heun", 35), ("ipndm", 5), ("ipndm", 4), ("ipndm", 3), ("euler", 3), ("euler", 2), ("euler", 1)]
ECT_FLAGS = ("duration_kimg", "batch", "lr", "dropout", "ema_halflife_kimg", "ect_q", "ect_stage_kimg", "ect_c",
             "ect_p_mean", "ect_p_std", "optimizer")


def consistency_plan(den, sigmas):
    """The runtime's consistency solver on exactly these time points."""
    from edm_deploy.runtime.sampling.planner import plan_sampling

    return plan_sampling(den, {"solver": "consistency", "sigmas": [float(v) for v in sigmas]})


def step_cost_ratio(teacher: str, tuned_options: dict, repeats: int = 3, steps: int = 4) -> dict[str, Any]:
    """Seconds per ECT step / seconds per EDM step, same network and batch, interleaved in one process."""
    import torch

    from edm_deploy.training.checkpoint import build_network, load_checkpoint
    from edm_deploy.training.consistency_loss import ECTLoss
    from edm_deploy.training.dataset import load_digits_split
    from edm_deploy.training.loss import EDMLoss

    ckpt = load_checkpoint(teacher)
    tr_x, tr_y = load_digits_split()[:2]
    batch = int(tuned_options["batch"])
    x = torch.from_numpy(tr_x[np.arange(batch) % len(tr_x)]).float() / 127.5 - 1
    y = torch.eye(10)[torch.from_numpy(tr_y[np.arange(batch) % len(tr_y)])]

    def stepper(loss_fn):
        net = build_network(ckpt["network"]).train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-5)

        def run():
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss_fn(net, x, y).sum().div(batch).backward()
                opt.step()
        return run

    edm = stepper(EDMLoss())
    ect = stepper(ECTLoss(stage_kimg=1e9))
    times: dict[str, list] = {"edm": [], "ect": []}
    for _ in range(repeats):  # interleaved, so a change in the machine's load hits both
        times["edm"].append(measure(edm, repeats=1, warmup=0)["median_s"] / steps)
        times["ect"].append(measure(ect, repeats=1, warmup=0)["median_s"] / steps)
    edm_s, ect_s = float(np.median(times["edm"])), float(np.median(times["ect"]))
    return {"edm_step_s": edm_s, "ect_step_s": ect_s, "ratio": ect_s / edm_s, "batch": batch,
            "spread": float(max(np.ptp(times["edm"]) / edm_s, np.ptp(times["ect"]) / ect_s))}


def sample_images(den, plan, seeds, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images of `seeds` (classes in blocks of len(seeds) / 10) and their classes."""
    from edm_deploy.runtime.sampling.generate import quantize_uint8
    from edm_deploy.runtime.sampling.noise import StackedRandomGenerator, one_hot

    seeds = np.asarray(list(seeds))
    classes = np.repeat(np.arange(10), len(seeds) // 10)
    out = []
    for b in range(0, len(seeds), batch):
        rnd = StackedRandomGenerator(seeds[b:b + batch])
        latents = rnd.randn((den.img_channels, den.img_resolution, den.img_resolution))
        x = plan.run(den, den.to_device(latents), one_hot(classes[b:b + batch], 10), rnd.randn_like)
        out.append(quantize_uint8(x).transpose(0, 3, 1, 2))
    return np.concatenate(out), classes


def choose_time_points(den, nfe: int, batch: int, train_images) -> dict[str, Any]:
    """The grid's best time points for `nfe` evaluations, by FD to the train split on held-out seeds."""
    from edm_deploy.training.digits_eval import frechet_pixels

    tried = []
    for mids in itertools.combinations(sorted(MID_GRID, reverse=True), nfe - 1):
        sigmas = np.array([SIGMA_MAX, *mids])
        images, _ = sample_images(den, consistency_plan(den, sigmas), SELECT_SEEDS, batch)
        tried.append({"sigmas": [float(s) for s in sigmas], "fd_train": frechet_pixels(images, train_images)})
    best = min(tried, key=lambda r: r["fd_train"])
    return {"sigmas": best["sigmas"], "tried": tried}


def run(teacher: str, tuned: str, workdir: str, nfes: list[int], per_class: int, batch: int, echo) -> dict[str, Any]:
    from benchmarks.solvers import sample_scored
    from edm_deploy.export.onnx_export import export_onnx
    from edm_deploy.loading import load
    from edm_deploy.runtime.sampling.planner import plan_sampling
    from edm_deploy.training.checkpoint import load_checkpoint, load_network
    from edm_deploy.training.dataset import load_digits_split
    from edm_deploy.training.digits_eval import frechet_pixels, train_classifier

    classifier, clf_acc = train_classifier()
    train_x, _, test_x, _ = load_digits_split()
    out: dict[str, Any] = {"per_class": per_class, "classifier_test_accuracy": clf_acc,
                           "fd_train_test": frechet_pixels(train_x, test_x), "teacher": {}, "tuned": {}}
    paths = {}
    for name, path in (("teacher", teacher), ("tuned", tuned)):
        ckpt = load_checkpoint(path)
        state = ckpt["training_state"] or {}
        out[f"{name}_run"] = {"checkpoint": path, "kimg": state.get("cur_nimg", 0) / 1000,
                              "seconds": state.get("total_time"), "options": state.get("options")}
        paths[name] = os.path.join(workdir, f"{name}.onnx")
        export_onnx(load_network(ckpt).eval(), ckpt["network"], paths[name], max_batch=batch, opt_batch=batch,
                    source_path=path)
    with load(paths["teacher"], device="cpu") as den:
        assert not den.consistency_tuned
        for solver, nfe in TEACHER_RUNS:
            plan = plan_sampling(den, {"num_steps": 18} if (solver, nfe) == ("heun", 35) else
                                 {"solver": solver, "nfe": nfe, "num_steps": None})
            out["teacher"][f"{solver}@{nfe}"] = r = sample_scored(den, plan, per_class, batch, classifier, test_x)
            echo(f"  teacher {solver:6s} NFE {nfe:2d}: FD {r['fd']:.4f}  accuracy {r['accuracy']:.1%}  "
                 f"{r['img_per_s']:.0f} img/s")
    with load(paths["tuned"], device="cpu") as den:
        assert den.consistency_tuned, "the tuned model's manifest must say it is consistency-tuned"
        out["tuned_record"] = den.consistency
        for nfe in nfes:
            choice = {"sigmas": [SIGMA_MAX], "tried": []} if nfe == 1 else choose_time_points(den, nfe, batch, train_x)
            r = sample_scored(den, consistency_plan(den, choice["sigmas"]), per_class, batch, classifier, test_x)
            r["tried"] = choice["tried"]
            out["tuned"][f"consistency@{nfe}"] = r
            echo(f"  tuned   consistency NFE {nfe}: FD {r['fd']:.4f}  accuracy {r['accuracy']:.1%}  sigmas "
                 f"{', '.join(f'{s:g}' for s in r['sigmas'])}  {r['img_per_s']:.0f} img/s")
        r = sample_scored(den, plan_sampling(den, {"num_steps": 18}), per_class, batch, classifier, test_x)
        out["tuned"]["heun@35"] = r
        echo(f"  tuned   heun   NFE 35: FD {r['fd']:.4f}  accuracy {r['accuracy']:.1%}")
    return out


def verdicts(out: dict[str, Any]) -> dict[str, Any]:
    ref = out["teacher"]["heun@35"]["fd"]
    v: dict[str, Any] = {"reference_fd": ref}
    for nfe, bound in ((1, 1.5), (2, 1.10)):
        r = out["tuned"].get(f"consistency@{nfe}")
        if r:
            v[f"nfe{nfe}"] = {"fd": r["fd"], "ratio": r["fd"] / ref, "bound": bound, "met": r["fd"] / ref <= bound}
    cost = out.get("step_cost")
    if cost:
        tuned_kimg, teacher_kimg = out["tuned_run"]["kimg"], out["teacher_run"]["kimg"]
        ratio = tuned_kimg * cost["ratio"] / teacher_kimg
        v["cost"] = {"ratio": ratio, "met": ratio <= 1.0, "kimg_ratio": tuned_kimg / teacher_kimg}
    return v


def _fmt_s(seconds: Optional[float]) -> str:
    return "?" if seconds is None else f"{seconds / 60:.1f} min"


def markdown(out: dict[str, Any]) -> str:
    ref = out["teacher"]["heun@35"]
    v = out["verdicts"]
    teacher_run, tuned_run = out["teacher_run"], out["tuned_run"]
    o = tuned_run["options"] or {}
    cost = out["step_cost"]
    lines = [BEGIN, f"## Consistency tuning (ECT) of the digits model ({out['time'][:10]})", "",
             f"`python -m benchmarks.consistency`. CPU: {out['cpu']['model']} ({out['cpu']['logical_cpus']} logical "
             "CPUs), a shared VM whose speed drifts (compare FD and accuracy, and the side-by-side cost ratio; "
             "wall times and img/s are noisy). onnxruntime fp32 for sampling. "
             f"{10 * out['per_class']} images per row ({out['per_class']} per class, seeds 0-{10 * out['per_class'] - 1}), "
             "pixel FD against the test split "
             f"(train vs test: {out['fd_train_test']:.3f}); classifier test accuracy "
             f"{out['classifier_test_accuracy']:.1%}.", "",
             f"Teacher: `tiny` preset, {teacher_run['kimg']:.0f} kimg in {_fmt_s(teacher_run['seconds'])}. Tuned: "
             f"`train --consistency --preset tiny`, {tuned_run['kimg']:.0f} kimg in {_fmt_s(tuned_run['seconds'])}: "
             f"batch {o.get('batch')}, {o.get('optimizer')} lr {o.get('lr')}, dropout {o.get('dropout')}, EMA "
             f"half-life {o.get('ema_halflife_kimg')} kimg, q {o.get('ect_q')}, a stage every "
             f"{o.get('ect_stage_kimg')} kimg, c {o.get('ect_c')}, P_mean {o.get('ect_p_mean')}, "
             f"P_std {o.get('ect_p_std')}.", "",
             "| model | sampler | NFE | FD | FD / Heun-35 | accuracy | img/s |", "|---|---|---|---|---|---|---|"]
    rows = [("teacher", k, r) for k, r in out["teacher"].items()] + [("tuned", k, r) for k, r in out["tuned"].items()]
    for model, key, r in rows:
        solver = key.split("@")[0]
        label = solver if solver != "consistency" else "consistency, sigmas " + ", ".join(f"{s:g}" for s in r["sigmas"])
        fd = f"**{r['fd']:.3f}**" if solver == "consistency" else f"{r['fd']:.3f}"
        lines.append(f"| {model} | {label} | {r['nfe']} | {fd} | {r['fd'] / ref['fd']:.2f}x | {r['accuracy']:.1%} | "
                     f"{r['img_per_s']:.0f} |")
    lines += ["", f"Tuning cost, measured side by side: one ECT step costs {cost['ratio']:.2f}x one EDM step "
              f"(batch {cost['batch']}, {cost['ect_step_s'] * 1e3:.0f} vs {cost['edm_step_s'] * 1e3:.0f} ms, spread "
              f"{cost['spread']:.0%}: two forward passes, one without gradient, and one backward)."]
    for nfe in (2, 1):
        if f"nfe{nfe}" in v:
            b = v[f"nfe{nfe}"]
            lines.append(f"Target: NFE {nfe} FD within {b['bound'] - 1:.0%} of the teacher's Heun-35 "
                         f"({v['reference_fd']:.4f}) — {'met' if b['met'] else 'NOT met'}: {b['fd']:.4f} "
                         f"({b['ratio']:.2f}x).")
    if "cost" in v:
        c = v["cost"]
        lines.append(f"Target: tuning cost no more than the teacher's training — {'met' if c['met'] else 'NOT met'}: "
                     f"{c['kimg_ratio']:.2f}x its kimg x {cost['ratio']:.2f} per kimg = {c['ratio']:.2f}x.")
    lines += ["", "![FD vs NFE](../docs/consistency-fd-vs-nfe.png)", END]
    return "\n".join(lines) + "\n"


def write_section(text: str, path: str = RESULTS_MD) -> None:
    common.replace_section(text, BEGIN, END, path)


def plot(out: dict[str, Any], path: str = PLOT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    by_solver: dict[str, list] = {}
    for key, r in out["teacher"].items():
        by_solver.setdefault(key.split("@")[0], []).append((r["nfe"], r["fd"]))
    for solver, pts in by_solver.items():
        if len(pts) > 1:
            ax.plot(*zip(*sorted(pts)), marker="o", markersize=3.5, linewidth=1.3, label=f"teacher, {solver}")
    pts = sorted((r["nfe"], r["fd"]) for k, r in out["tuned"].items() if k.startswith("consistency"))
    ax.plot(*zip(*pts), marker="*", markersize=10, linewidth=2, color="black", label="ECT-tuned, consistency sampler")
    ref = out["teacher"]["heun@35"]["fd"]
    ax.axhline(ref, color="grey", linestyle="--", linewidth=1, label=f"teacher Heun NFE 35 ({ref:.3f})")
    ax.axhline(out["fd_train_test"], color="green", linestyle=":", linewidth=1,
               label=f"real digits: train vs test ({out['fd_train_test']:.3f})")
    fd_vs_nfe_axes(ax, sorted({n for pts in by_solver.values() for n, _ in pts} | {n for n, _ in pts}))
    ax.set_title(f"digits: ECT-tuned vs its teacher's solvers, {10 * out['per_class']} images per point")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None) -> dict:
    from benchmarks.precision import cpu_info, digits_checkpoint
    from edm_deploy.demo import tune_step

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="trained digits checkpoint (default: the demo's, else train one)")
    parser.add_argument("--tuned", default=None, help="an ECT-tuned checkpoint of it (default: tune one here)")
    parser.add_argument("--tune-dir", default=os.path.join(RESULTS_DIR, "consistency-digits"),
                        help="where the tuning run goes (a stopped one resumes)")
    parser.add_argument("--nfes", default="1,2,3", help="NFEs of the consistency sampler")
    parser.add_argument("--per-class", type=int, default=100, help="images per class per row")
    parser.add_argument("--batch", dest="sample_batch", type=int, default=500, help="rows per network call")
    parser.add_argument("--quick", action="store_true", help="a short tuning and 20 images per class; no writing")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md and the plot")
    for name in ECT_FLAGS:
        parser.add_argument("--tune-" + name.replace("_", "-"), dest=name, default=None,
                            type=str if name == "optimizer" else float if name != "batch" else int,
                            help=f"tuning: {name} (default: the tiny consistency preset's)")
    args = parser.parse_args(argv)
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    overrides = {name: getattr(args, name) for name in ECT_FLAGS if getattr(args, name) is not None}
    if args.quick:
        overrides.setdefault("duration_kimg", 10)
        args.per_class, args.no_write = 20, True
        args.tune_dir = args.tune_dir + "-quick"
    cpu = cpu_info()
    print(f"CPU: {cpu['model']} ({cpu['logical_cpus']} logical CPUs)")
    teacher = digits_checkpoint(args.ckpt, print)
    tuned = args.tuned or tune_step(teacher, args.tune_dir, print, **overrides)
    with tempfile.TemporaryDirectory(prefix="edm-consistency-") as tmp:
        out = run(teacher, tuned, tmp, [int(n) for n in args.nfes.split(",") if n.strip()], args.per_class,
                  args.sample_batch, print)
    from edm_deploy.training.checkpoint import load_checkpoint

    out["step_cost"] = step_cost_ratio(teacher, load_checkpoint(tuned)["training_state"]["options"])
    out["cpu"] = cpu
    out["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out["verdicts"] = verdicts(out)
    ref = out["teacher"]["heun@35"]["fd"]
    rows = [[f"{m} {k}", r["nfe"], r["fd"], r["fd"] / ref, r["accuracy"]]
            for m in ("teacher", "tuned") for k, r in out[m].items()]
    print(table(rows, ["model sampler", "NFE", "FD", "FD / Heun-35", "accuracy"]))
    for key, v in out["verdicts"].items():
        if isinstance(v, dict):
            print(f"{key}: {v['ratio']:.3f}x ({'met' if v['met'] else 'NOT met'})")
    if not args.no_write:
        write_section(markdown(out))
        plot(out)
        print(f"wrote {RESULTS_MD} (section) and {PLOT}")
    print(f"saved {save('consistency', out)}")
    return out


if __name__ == "__main__":
    main()
