"""The options of a training run: the schema, the checks, presets and the rules of a resume.

`TrainingOptions` is everything that defines a run (durations, half-lives and ramp-ups in kimg).
`check_options` checks every value before anything is built or written, each problem one
`InputError` naming the field (the CLI renames it to its flag). A resumed run keeps the options
stored in its resume point: only `RESUME_MUTABLE` may change (`check_resume_options`, shared by
the CLI and the Python API; `resume_options` builds them). `options_from_preset` applies a named
preset of `training.presets`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from edm_deploy.runtime.core.errors import InputError, param_error

from . import presets as presets_mod
from .checkpoint import load_checkpoint

if TYPE_CHECKING:
    import torch

RESUME_FILE = "ckpt.pt"


@dataclass
class TrainingOptions:
    """Everything that defines a run. Durations, half-lives and ramp-ups are in kimg."""

    data: str = "digits"                     # source spec: digits | folder | dataset .zip
    outdir: Optional[str] = None             # None: train in memory, write nothing
    cond: bool = False                       # class-conditional (needs labels)
    arch: str = "ddpmpp"                     # ddpmpp | ncsnpp | adm
    precond: str = "edm"                     # edm | vp | ve | iddpm
    batch: int = 512                         # global batch size (all ranks together)
    batch_gpu: Optional[int] = None          # per-rank batch per round (gradient accumulation)
    duration_kimg: float = 200000            # stop after this many thousand images
    lr: float = 1e-3
    lr_rampup_kimg: float = 10000
    ema_halflife_kimg: float = 500
    ema_rampup_ratio: Optional[float] = 0.05  # None: no EMA ramp-up (reference --transfer)
    dropout: float = 0.13
    cond_drop: float = 0.0                   # label dropout: the network's label_dropout (classifier-free guidance)
    augment: float = 0.12                    # AugmentPipe p; 0 disables the pipe (augment_dim 0)
    xflip: bool = False                      # dataset x-flips (doubles the dataset)
    fp16: bool = False                       # use_fp16 (takes effect on CUDA)
    loss_scaling: float = 1
    cbase: Optional[int] = None              # model_channels override
    cres: Optional[list] = None              # channel_mult override
    network_overrides: dict = field(default_factory=dict)  # any further inner-network kwargs
    seed: int = 0
    kimg_per_tick: float = 50
    snapshot_kimg: float = 2500              # weights-only snapshot + resume point every this many kimg
    ckpt_kimg: Optional[float] = None        # resume point interval (default: snapshot_kimg)
    ckpt_seconds: Optional[float] = 600      # also a resume point at the first tick this long after the last
    resume: Optional[str] = None             # path of a ckpt.pt to continue
    device: str = "auto"                     # auto | cpu | cuda
    deterministic: bool = True               # torch.use_deterministic_algorithms (warn-only)
    threads: Optional[int] = None            # CPU threads for torch (None: torch's default)
    max_images: Optional[int] = None         # use only the first N dataset images
    preset: Optional[str] = None             # the preset the options were built from (record)
    optimizer: str = "adam"                  # adam | radam (ECT tunes with RAdam)
    # Consistency tuning (training/consistency.py): ECT of the EDM checkpoint `tune_from`. The
    # ect_* fields are the ECT objective's (training/consistency_loss.py, ECTLoss).
    consistency: bool = False
    tune_from: Optional[str] = None          # the EDM checkpoint that consistency tuning starts from
    ect_q: float = 2.0                       # the gap t - r shrinks by q every stage
    ect_stage_kimg: float = 3200             # kimg per stage (ECT: --double 250 ticks of 12.8 kimg)
    ect_k: float = 8.0                       # r(t)'s sigmoid adjustment 1 + k sigmoid(-b t)
    ect_b: float = 1.0
    ect_c: float = 0.0                       # pseudo-Huber c; 0: the L2 distance (ECT's default)
    ect_p_mean: float = -1.1                 # ln t ~ N(ect_p_mean, ect_p_std^2)
    ect_p_std: float = 2.0

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict) -> TrainingOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# What a resumed run may change: where it writes, how long it runs, how it reports, how each
# process splits its share of the batch into rounds, and where it runs. Everything else shapes
# the training trajectory and must equal the checkpoint's options.
RESUME_MUTABLE = frozenset({
    "outdir", "resume", "duration_kimg", "kimg_per_tick", "snapshot_kimg", "ckpt_kimg", "ckpt_seconds", "batch_gpu",
    "device", "threads", "preset",
})


def stored_options(ckpt: dict, path: str) -> dict:
    """The options the resume point `path` was trained with, today's defaults for fields it predates."""
    state = ckpt.get("training_state")
    if state is None:
        raise InputError(f"{path} holds weights only (a snapshot); resume from a run's {RESUME_FILE}")
    defaults = TrainingOptions().to_dict()
    stored = dict(defaults)
    stored.update({k: v for k, v in state["options"].items() if k in defaults})
    return stored


