"""`edm-deploy schedule`: search the time points a solver should take at a given NFE (GITS)."""

from __future__ import annotations

import os
import time
from typing import Any

import click

from edm_deploy.commands.common import POSITIVE, AsciiInt, FiniteFloat, backend_options, load_from_options
from edm_deploy.runtime.core.errors import InputError


def _choices():
    from edm_deploy.runtime.sampling.schedule_search import (
        METRICS,
        SEARCHABLE_SOLVERS,
        STEP_MODELS,
        TEACHER_SOLVERS,
    )

    return (*SEARCHABLE_SOLVERS, "consistency"), TEACHER_SOLVERS, METRICS, STEP_MODELS


_SOLVERS, _TEACHERS, _METRICS, _STEPS = _choices()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--solver", type=click.Choice(_SOLVERS), default="ipndm", show_default=True, help="The solver the schedule is for.")
@click.option("--nfe", type=click.IntRange(min=1, max=100_000), required=True, help="Network evaluations per image the schedule spends with --solver.")
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="Schedule file to write (.json), for `edm-deploy sample --sigmas FILE`.")
@click.option("--afs", is_flag=True, help="The schedule is for sampling with --afs (multistep solvers).")
@click.option("--denoise-to-zero", is_flag=True, help="The schedule is for sampling with --denoise-to-zero (its file ends in 0).")
@click.option("--max-order", type=click.IntRange(min=1, max=4), default=None, help="The solver's max order (multistep solvers) [default: the solver's].")
@click.option("--latents", "num_latents", type=click.IntRange(min=1, max=100_000), default=None, help="Teacher trajectories: seeds 0..N-1 [default: 256, as GITS].")
@click.option("--seeds", default=None, help="Seeds of the teacher trajectories instead, e.g. 1000-1255.")
@click.option("--class", "class_idx", type=AsciiInt(min=0), default=None, help="Class label of every trajectory [default: random per seed, as sample draws it].")
@click.option("--teacher", type=click.Choice(_TEACHERS), default="ipndm", show_default=True, help="Solver of the teacher trajectories.")
@click.option("--fine-points", type=click.IntRange(min=3, max=201), default=61, show_default=True, help="Points of the teacher's fine grid (EDM rho=7); the schedule is a subset of them.")
@click.option("--coeff", type=FiniteFloat(0, lo_open=True), default=1.15, show_default=True, help="Weight growth per step in the path's cost: sum_k coeff^k cost_k (GITS's 1.15).")
@click.option("--metric", type=click.Choice(_METRICS), default="l2", show_default=True, help="Step cost: l2 distance to the teacher, or GITS's deviation from the trajectory's chord.")
@click.option("--step", type=click.Choice(_STEPS), default="solver", show_default=True, help="Cost each step as the solver's own update (with its history), or as one Euler step (gits-main).")
@click.option("--sigma_min", type=POSITIVE, default=None, help="Lowest noise level [default: 0.002, clamped to the model's].")
@click.option("--sigma_max", type=POSITIVE, default=None, help="Highest noise level [default: 80, clamped to the model's].")
@click.option("--refine-latents", type=click.IntRange(min=0, max=100_000), default=64, show_default=True, help="Polish the path on the solver's real end-point error on this many latents (at most half; 0: the plain GITS path).")
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=256, show_default=True, help="Rows per network call.")
@click.option("--no-check", is_flag=True, help="Skip running the solver on the result and on EDM's schedule against the teacher.")
@click.option("--ref", default=None, metavar="NPZ",
              help="--solver consistency: the FID reference statistics (`edm-deploy fid ref`) the samples of each "
                   "candidate are compared with.")
@click.option("--detector", default=None, metavar="PATH",
              help="--solver consistency: the feature detector the reference was computed with (see `edm-deploy "
                   "fid --help`) [default: $EDM_DEPLOY_FID_DETECTOR].")
