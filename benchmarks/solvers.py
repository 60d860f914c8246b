"""Every solver at every NFE on the trained digits model, and the best fast one on searched (GITS) schedules.

The model is the demo's `tiny` preset, trained (given with ``--ckpt``, else the demo's when
complete, else trained here like `benchmarks/precision.py` does) and exported to ONNX
(onnxruntime on the CPU). For each solver of the registry and NFE in {3, 4, 5, 6, 8, 10, 15,
20, 35} it draws the same 1000 images (100 per class, seeds 0-999, the latents
`training.digits_eval.sample_digits` draws) and scores them as the demo does: pixel Fréchet
distance against the 359-image test split and the independent classifier's accuracy; img/s is
the wall time of those 1000 images. Combinations a solver cannot spend exactly (Heun's NFE is
always odd) are left blank: the nearest odd NFE is in the same row.

Then the fast solver with the lowest mean FD at NFE 4-6 gets schedules searched by
`edm-deploy schedule`'s library (`runtime.sampling.schedule_search`, default settings: 256 teacher
trajectories of seeds 100000-100255, disjoint from the scored seeds) at NFE 4, 5 and 6, scored
the same way, with the search's timings and its end-point check.

Targets (issue 13): the best solver's FD at NFE 5 within 10 % of the converged Heun NFE-35 FD;
with a searched schedule, NFE 4 within 25 %. The CPU model is recorded with the figures. The
table goes into benchmarks/RESULTS.md (its own section, replaced on a rerun) and the plot into
docs/solvers-fd-vs-nfe.png (FD vs NFE, log scales, one line per solver, Heun-35 as reference).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from typing import Any, Optional

import numpy as np

from benchmarks.common import fd_vs_nfe_axes, replace_section, save, save_figure, table

NFES = (3, 4, 5, 6, 8, 10, 15, 20, 35)
SEARCHED_NFES = (4, 5, 6)
SEARCH_SEEDS = range(100_000, 100_256)
REFERENCE = ("heun", 35)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_MD = os.path.join(REPO, "benchmarks", "RESULTS.md")
PLOT = os.path.join(REPO, "docs", "solvers-fd-vs-nfe.png")
BEGIN, END = "<!-- benchmarks.solvers:begin -->", "<!-- benchmarks.solvers:end -->"
FAST = ("dpmpp-2m", "dpmpp-3m", "unipc", "ipndm", "ipndm-v", "deis")


def feasible(solver: str, nfe: int) -> bool:
    from edm_deploy.runtime.core.errors import InputError
    from edm_deploy.runtime.sampling.solvers import steps_for_nfe

    try:
        steps_for_nfe(solver, nfe)
    except InputError:
        return False
    return True


def sample_scored(den, plan, per_class: int, batch: int, classifier, test_images) -> dict[str, Any]:
    """The 10 x per_class images of seeds 0.. (classes in blocks, as sample_digits), scored and timed."""
    from edm_deploy.runtime.sampling.generate import quantize_uint8
    from edm_deploy.runtime.sampling.noise import StackedRandomGenerator, one_hot
    from edm_deploy.training.digits_eval import score_samples

    classes = np.repeat(np.arange(10), per_class)
    seeds = np.arange(len(classes))
    out = []
    start = time.perf_counter()
    for b in range(0, len(classes), batch):
        rnd = StackedRandomGenerator(seeds[b:b + batch])
        latents = rnd.randn((den.img_channels, den.img_resolution, den.img_resolution))
        x = plan.run(den, den.to_device(latents), one_hot(classes[b:b + batch], 10), rnd.randn_like)
        out.append(quantize_uint8(x).transpose(0, 3, 1, 2))
    wall = time.perf_counter() - start
    scores = score_samples(np.concatenate(out), classes, classifier, test_images)
    return {"fd": scores["fd_samples_test"], "accuracy": scores["accuracy"], "img_per_s": len(classes) / wall,
            "nfe": plan.nfe, "sigmas": None if plan.sigmas is None else [float(v) for v in plan.sigmas]}


def run(ckpt_path: str, workdir: str, solvers: list[str], nfes: list[int], searched_nfes: list[int],
        search_solver: Optional[str], per_class: int, batch: int, echo) -> dict[str, Any]:
    from edm_deploy.export.onnx_export import export_onnx
    from edm_deploy.loading import load
    from edm_deploy.runtime.sampling import schedule_search as ss
    from edm_deploy.runtime.sampling.planner import plan_sampling
    from edm_deploy.training.checkpoint import load_checkpoint, load_network
    from edm_deploy.training.dataset import load_digits_split
    from edm_deploy.training.digits_eval import frechet_pixels, train_classifier

    ckpt = load_checkpoint(ckpt_path)
    onnx_path = os.path.join(workdir, "digits.onnx")
    export_onnx(load_network(ckpt).eval(), ckpt["network"], onnx_path, max_batch=batch, opt_batch=batch,
                source_path=ckpt_path)
    classifier, clf_acc = train_classifier()
    train_x, _, test_x, _ = load_digits_split()
    meta = ckpt.get("meta") or {}
    out: dict[str, Any] = {"checkpoint": ckpt_path, "kimg": meta.get("kimg"), "preset": meta.get("preset"),
                           "per_class": per_class, "classifier_test_accuracy": clf_acc,
                           "fd_train_test": frechet_pixels(train_x, test_x), "grid": {}, "searched": {}}
    den = load(onnx_path, device="cpu")
    with den:
        for solver in solvers:
            for nfe in nfes:
                key = f"{solver}@{nfe}"
                if not feasible(solver, nfe):
                    out["grid"][key] = None
                    continue
                out["grid"][key] = r = sample_scored(den, plan_sampling(den, {"solver": solver, "nfe": nfe}), per_class,
                                                     batch, classifier, test_x)
                echo(f"  {solver:9s} NFE {nfe:2d}: FD {r['fd']:.4f}  accuracy {r['accuracy']:.1%}  {r['img_per_s']:.0f} img/s")
        fast = [s for s in solvers if s in FAST]
        if search_solver is None and fast:
            def mean_fd(s):
                vals = [out["grid"].get(f"{s}@{n}") for n in searched_nfes]
                return np.mean([v["fd"] for v in vals if v]) if any(vals) else np.inf
            search_solver = min(fast, key=mean_fd)
        if search_solver and searched_nfes:
            echo(f"searched schedules for {search_solver} (teacher: {ss.DEFAULT_TEACHER}, {ss.DEFAULT_FINE_POINTS} "
                 f"points, {len(SEARCH_SEEDS)} latents)")
            teacher = ss.run_teacher_search_data(den, seeds=SEARCH_SEEDS, batch_size=batch)
            out["search_solver"] = search_solver
            out["teacher_s"] = teacher.seconds
            for nfe in searched_nfes:
                result = ss.search_schedule(den, search_solver, nfe, teacher_run=teacher, batch_size=batch)
                plan = plan_sampling(den, {"solver": search_solver, "sigmas": result.sigmas})
                r = sample_scored(den, plan, per_class, batch, classifier, test_x)
                r.update(path=result.path, check=result.check, seconds=result.seconds)
                out["searched"][str(nfe)] = r
                echo(f"  {search_solver} + GITS NFE {nfe}: FD {r['fd']:.4f}  accuracy {r['accuracy']:.1%}  sigmas "
                     f"{', '.join(f'{v:.3g}' for v in result.sigmas)}  (programme {result.seconds['search']:.1f} s, "
                     f"polish {result.seconds.get('refine', 0):.1f} s, check {result.seconds['check']:.1f} s)")
    return out


def verdicts(out: dict[str, Any]) -> dict[str, Any]:
    ref = out["grid"].get(f"{REFERENCE[0]}@{REFERENCE[1]}")
    if not ref:
        return {}
    at5 = {k: v for k, v in out["grid"].items() if v and k.endswith("@5")}
    best5 = min(at5, key=lambda k: at5[k]["fd"]) if at5 else None
    v: dict[str, Any] = {"reference_fd": ref["fd"]}
    if best5:
        v["best_at_5"] = {"solver": best5.split("@")[0], "fd": at5[best5]["fd"], "ratio": at5[best5]["fd"] / ref["fd"]}
        v["best_at_5"]["met"] = v["best_at_5"]["ratio"] <= 1.10
    s4 = out["searched"].get("4")
    if s4:
        v["searched_at_4"] = {"solver": out["search_solver"], "fd": s4["fd"], "ratio": s4["fd"] / ref["fd"],
                              "met": s4["fd"] / ref["fd"] <= 1.25}
    return v


def markdown(out: dict[str, Any], cpu: dict[str, Any], solvers: list[str], nfes: list[int]) -> str:
    ref = out["grid"].get(f"{REFERENCE[0]}@{REFERENCE[1]}")
    v = out.get("verdicts", {})
    lines = [BEGIN, f"## Solvers × NFE on the digits model ({out['time'][:10]})", "",
             f"`python -m benchmarks.solvers`. CPU: {cpu['model']} ({cpu['logical_cpus']} logical CPUs), onnxruntime fp32; "
             "img/s measured while other jobs shared the machine (compare the FD and accuracy, which do not depend on it). "
             f"Model: digits, preset `{out['preset']}`, {out['kimg'] or 0:.0f} kimg. "
             f"{10 * out['per_class']} images ({out['per_class']} per class, seeds from 0) per cell, "
             f"pixel Fréchet distance against the test split (train vs test: {out['fd_train_test']:.3f}); "
             f"classifier test accuracy {out['classifier_test_accuracy']:.1%}. "
             "Blank: that NFE is impossible for the solver (Heun's NFE is 2N - 1).", "",
             "FD (classifier accuracy) per solver and NFE, EDM rho = 7 time steps:", "",
             "| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for solver in solvers:
        cells = []
        for n in nfes:
            r = out["grid"].get(f"{solver}@{n}")
            cells.append("" if not r else f"{r['fd']:.3f} ({r['accuracy']:.0%})")
        lines.append(f"| {solver} | " + " | ".join(cells) + " |")
    speeds = []
    for n in nfes:
        rates = [out["grid"][f"{s}@{n}"]["img_per_s"] for s in solvers if out["grid"].get(f"{s}@{n}")]
        speeds.append(f"{np.median(rates):.0f}" if rates else "")
    lines += ["| *img/s (median over solvers)* | " + " | ".join(speeds) + " |", ""]
    if out["searched"]:
        s = out["search_solver"]
        lines += [f"Searched schedules for {s} (`edm-deploy schedule` defaults: iPNDM teacher on 61 points, 256 "
                  "latents of seeds 100000-100255, l2 cost of the solver's own step, coeff 1.15, polish on 64 of the "
                  f"latents); the teacher ran once ({out['teacher_s']:.0f} s) for all three; the end-point error is the "
                  "search's check (RMS distance to the teacher's end, on the 192 latents the polish did not use):", "",
                  "| NFE | EDM rho=7 FD | searched FD | accuracy | searched sigmas | end error: searched / rho=7 | programme + polish + check |",
                  "|---|---|---|---|---|---|---|"]
        for n, r in out["searched"].items():
            base = out["grid"].get(f"{s}@{n}")
            c = r["check"]
            lines.append(f"| {n} | {base['fd']:.3f} | **{r['fd']:.3f}** | {r['accuracy']:.1%} | "
                         f"{', '.join(f'{x:.3g}' for x in r['sigmas'])} | {c['searched_rms']:.3f} / {c['edm_rho7_rms']:.3f} | "
                         f"{r['seconds']['search']:.2f} + {r['seconds'].get('refine', 0):.1f} + {r['seconds']['check']:.1f} s |")
        lines.append("")
    if ref:
        lines.append(f"Reference: Heun NFE 35 (18 steps) FD {ref['fd']:.4f}.")
    if "best_at_5" in v:
        b = v["best_at_5"]
        lines.append(f"Target: best solver's FD at NFE 5 within 10 % of it — {'met' if b['met'] else 'NOT met'}: "
                     f"{b['solver']} {b['fd']:.4f} ({b['ratio']:.3f}x).")
    if "searched_at_4" in v:
        b = v["searched_at_4"]
        lines.append(f"Target: with a searched schedule, NFE 4 within 25 % — {'met' if b['met'] else 'NOT met'}: "
                     f"{b['solver']} + GITS {b['fd']:.4f} ({b['ratio']:.3f}x).")
    lines += ["", "![FD vs NFE](../docs/solvers-fd-vs-nfe.png)", END]
    return "\n".join(lines) + "\n"


def write_section(text: str, path: str = RESULTS_MD) -> None:
    """Replace this benchmark's section of RESULTS.md (between its markers), or append it."""
    replace_section(text, BEGIN, END, path)