def resume_options(path: str, **changes: Any) -> TrainingOptions:
    """The options stored in the resume point `path`, with `changes` applied (None values ignored).

    This is how to continue a run through the API: ``training_loop(resume_options(ckpt,
    duration_kimg=...))``. Only the fields in `RESUME_MUTABLE` may differ from the stored ones;
    anything else is refused here (and again by `training_loop`) with one InputError.
    """
    ckpt = load_checkpoint(path)
    values = stored_options(ckpt, path)
    values.update({k: v for k, v in changes.items() if v is not None})
    values["resume"] = path
    options = TrainingOptions.from_dict(values)
    check_resume_options(options, ckpt, path)
    return options


def check_resume_options(options: TrainingOptions, ckpt: dict, path: str) -> None:
    """Refuse a resume whose options differ from the checkpoint's outside `RESUME_MUTABLE`."""
    stored = stored_options(ckpt, path)
    given = options.to_dict()
    changed = [k for k in given if k not in RESUME_MUTABLE and given[k] != stored.get(k)]
    if changed:
        detail = ", ".join(f"{k}: {stored.get(k)!r} in the run, {given[k]!r} now" for k in changed)
        raise InputError(
            f"resume continues the stored run, so these options cannot change: {detail} "
            f"(changeable: {', '.join(sorted(RESUME_MUTABLE - {'resume', 'preset'}))})",
            param=["resume", *changed],
        )


def options_from_preset(name: Optional[str], **overrides: Any) -> TrainingOptions:
    """Options = defaults <- preset <- explicit overrides (None values are ignored)."""
    values: dict[str, Any] = {}
    if name is not None:
        values.update(presets_mod.preset(name))
        values["preset"] = name
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainingOptions.from_dict(values)


def consistency_options(tune_from: str, preset: Optional[str] = None, **overrides: Any) -> TrainingOptions:
    """Options for consistency tuning (ECT) of the EDM checkpoint `tune_from`.

    Options = defaults <- ECT's published settings (`presets.CONSISTENCY_DEFAULTS`) <- the
    consistency preset `preset` (`presets.CONSISTENCY_PRESETS`) <- explicit overrides (None values
    ignored). The network, and so whether the run is class-conditional, is the checkpoint's:
    ``cond`` follows its label_dim unless given.
    """
    values: dict[str, Any] = dict(presets_mod.CONSISTENCY_DEFAULTS)
    if preset is not None:
        values.update(presets_mod.consistency_preset(preset))
        values["preset"] = preset
    ckpt = load_checkpoint(tune_from)
    values["cond"] = int(ckpt["network"]["init_kwargs"].get("label_dim", 0) or 0) > 0
    values.update({k: v for k, v in overrides.items() if v is not None})
    values.update(consistency=True, tune_from=tune_from)
    return TrainingOptions.from_dict(values)