@backend_options
def schedule(model: str, **params: Any) -> None:
    """Search the time points for --solver at exactly --nfe network evaluations (GITS, ICML 2024).

    For a consistency-tuned model (--solver consistency, NFE 2 to 4) the points are chosen
    another way: each candidate on a grid (ECT's 0.821 among them) samples --latents held-out
    seeds, and the one whose features lie closest to --ref (Fréchet distance, the --detector's
    features) wins; `export --schedule FILE` makes it the model's default.

    A strong teacher integrates a few hundred latents on a fine grid; every step the solver
    could take between two fine points is costed by how far it lands from the teacher (the
    solver's own update, with the history a multistep solver carries); dynamic programming
    picks the cheapest path with exactly the steps the NFE buys, then polishes it on the
    solver's real end-point error (--refine-latents). Training-free: about two teacher runs'
    worth of network evaluations (61 per latent). The file records the model's
    sha256, the solver, the NFE and every search setting; `sample --sigmas FILE` uses it and
    warns when the model or solver differ.

    \b
    Examples:
      edm-deploy schedule model.onnx --solver ipndm --nfe 5 --out ipndm5.json
      edm-deploy schedule tuned.onnx --solver consistency --nfe 2 --ref ref.npz --detector inception.onnx --out c2.json
      edm-deploy sample model.onnx --solver ipndm --sigmas ipndm5.json -n 64 --grid grid.png
    """
    from edm_deploy.runtime.core.fileio import (
        refuse_foreign_file,
        refuse_overwriting_inputs,
        sha256_file,
        write_target,
    )
    from edm_deploy.runtime.output.writers import ensure_writable_dir
    from edm_deploy.runtime.sampling.noise import check_class
    from edm_deploy.runtime.sampling.schedule_file import is_schedule_file, write_schedule
    from edm_deploy.runtime.sampling.schedule_search import plan_search, search_schedule
    from edm_deploy.runtime.sampling.seeds import parse_seeds, seeds_from_count

    if params["solver"] == "consistency":
        return _consistency_points(model, params)
    if params["ref"] is not None or params["detector"] is not None:
        raise InputError("--ref and --detector apply to --solver consistency (its time points are chosen by FID)")
    out = params["out"]
    if params["num_latents"] is not None and params["seeds"] is not None:
        raise InputError("give either --latents or --seeds, not both")
    seeds = parse_seeds(params["seeds"]) if params["seeds"] is not None else seeds_from_count(params["num_latents"] or 256)
    # Every setting, then the output, before the model loads.
    plan_search(params["solver"], params["nfe"], afs=params["afs"], denoise_to_zero=params["denoise_to_zero"],
                max_order=params["max_order"], fine_points=params["fine_points"], teacher=params["teacher"],
                coeff=params["coeff"], metric=params["metric"], step=params["step"])
    out = write_target(out)  # a symlinked output is written through
    refuse_overwriting_inputs({"MODEL": model}, {"--out": out})
    if not out.lower().endswith(".json"):
        raise InputError(f"--out {out} must end in .json, the schedule file `sample --sigmas` reads")
    if os.path.isdir(out):
        raise InputError(f"--out {out} is a folder; give a .json file name")
    ensure_writable_dir(os.path.dirname(os.path.abspath(out)))
    refuse_foreign_file(out, "--out", is_schedule_file, "a schedule file")
    model_sha256 = sha256_file(model)
    den = load_from_options(model, params)
    with den:
        check_class(params["class_idx"], den.label_dim)
        from edm_deploy.runtime.sampling.schedule_search import model_warnings

        for note in list(den.warnings) + model_warnings(den):
            click.echo(f"warning: {note}", err=True)
        click.echo(f"searching {params['solver']} time points for NFE {params['nfe']} on {len(seeds)} teacher "
                   f"trajectories ({params['teacher']}, {params['fine_points']} points) with {den.describe()}", err=True)
        from tqdm import tqdm

        bars: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            bar = bars.get(stage)
            if bar is None:
                for other in bars.values():
                    other.close()
                bar = bars[stage] = tqdm(total=total, desc=stage, dynamic_ncols=True, disable=None, leave=False)
            bar.update(done - bar.n)

        start = time.perf_counter()
        try:
            result = search_schedule(
                den, params["solver"], params["nfe"], seeds=seeds, class_idx=params["class_idx"], afs=params["afs"],
                denoise_to_zero=params["denoise_to_zero"], max_order=params["max_order"], teacher=params["teacher"],
                fine_points=params["fine_points"], coeff=params["coeff"], metric=params["metric"], step=params["step"],
                sigma_min=params["sigma_min"], sigma_max=params["sigma_max"], batch_size=params["batch_size"],
                refine_latents=params["refine_latents"], check=not params["no_check"], progress=progress)
        finally:
            for bar in bars.values():
                bar.close()
        wall = time.perf_counter() - start
    write_schedule(out, result.sigmas, model_sha256=model_sha256, **result.metadata())
    click.echo(f"sigmas: {', '.join(f'{v:.4g}' for v in result.sigmas)}")
    click.echo(f"{result.solver} NFE {result.nfe}; path through fine points {result.path} of {len(result.fine_sigmas)}; "
               f"cost {result.cost:.4g}")
    refine = result.settings.get("refine")
    if refine:
        click.echo(f"polish: end-point RMS error {refine['dp_end_rms']:.4g} -> {refine['end_rms']:.4g} on "
                   f"{refine['latents']} latents ({refine['evaluations']} solver runs); programme's path {refine['dp_path']}")
    if result.check:
        c = result.check
        verdict = "better" if c["searched_rms"] < c["edm_rho7_rms"] else "NOT better"
        where = f"{c['latents']} latents" + (" the polish did not use" if refine else "")
        click.echo(f"check: end-point RMS error against the teacher on {where}: {c['searched_rms']:.4g} with this "
                   f"schedule, {c['edm_rho7_rms']:.4g} with EDM rho=7 ({verdict})")
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    click.echo(f"done: {wall:.1f} s ({parts})")
    click.echo(f"output: {out}")