def plot(out: dict[str, Any], solvers: list[str], nfes: list[int], path: str = PLOT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for solver in solvers:
        pts = [(n, out["grid"][f"{solver}@{n}"]["fd"]) for n in nfes if out["grid"].get(f"{solver}@{n}")]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3.5, linewidth=1.3, label=solver)
    if out["searched"]:
        pts = sorted((int(n), r["fd"]) for n, r in out["searched"].items())
        ax.plot(*zip(*pts), marker="*", markersize=9, linewidth=2, color="black",
                label=f"{out['search_solver']} + GITS schedule")
    ref = out["grid"].get(f"{REFERENCE[0]}@{REFERENCE[1]}")
    if ref:
        ax.axhline(ref["fd"], color="grey", linestyle="--", linewidth=1, label=f"Heun NFE 35 ({ref['fd']:.3f})")
    fd_vs_nfe_axes(ax, nfes)
    ax.set_title(f"digits ({out.get('preset')} preset): sample quality vs NFE, {10 * out['per_class']} images per point")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    save_figure(fig, path)


def main(argv=None) -> dict:
    from benchmarks.precision import cpu_info, digits_checkpoint
    from edm_deploy.runtime.sampling.solvers import SOLVER_NAMES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="trained digits checkpoint (default: the demo's, else train one)")
    parser.add_argument("--solvers", default=",".join(SOLVER_NAMES), help="comma-separated solvers")
    parser.add_argument("--nfes", default=",".join(map(str, NFES)), help="comma-separated NFEs")
    parser.add_argument("--searched-nfes", default=",".join(map(str, SEARCHED_NFES)),
                        help="NFEs to search schedules for ('' for none)")
    parser.add_argument("--search-solver", default=None, help="solver of the searched schedules [default: the fast "
                                                              "solver with the lowest mean FD at those NFEs]")
    parser.add_argument("--per-class", type=int, default=100, help="images per class per cell")
    parser.add_argument("--batch", type=int, default=500, help="rows per network call")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md and the plot")
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="only write RESULTS.md's section and the plot from a saved results/solvers.json")
    args = parser.parse_args(argv)
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
    nfes = [int(n) for n in args.nfes.split(",") if n.strip()]
    searched = [int(n) for n in args.searched_nfes.split(",") if n.strip()]
    if args.render:
        import json

        out = json.load(open(args.render, encoding="utf-8"))
        write_section(markdown(out, out["cpu"], solvers, nfes))
        plot(out, solvers, nfes)
        print(f"wrote {RESULTS_MD} (section) and {PLOT} from {args.render}")
        return out
    cpu = cpu_info()
    print(f"CPU: {cpu['model']} ({cpu['logical_cpus']} logical CPUs)")
    ckpt = digits_checkpoint(args.ckpt, print)
    with tempfile.TemporaryDirectory(prefix="edm-solvers-") as tmp:
        out = run(ckpt, tmp, solvers, nfes, searched, args.search_solver, args.per_class, args.batch, print)
    out["cpu"] = cpu
    out["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out["verdicts"] = verdicts(out)
    rows = [[s] + [("" if not out["grid"].get(f"{s}@{n}") else out["grid"][f"{s}@{n}"]["fd"]) for n in nfes]
            for s in solvers]
    print(table(rows, ["FD"] + [f"NFE {n}" for n in nfes]))
    for key, v in out["verdicts"].items():
        if isinstance(v, dict):
            print(f"{key}: {v['solver']} FD {v['fd']:.4f} = {v['ratio']:.3f}x Heun-35 ({'met' if v['met'] else 'NOT met'})")
    if not args.no_write:
        write_section(markdown(out, cpu, solvers, nfes))
        plot(out, solvers, nfes)
        print(f"wrote {RESULTS_MD} (section) and {PLOT}")
    print(f"saved {save('solvers', out)}")
    return out


if __name__ == "__main__":
    main()