# Every number an option may hold: field -> (rule, what the rule says). Each must also be finite:
# an infinite duration never ends, a NaN compares False with everything and slips through bounds.
_NUMBER_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "duration_kimg": (lambda v: v > 0, "a positive number of kimg"),
    "lr": (lambda v: v > 0, "a positive number"),
    "lr_rampup_kimg": (lambda v: v >= 0, "a non-negative number of kimg"),
    "ema_halflife_kimg": (lambda v: v >= 0, "a non-negative number of kimg"),
    "ema_rampup_ratio": (lambda v: v >= 0, "a non-negative number (or None: no ramp-up)"),
    "dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "cond_drop": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "augment": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "loss_scaling": (lambda v: v > 0, "a positive number"),
    "kimg_per_tick": (lambda v: v > 0, "a positive number of kimg"),
    "snapshot_kimg": (lambda v: v > 0, "a positive number of kimg"),
    "ckpt_kimg": (lambda v: v > 0, "a positive number of kimg (or None: every snapshot_kimg)"),
    "ckpt_seconds": (lambda v: v >= 0, "a non-negative number of seconds (0 or None: by kimg only)"),
    "ect_q": (lambda v: v > 1, "a number above 1"),
    "ect_stage_kimg": (lambda v: v > 0, "a positive number of kimg"),
    "ect_k": (lambda v: v >= 0, "a non-negative number"),
    "ect_b": (lambda v: v >= 0, "a non-negative number"),
    "ect_c": (lambda v: v >= 0, "a non-negative number (0: the L2 distance)"),
    "ect_p_mean": (lambda v: True, "a number"),
    "ect_p_std": (lambda v: v > 0, "a positive number"),
}
_OPTIONAL_NUMBERS = {"ema_rampup_ratio", "ckpt_kimg", "ckpt_seconds"}
OPTIMIZERS = ("adam", "radam")
# The options a consistency tuning takes from its checkpoint (the network and what shapes it).
_NETWORK_FIELDS = ("arch", "precond", "cbase", "cres", "network_overrides", "cond_drop")
_ECT_FIELDS = ("ect_q", "ect_stage_kimg", "ect_k", "ect_b", "ect_c", "ect_p_mean", "ect_p_std")
# Integer fields -> smallest value (None: any integer).
_INTEGER_RULES = {"batch": 1, "batch_gpu": 1, "seed": None, "cbase": 1, "max_images": 1, "threads": 1}
_OPTIONAL_INTEGERS = {"batch_gpu", "cbase", "max_images", "threads"}


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity where the OS tells, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_options(o: TrainingOptions, world_size: int = 1) -> None:
    """Every option problem as one InputError naming the field, before anything is built or written."""
    for name, (rule, what) in _NUMBER_RULES.items():
        value = getattr(o, name)
        if value is None and name in _OPTIONAL_NUMBERS:
            continue
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise param_error(name, f"{name} must be {what}, got {value!r}")
        if not math.isfinite(value):
            raise param_error(name, f"{name} must be a finite number ({what}), got {value!r}")
        if not rule(value):
            raise param_error(name, f"{name} must be {what}, got {value!r}")
    for name, low in _INTEGER_RULES.items():
        value = getattr(o, name)
        if value is None and name in _OPTIONAL_INTEGERS:
            continue
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or (low is not None and value < low):
            raise param_error(name, f"{name} must be an integer{f' >= {low}' if low is not None else ''}, "
                                      f"got {value!r}")
    presets_mod.arch_kwargs(o.arch)
    presets_mod.precond_classes(o.precond)
    if o.optimizer not in OPTIMIZERS:
        raise param_error("optimizer", f"unknown optimizer {o.optimizer!r} (choose one of {', '.join(OPTIMIZERS)})")
    _check_consistency_options(o)
    if o.cond_drop > 0 and not o.cond:
        raise param_error("cond_drop", "cond_drop (label dropout) needs class-conditional training (cond)")
    if o.batch % world_size:
        raise param_error("batch", f"batch {o.batch} is not divisible by the {world_size} training processes")
    per_rank = o.batch // world_size
    if o.batch_gpu is not None and per_rank % o.batch_gpu:
        raise param_error("batch_gpu", f"batch_gpu {o.batch_gpu} must divide the per-process batch {per_rank}")
    if o.threads is not None and o.threads > cpu_count():
        raise param_error("threads", f"threads must be at most {cpu_count()} (the CPUs this process may use), "
                                       f"got {o.threads}")
    if o.cres is not None and (not isinstance(o.cres, (list, tuple)) or not o.cres
                               or any(not isinstance(c, numbers.Integral) or c < 1 for c in o.cres)):
        raise param_error("cres", f"cres must be a list of positive integers, got {o.cres!r}")
    if not isinstance(o.device, str) or not (o.device in ("auto", "cpu", "cuda") or o.device.startswith("cuda:")):
        raise param_error("device", f"unknown device {o.device!r} (auto, cpu, cuda or cuda:N)")
    if o.device.startswith("cuda:"):
        index = o.device.split(":", 1)[1]
        if not index.isdigit():
            raise param_error("device", f"device {o.device}: the GPU index must be a non-negative integer")
        if world_size > 1:
            raise param_error(
                "device",
                f"device {o.device} names one GPU, but {world_size} processes were started; use cuda (each "
                f"process then takes the GPU of its LOCAL_RANK; choose GPUs with CUDA_VISIBLE_DEVICES)")


def _check_consistency_options(o: TrainingOptions) -> None:
    """Consistency tuning needs its checkpoint and takes the network from it; ECT settings need it."""
    defaults = TrainingOptions()
    if not o.consistency:
        if o.tune_from is not None:
            raise param_error("tune_from", "tune_from is the checkpoint of a consistency tuning: add consistency "
                                             "(--consistency), or drop it to train from scratch")
        given = [name for name in _ECT_FIELDS if getattr(o, name) != getattr(defaults, name)]
        if given:
            raise param_error(given[0], f"{given[0]} is a setting of consistency tuning (ECT); it needs "
                                          f"consistency (--consistency --from CKPT)")
        return
    if not isinstance(o.tune_from, str) or not o.tune_from:
        raise param_error("tune_from", "consistency tuning starts from a trained EDM checkpoint: give it as "
                                         "tune_from (--from CKPT)")
    for name in _NETWORK_FIELDS:
        if getattr(o, name) != getattr(defaults, name):
            raise param_error(name, f"{name} cannot be set for a consistency tuning: the network is the one in "
                                      f"tune_from ({o.tune_from}), as it was trained")
    from .consistency_loss import MAX_GAP_SHRINK, ect_stage, stages_fit

    last = ect_stage(int(o.duration_kimg * 1000), o.ect_stage_kimg)
    if not stages_fit(o.ect_q, last):
        raise param_error("ect_stage_kimg", f"a tuning of {o.duration_kimg:g} kimg at {o.ect_stage_kimg:g} kimg "
                                              f"per stage reaches stage {last}, where the gap t - r has shrunk by "
                                              f"{o.ect_q:g}^{last + 1}, beyond float32's resolution (at most "
                                              f"{MAX_GAP_SHRINK:g}); raise ect_stage_kimg or tune for fewer kimg")


def check_device(o: TrainingOptions, device: torch.device) -> None:
    """Options that depend on where the run computes: fp16 is real only on CUDA."""
    if o.fp16 and device.type != "cuda":
        raise param_error(
            "fp16", f"fp16 needs a CUDA device: on {device.type} the network would compute in fp32 while its "
                    f"checkpoints record use_fp16 (train in fp32 there, or on a GPU)")
