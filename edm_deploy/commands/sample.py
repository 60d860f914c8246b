"""`edm-deploy sample`: seeds -> images from a .plan, .onnx or .pt model."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Optional

import click

from edm_deploy.commands.common import (
    AsciiInt,
    FiniteFloat,
    backend_options,
    load_from_options,
    output_options,
    sampler_options,
    settings_from,
)
from edm_deploy.runtime.core.errors import InputError
from edm_deploy.runtime.output.writers import OUTPUT_KINDS


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(dir_okay=False))
@output_options
@click.option("-n", "num", type=AsciiInt(min=1), default=None, help="Sample seeds 0..N-1.")
@click.option("--seeds", default=None, help="Seed list, e.g. 0-63,100  [default: 0-63].")
@click.option("--class", "class_idx", default=None, help="Class label for all images, or one per seed as a list like --seeds (0-9,3) [default: random per seed].")
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per denoiser batch.")
@click.option("--fixed-batch", type=click.IntRange(min=1), default=None, help="Always run the network on exactly this many rows (splitting and padding), so images are bit-identical at any --batch.")
@click.option("--subdirs", is_flag=True, help="One folder per 1000 seeds (as the reference).")
@click.option("--shard", default=None, help="Take shard i of n of the seeds ('i/n'); torchrun's RANK/WORLD_SIZE by default.")
@click.option("--workers", type=click.IntRange(min=1, max=64), default=2, show_default=True, help="PNG encoding threads.")
@click.option("--grid-cols", type=click.IntRange(min=1), default=None, help="Grid width in images.")
@click.option("--grid-scale", type=click.IntRange(1, 64), default=1, show_default=True, help="Grid pixels per image pixel (enlarges small images).")
@click.option("--guide", type=click.Path(dir_okay=False), default=None, help="Autoguidance: the guide model (any file sample loads: an early snapshot, a smaller model); needs --guidance.")
@click.option("--guidance", type=FiniteFloat(), default=None, help="Guidance weight W: D = D_guide + W (D - D_guide); without --guide, classifier-free (needs a model trained with --cond-drop).")
@click.option("--guidance-interval", default=None, help="Guide only at noise levels LO < sigma <= HI, e.g. 0.28,1.6 [default: always].")
@click.option("--profile", is_flag=True, help="Also report the time inside the network and the sampler overhead (synchronises the device after each evaluation).")
@sampler_options
@backend_options
def sample(model: str, **params: Any) -> None:
    """Generate images with the EDM sampler around an exported or trained denoiser.

    A rerun with the same arguments checks the images already there (each must decode at the
    model's size; damaged ones are redone), skips the complete ones and samples the rest, so a
    killed run loses nothing. A rerun with another model, class, sampler setting or batch size
    into the same output is refused, as is a folder holding images this tool did not write, and
    a second process writing the same output at the same time.

    The same seed gives the same image at the same --batch and seed list, bit for bit, also
    after a resume (a partly written batch is sampled again whole), sharded or not. Across batch
    sizes a compiled network may pick other kernels, so a few pixels of a few images can differ
    by one level; --fixed-batch N makes every network call N rows and the images identical at
    any --batch, at the cost of the padding when --batch is not a multiple of N.

    \b
    Examples:
      edm-deploy sample model.onnx -n 50000 --outdir out --subdirs --batch 256
      edm-deploy sample model.plan --seeds 0-63 --grid grid.png
      edm-deploy sample ckpt.pt --class 3 -n 16 --npz threes.npz --steps 40
      torchrun --nproc_per_node=4 -m edm_deploy.cli sample model.onnx -n 50000 --outdir out
    """
    from edm_deploy.runtime.core.fileio import refuse_overwriting_inputs, sha256_file
    from edm_deploy.runtime.core.timing import TimedDenoiser
    from edm_deploy.runtime.output.writers import check_output, open_output, outputs_for_shard, written_paths
    from edm_deploy.runtime.sampling.fixed_shape import FixedShapeDenoiser
    from edm_deploy.runtime.sampling.generate import guided, run_record, sample_into
    from edm_deploy.runtime.sampling.guidance import check_guidance_args
    from edm_deploy.runtime.sampling.noise import check_class
    from edm_deploy.runtime.sampling.planner import plan_sampling
    from edm_deploy.runtime.sampling.schedule_file import mismatch_warnings
    from edm_deploy.runtime.sampling.seeds import parse_seeds, parse_shard, seeds_from_count, shard_batches
    from edm_deploy.runtime.sampling.solvers import get_solver

    if params["num"] is not None and params["seeds"] is not None:
        raise InputError("give either -n or --seeds, not both")
    seeds = seeds_from_count(params["num"]) if params["num"] is not None else parse_seeds(
        "0-63" if params["seeds"] is None else params["seeds"])
    classes = _classes(params["class_idx"], seeds)
    rank, world = parse_shard(params["shard"])
    outputs = outputs_for_shard({k: params[kind.param] for k, kind in OUTPUT_KINDS.items()}, (rank, world))
    refuse_overwriting_inputs({"MODEL": model, "--guide": params["guide"]}, written_paths(outputs))
    interval = _interval(params["guidance_interval"])
    check_guidance_args(bool(params["guide"]), params["guidance"], interval)
    batches = shard_batches(seeds, params["batch_size"], rank, world)
    my_seeds = [s for b in batches for s in b]
    if not my_seeds:
        click.echo(f"done: nothing to do, shard {rank}/{world} holds none of the {len(seeds)} seeds")
        return

    # Output first: an unwritable or invalid destination fails before the model loads (nothing is created yet).
    check_output(len(my_seeds), outputs, grid_columns=params["grid_cols"], grid_scale=params["grid_scale"],
                 shard=(rank, world))
    settings, schedule_meta = settings_from(params)
    with contextlib.ExitStack() as models:
        den = models.enter_context(load_from_options(model, params))
        guide = (models.enter_context(load_from_options(params["guide"], params, only_applicable=True))
                 if params["guide"] else None)
        check_class(None if classes is None else list(classes.values()), den.label_dim, len(classes or ()))
        if params["guidance"] is not None and guide is None and den.label_dim and den.label_dropout is not None \
                and den.label_dropout <= 0:
            raise InputError("--guidance without --guide is classifier-free guidance, which needs a model trained with "
                             "label dropout (edm-deploy train --cond-drop P); this one was trained without: "
                             "pass --guide GUIDE for autoguidance instead")
        if params["fixed_batch"] is not None:
            den, guide = (None if m is None else FixedShapeDenoiser(m, params["fixed_batch"]) for m in (den, guide))
        runner = guided(den, guide, params["guidance"], interval)
        # Planned on the composed runner: a guide narrows the sigma range both models cover.
        plan = plan_sampling(runner, settings)  # checked on the model before any output is touched
        model_sha256 = sha256_file(model)
        spec = get_solver(plan.solver)
        used = dict(afs=settings.afs, nfe=plan.nfe, max_order=settings.max_order or spec.max_order,
                    denoise_to_zero=None if spec.appends_zero else bool(plan.sigmas[-1] == 0))
        for note in runner.warnings + plan.warnings + mismatch_warnings(schedule_meta, model_sha256, plan.solver, **used):
            click.echo(f"warning: {note}", err=True)
        if plan.from_manifest:
            click.echo(f"time points: the model's own for {plan.solver} at NFE {plan.nfe} (its manifest): "
                       f"{', '.join(f'{v:.4g}' for v in plan.sigmas)}", err=True)
        record = run_record(model_sha256, _class_record(classes), settings, batch_size=params["batch_size"],
                            fixed_batch=params["fixed_batch"], solver=plan.solver,
                            time_points=[float(v) for v in plan.sigmas],
                            guide_sha256=sha256_file(params["guide"]) if params["guide"] else None,
                            guidance=params["guidance"], guidance_interval=None if interval is None else list(interval),
                            numerics=runner.numerics(), subdirs=bool(params["subdirs"]) if params["outdir"] else None)
        if params["profile"]:
            runner = TimedDenoiser(runner)
        image_shape = (den.img_resolution, den.img_resolution, den.img_channels)
        with open_output(record, my_seeds, outputs, subdirs=params["subdirs"], workers=params["workers"],
                         grid_columns=params["grid_cols"], grid_scale=params["grid_scale"], image_shape=image_shape,
                         shard=(rank, world)) as writer:
            missing = [[s for s in b if not writer.is_done(s)] for b in batches]
            todo = [b for b, m in zip(batches, missing) if m]  # a partly done batch is sampled again whole
            total = sum(len(m) for m in missing)
            click.echo(f"sampling {total} images with {runner.describe()}"
                       + (f" (shard {rank}/{world})" if world > 1 else "")
                       + (f", {len(my_seeds) - total} already done" if len(my_seeds) > total else ""), err=True)
            from tqdm import tqdm

            start = time.perf_counter()
            with tqdm(total=total, unit="img", dynamic_ncols=True, disable=None) as bar:
                written = sample_into(runner, writer, todo, classes, progress=bar.update, plan=plan)
            wall = time.perf_counter() - start

    if written:
        line = f"done: {written} images, {plan.solver} NFE {plan.nfe}/image, {wall:.1f} s, {written / wall:.2f} img/s"
        if params["profile"]:
            overhead = max(0.0, 1 - runner.eval_seconds / wall) if wall > 0 else 0.0
            line += f"; denoiser {runner.eval_seconds:.1f} s, sampler+I/O overhead {overhead:.1%}"
        click.echo(line)
    else:
        click.echo("done: nothing to do, every image already exists")
    click.echo(f"output: {next(iter(outputs.values()))}")


def _classes(text: Optional[str], seeds: list[int]) -> Optional[dict[int, int]]:
    """--class N (every image) or a list with one class per seed ('0-9,3', as --seeds is written): seed -> class."""
    if text is None:
        return None
    values: list[int] = []
    for part in str(text).split(","):
        lo, _, hi = part.strip().partition("-")
        first, last = _one_class(lo, text), _one_class(hi, text) if hi else None
        if last is not None and last < first:
            raise InputError(f"--class {text!r}: the range {part.strip()} ends before it starts")
        values.extend(range(first, (first if last is None else last) + 1))
        if len(values) > len(seeds):
            break
    if len(values) == 1:
        return {s: values[0] for s in seeds}
    if len(values) != len(seeds):
        raise InputError(f"--class lists {len(values)} classes for {len(seeds)} seeds; give one per seed or one for all")
    return dict(zip(seeds, values))


def _one_class(part: str, text: str) -> int:
    from edm_deploy.runtime.sampling.seeds import is_number_text

    if not is_number_text(part.strip()):
        raise InputError(f"--class {text!r} must be a class number or a list of them like --seeds, e.g. 3 or 0-9,3")
    return int(part)


def _class_record(classes: Optional[dict[int, int]]) -> Any:
    """The run record's class: one number when all share it (as before), else the list in seed order."""
    if classes is None:
        return None
    values = list(classes.values())
    return values[0] if len(set(values)) == 1 else values


def _interval(text: Optional[str]) -> Optional[tuple[float, float]]:
    """'LO,HI' -> (lo, hi); 'inf' allowed for HI. Checked again by the guidance itself."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise InputError(f"--guidance-interval {text!r} must be two numbers LO,HI, e.g. 0.28,1.6") from None
    from edm_deploy.runtime.sampling.guidance import check_interval

    return check_interval((lo, hi))
