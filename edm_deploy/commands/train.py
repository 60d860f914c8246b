"""`edm-deploy train`: train an EDM denoiser (the reference `train.py`, with presets), or
consistency-tune one (``--consistency --from CKPT``, ECT: `training.consistency_loss`).

The flags are `TrainingOptions` fields, unset unless given so that a preset or a resumed run
keeps its own values; what a run writes, how it resumes and what it refuses is the training
loop's (docs/DESIGN.md, "Training runs").
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import click

from edm_deploy.runtime.core.errors import InputError
from edm_deploy.training.options import OPTIMIZERS, TrainingOptions
from edm_deploy.training.presets import ARCHS, CONSISTENCY_DEFAULTS, CONSISTENCY_PRESETS, PRECONDS, PRESETS


def _parse_cres(text: Optional[str]) -> Optional[list]:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as exc:
        raise InputError(f"--cres must be comma-separated integers such as 1,2,2,2, got {text!r}") from exc
    if not values or min(values) < 1:
        raise InputError(f"--cres must be comma-separated positive integers, got {text!r}")
    return values


def _shown(value: Any, decl: str) -> str:
    """A default as the user types it: a boolean as the flag that gives it."""
    if isinstance(value, bool):
        on, _, off = decl.partition("/")
        return (on if value else off).lstrip("-")
    return f"{value:g}" if isinstance(value, float) else str(value)


def _field(decl: str, name: str, help_text: str, **kwargs: Any) -> Callable:
    """A flag for the `TrainingOptions` field ``name``: unset (None) unless given, so a preset or a
    resumed run keeps its own value; the help shows the field's default and, where consistency
    tuning starts from another one (`presets.CONSISTENCY_DEFAULTS`), that one."""
    default = _DEFAULTS[name]
    shown = [_shown(default, decl)]
    if name in CONSISTENCY_DEFAULTS and CONSISTENCY_DEFAULTS[name] != default:
        shown.append(f"{_shown(CONSISTENCY_DEFAULTS[name], decl)} with --consistency")
    return click.option(decl, name, default=None, help=f"{help_text}  [default: {'; '.join(shown)}]", **kwargs)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainingOptions)}


@click.command("train", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", metavar="SRC", default=None,
              help="Training data: `digits` (built-in 8x8 digits), an image folder or a dataset ZIP "
                   "(see `edm-deploy dataset`).  [default: the preset's, else required]")
@click.option("--outdir", metavar="DIR", required=True, help="Run folder (created).")
@click.option("--preset", metavar="NAME", default=None,
              help=f"Start from a named configuration: {', '.join(PRESETS)} (tiny: 8x8 digits on a CPU). Explicit "
                   "flags override it.")
@_field("--cond/--uncond", "cond", "Class-conditional training (needs labels).")
@_field("--arch", "arch", "Network architecture.", metavar="|".join(ARCHS))
@_field("--precond", "precond", "Preconditioning and loss.", metavar="|".join(PRECONDS))
@_field("--batch", "batch", "Total batch size.", type=int)
@click.option("--batch-gpu", "batch_gpu", type=int, default=None, help="Batch per process per round (gradient accumulation).")
@_field("--duration", "duration_kimg", "Training length in thousands of images (the reference CLI uses Mimg).",
        type=float, metavar="KIMG")
@_field("--lr", "lr", "Learning rate.", type=float)
@_field("--lr-rampup", "lr_rampup_kimg", "Linear lr warm-up.", type=float, metavar="KIMG")
@_field("--ema", "ema_halflife_kimg", "EMA half-life.", type=float, metavar="KIMG")
@_field("--augment", "augment", "Augmentation probability.", type=float, metavar="P")
@_field("--dropout", "dropout", "Dropout probability.", type=float)
@_field("--cond-drop", "cond_drop", "Label dropout: train the unconditional branch too, for classifier-free guidance "
        "(sample --guidance).", type=float, metavar="P")
@click.option("--xflip/--no-xflip", default=None, help="Add x-flipped copies of the dataset.")
@click.option("--fp16/--fp32", default=None, help="Mixed-precision network (CUDA only).")
@_field("--ls", "loss_scaling", "Static loss scaling.", type=float)
@click.option("--cbase", type=int, default=None, help="Channel multiplier base (model_channels).")
@click.option("--cres", default=None, metavar="LIST", help="Channels per resolution, e.g. 1,2,2,2 (channel_mult).")
@_field("--seed", "seed", "Random seed.", type=int)
@_field("--tick", "kimg_per_tick", "Status interval.", type=float, metavar="KIMG")
@_field("--snap-kimg", "snapshot_kimg", "Snapshot + resume-point interval.", type=float, metavar="KIMG")
@click.option("--resume", metavar="CKPT", default=None,
              help="Continue a run from its ckpt.pt with its stored options; only --outdir, --duration, --tick, "
                   "--snap-kimg, --ckpt-seconds, --batch-gpu (then not bit-identical), --device and --threads "
                   "may change.")
@_field("--device", "device", "auto | cpu | cuda | cuda:N (N: single process only; under torchrun each process takes "
        "the GPU of its LOCAL_RANK).")
@click.option("--max-images", type=int, default=None, help="Use only the first N images of the dataset.")
@click.option("--threads", type=int, default=None,
              help="CPU threads for torch (1 is often fastest on a busy or 2-core machine).")
@_field("--ckpt-seconds", "ckpt_seconds", "Also write a resume point at the first tick S seconds after the last one "
        "(0: by kimg only).", type=float, metavar="S")
@_field("--optim", "optimizer", "Optimizer.", metavar="|".join(OPTIMIZERS))
@click.option("--consistency", is_flag=True, default=None,
              help="Consistency tuning (ECT, Geng et al. 2024) of the EDM checkpoint --from into a 1-2 step model; "
                   f"--preset then names a consistency preset ({', '.join(CONSISTENCY_PRESETS)}).")
@click.option("--from", "tune_from", metavar="CKPT", default=None,
              help="With --consistency: the EDM checkpoint to tune (its network, classes and resolution are kept).")
@_field("--ect-q", "ect_q", "ECT: the gap t - r shrinks by Q every stage.", type=float, metavar="Q")
@_field("--ect-stage", "ect_stage_kimg", "ECT: kimg per stage.", type=float, metavar="KIMG")
@_field("--ect-k", "ect_k", "ECT: r(t)'s adjustment 1 + k sigmoid(-b t).", type=float)
@_field("--ect-b", "ect_b", "ECT: see --ect-k.", type=float)
@_field("--ect-c", "ect_c", "ECT: pseudo-Huber constant c; 0 is the L2 distance.", type=float)
@_field("--ect-p-mean", "ect_p_mean", "ECT: ln t ~ N(P_mean, P_std^2).", type=float)
@_field("--ect-p-std", "ect_p_std", "ECT: see --ect-p-mean.", type=float)
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.pass_context
def train(ctx: click.Context, **kw) -> None:
    """Train an EDM denoiser; writes checkpoints into --outdir.

    \b
    Example:
      edm-deploy train --preset tiny --outdir runs/digits            # ~3 min on 2 idle CPU cores
      edm-deploy train --data cifar10.zip --outdir runs/c10 --preset cifar10 --batch-gpu 64
      edm-deploy train --outdir runs/digits --resume runs/digits/ckpt.pt --duration 600
      torchrun --nproc_per_node=8 -m edm_deploy.cli train --data ffhq-64x64.zip --outdir runs/ffhq --preset ffhq64
      edm-deploy train --consistency --from runs/digits/ckpt.pt --preset tiny --outdir runs/digits-ect
    """
    from edm_deploy.training.options import consistency_options, options_from_preset, resume_options
    from edm_deploy.training.training_loop import training_loop

    fields = {f.name for f in dataclasses.fields(TrainingOptions)}
    given = {
        name for name in kw
        if ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)
    }
    overrides = {k: v for k, v in kw.items() if k in fields and k in given and k not in ("preset", "resume")}
    if "cres" in overrides:
        overrides["cres"] = _parse_cres(overrides["cres"])

    if kw["resume"] is not None:
        if kw["preset"] is not None:
            raise InputError(
                f"--preset cannot be combined with --resume: a resumed run keeps the options stored in "
                f"{kw['resume']} (its preset included); drop --preset, or start a new run with it"
            )
        # The stored options plus the flags given now; the loop's resume check (shared with the
        # Python API) refuses any change outside RESUME_MUTABLE. A flag repeating the stored value
        # is accepted.
        options = resume_options(kw["resume"], **overrides)
    elif kw["consistency"]:
        if kw["tune_from"] is None:
            raise InputError("--consistency tunes a trained EDM checkpoint: give it with --from CKPT")
        if kw["data"] is None and kw["preset"] is None:
            raise InputError("--data is required: the data the --from model was trained on (or --preset tiny "
                             "for the digits)")
        overrides = {k: v for k, v in overrides.items() if k not in ("consistency", "tune_from")}
        options = consistency_options(kw["tune_from"], kw["preset"], **overrides)
    else:
        if kw["data"] is None and kw["preset"] is None:
            raise InputError("--data is required (or pick a --preset that names its data, e.g. tiny)")
        options = options_from_preset(kw["preset"], **overrides)
    training_loop(options, echo=click.echo, progress=kw["progress"])
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"checkpoints in {options.outdir}")
