"""`edm-deploy sample`: seeds -> images from a .plan, .onnx or .pt model."""

from __future__ import annotations

import os
import time
from typing import Any

import click

from edm_deploy.commands.common import (
    backend_options,
    load_from_options,
    sampler_kwargs_from,
    sampler_options,
)
from edm_deploy.runtime.errors import InputError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--outdir", type=click.Path(file_okay=False), default=None, help="Write one PNG per seed here.")
@click.option("--npz", "npz_path", type=click.Path(dir_okay=False), default=None, help="Write all images to one .npz (uint8 NHWC + seeds + labels).")
@click.option("--grid", "grid_path", type=click.Path(dir_okay=False), default=None, help="Write one grid PNG.")
@click.option("-n", "num", type=click.IntRange(min=1), default=None, help="Sample seeds 0..N-1.")
@click.option("--seeds", default=None, help="Seed list, e.g. 0-63,100  [default: 0-63].")
@click.option("--class", "class_idx", type=click.IntRange(min=0), default=None, help="Class label for all images [default: random per seed].")
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per denoiser batch.")
@click.option("--subdirs", is_flag=True, help="One folder per 1000 seeds (as the reference).")
@click.option("--shard", default=None, help="Take shard i of n of the seeds ('i/n'); torchrun's RANK/WORLD_SIZE by default.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="PNG encoding threads.")
@click.option("--grid-cols", type=click.IntRange(min=1), default=None, help="Grid width in images.")
@sampler_options
@backend_options
def sample(model: str, **params: Any) -> None:
    """Generate images with the EDM sampler around an exported or trained denoiser.

    A rerun with the same arguments skips the images that are already complete, so a killed run
    loses nothing (a rerun with another model, class or sampler setting into the same output is
    refused). The same seed gives the same image whatever the batch size: bit for bit on the
    CPU; GPU libraries may pick other kernels per batch size, so expect last-bit differences there.

    \b
    Examples:
      edm-deploy sample model.onnx -n 50000 --outdir out --subdirs --batch 256
      edm-deploy sample model.plan --seeds 0-63 --grid grid.png
      edm-deploy sample ckpt.pt --class 3 -n 16 --npz threes.npz --steps 40
      torchrun --nproc_per_node=4 -m edm_deploy.cli sample model.onnx -n 50000 --outdir out
    """
    from edm_deploy.runtime.generate import sample_batch
    from edm_deploy.runtime.sampling import nfe
    from edm_deploy.runtime.seeds import parse_seeds, parse_shard, shard_batches
    from edm_deploy.runtime.writers import GridWriter, NpzWriter, PngTreeWriter

    outputs = [p for p in (params["outdir"], params["npz_path"], params["grid_path"]) if p]
    if len(outputs) != 1:
        raise InputError("give exactly one output: --outdir DIR, --npz FILE or --grid FILE")
    if params["num"] is not None and params["seeds"] is not None:
        raise InputError("give either -n or --seeds, not both")
    seeds = list(range(params["num"])) if params["num"] is not None else parse_seeds(params["seeds"] or "0-63")
    rank, world = parse_shard(params["shard"])
    batches = shard_batches(seeds, params["batch_size"], rank, world)
    my_seeds = [s for b in batches for s in b]
    if not my_seeds:
        click.echo(f"done: nothing to do, shard {rank}/{world} holds none of the {len(seeds)} seeds")
        return

    # Output first: an unwritable destination fails before the model loads.
    if params["outdir"]:
        writer: Any = PngTreeWriter(params["outdir"], subdirs=params["subdirs"], workers=params["workers"])
    elif params["npz_path"]:
        path = params["npz_path"] if world == 1 else _shard_name(params["npz_path"], rank, world)
        writer = NpzWriter(path, my_seeds)
    else:
        if world > 1:
            raise InputError("--grid cannot be sharded; run it in one process")
        writer = GridWriter(params["grid_path"], len(my_seeds), columns=params["grid_cols"])

    den = load_from_options(model, params)
    if params["class_idx"] is not None:
        if den.label_dim == 0:
            raise InputError("this model is unconditional; --class cannot be used")
        if params["class_idx"] >= den.label_dim:
            raise InputError(f"--class {params['class_idx']} is out of range: this model has classes 0..{den.label_dim - 1}")
    for note in [getattr(den, "fallback_note", None), *getattr(den, "warnings", [])]:
        if note:
            click.echo(f"warning: {note}", err=True)

    kwargs = sampler_kwargs_from(params)
    if not params["grid_path"]:
        from edm_deploy.runtime.fileio import sha256_file
        from edm_deploy.runtime.writers import check_run_record

        record_dir = params["outdir"] or writer.parts_dir
        os.makedirs(record_dir, exist_ok=True)
        check_run_record(record_dir, {"model_sha256": sha256_file(model), "class": params["class_idx"],
                                      "sampler": {k: v for k, v in sorted(kwargs.items()) if v != float("inf")}})

    todo = [[s for s in b if not writer.is_done(s)] for b in batches]
    todo = [b for b in todo if b]
    total = sum(len(b) for b in todo)
    skipped = len(my_seeds) - total
    solver = kwargs.get("solver") or "heun"
    per_image_nfe = nfe(kwargs.get("num_steps", 18), solver)
    click.echo(f"sampling {total} images with {den.describe()}"
               + (f" (shard {rank}/{world})" if world > 1 else "")
               + (f", {skipped} already done" if skipped else ""), err=True)

    from tqdm import tqdm

    start = time.perf_counter()
    den.eval_seconds = 0.0
    try:
        with tqdm(total=total, unit="img", dynamic_ncols=True, disable=None) as bar:
            for batch in todo:
                images, labels = sample_batch(den, batch, params["class_idx"], kwargs)
                writer.submit(images, batch, labels)
                bar.update(len(batch))
    except BaseException:
        writer.abort()  # keep what is complete, write nothing partial
        raise
    writer.close()
    wall = time.perf_counter() - start
    if total:
        overhead = max(0.0, 1 - den.eval_seconds / wall) if wall > 0 else 0.0
        click.echo(
            f"done: {total} images, NFE {per_image_nfe}/image, {wall:.1f} s, {total / wall:.2f} img/s; "
            f"denoiser {den.eval_seconds:.1f} s, sampler+I/O overhead {overhead:.1%}"
        )
    else:
        click.echo("done: nothing to do, every image already exists")
    click.echo(f"output: {outputs[0] if world == 1 or not params['npz_path'] else _shard_name(params['npz_path'], rank, world)}")


def _shard_name(path: str, rank: int, world: int) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}.shard{rank}of{world}{ext}"