GITS_ONLY = ("afs", "denoise_to_zero", "max_order", "teacher", "fine_points", "coeff", "metric", "step", "sigma_min",
             "refine_latents", "no_check")


def _consistency_points(model: str, params: dict[str, Any]) -> None:
    """`--solver consistency`: the time points of the grid whose samples are closest to --ref in features."""
    from edm_deploy.runtime.core.fileio import (
        refuse_foreign_file,
        refuse_overwriting_inputs,
        sha256_file,
        write_target,
    )
    from edm_deploy.runtime.fid.fid import check_reference_fits, load_detector, load_ref
    from edm_deploy.runtime.output.writers import ensure_writable_dir
    from edm_deploy.runtime.sampling.consistency_points import choose_consistency_points
    from edm_deploy.runtime.sampling.schedule_file import is_schedule_file, write_schedule
    from edm_deploy.runtime.sampling.seeds import parse_seeds, seeds_from_count

    defaults = {p.name: (p.default if isinstance(p.default, (int, float, str, type(None))) else False)
                for p in schedule.params}  # a flag's default is click's sentinel: unset means off
    given = [name for name in GITS_ONLY if params[name] not in (defaults[name], None)]
    if given:
        raise InputError(f"--{given[0].replace('_', '-')} does not apply to --solver consistency (its time points are "
                         f"chosen on a grid by FID, not searched along an ODE)")
    if params["ref"] is None:
        raise InputError("--solver consistency needs --ref: the reference statistics its candidates are compared "
                         "with (`edm-deploy fid ref --data DATASET --dest ref.npz`)")
    if params["num_latents"] is not None and params["seeds"] is not None:
        raise InputError("give either --latents or --seeds, not both")
    if params["class_idx"] is not None:
        raise InputError("--class does not apply to --solver consistency (every class is sampled alike)")
    seeds = parse_seeds(params["seeds"]) if params["seeds"] is not None else \
        [300_000 + s for s in seeds_from_count(params["num_latents"] or 1000)]
    out = write_target(params["out"])
    refuse_overwriting_inputs({"MODEL": model, "--ref": params["ref"], "--detector": params["detector"]},
                              {"--out": out})
    if not out.lower().endswith(".json") or os.path.isdir(out):
        raise InputError(f"--out {out} must name a .json file, the schedule file `sample --sigmas` reads")
    ensure_writable_dir(os.path.dirname(os.path.abspath(out)))
    refuse_foreign_file(out, "--out", is_schedule_file, "a schedule file")
    reference = load_ref(params["ref"])
    detector = load_detector(params["detector"])
    check_reference_fits(reference[0], detector, f"--ref {params['ref']}")
    model_sha256 = sha256_file(model)
    with load_from_options(model, params) as den:
        if not getattr(den, "consistency_tuned", False):
            click.echo("warning: this model is not consistency-tuned; the consistency solver will give poor images",
                       err=True)
        click.echo(f"choosing consistency time points for NFE {params['nfe']} on {len(seeds)} seeds with "
                   f"{den.describe()}", err=True)

        def features(images):
            return detector(images if images.shape[1] == 3 else images.repeat(3, axis=1))

        def progress(done: int, total: int) -> None:
            click.echo(f"  candidate {done}/{total}", err=True)

        choice = choose_consistency_points(den, params["nfe"], features, reference, seeds=seeds,
                                           sigma_max=params["sigma_max"] or 80.0, batch_size=params["batch_size"],
                                           progress=progress)
    write_schedule(out, choice.sigmas, model_sha256=model_sha256, **choice.metadata())
    for row in choice.tried:
        click.echo(f"  {', '.join(f'{v:g}' for v in row['sigmas'])}: FD {row['fd']:.4g}")
    click.echo(f"sigmas: {', '.join(f'{v:g}' for v in choice.sigmas)} ({choice.seconds:.0f} s)")
    click.echo(f"output: {out}")
