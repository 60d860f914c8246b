"""The EDM training loop: Adam, lr ramp-up, EMA, gradient accumulation, DDP, exact resume.

What one step does (the reference `training_loop.py` semantics, facts 4.3):

1. ``batch`` images are split over ``W`` ranks (``batch / W`` each) and, per rank, into rounds of
   ``batch_gpu``; gradients accumulate over rounds (DDP synchronises only on the last round).
   Each round: uint8 -> x/127.5 - 1, one-hot labels, ``loss_fn(net, images, labels,
   augment_pipe)`` (per-element), ``loss.sum() * loss_scaling / (batch / W)`` backward.
2. lr = lr_max * min(cur_nimg / (lr_rampup_kimg * 1000), 1) (so the very first step has lr 0,
   as in the reference), NaN gradients -> 0 and +-inf -> +-1e5, then ``Adam(betas=(0.9, 0.999),
   eps=1e-8)`` steps. No weight decay, no clipping, and the static loss scale is not divided out
   (Adam is invariant to it up to eps, exactly as the reference).
3. EMA of the *parameters* (buffers are constant): half-life h = min(ema_halflife_kimg * 1000,
   cur_nimg * ema_rampup_ratio) images, beta = 0.5 ** (batch / max(h, 1e-8)),
   ema <- beta * ema + (1 - beta) * net; then cur_nimg += batch.

Files (rank 0 only) in ``outdir``::

    training_options.json        the options of the run (written once, atomically)
    log.txt                      the human log (appended line by line across resumes)
    stats.jsonl                  one JSON object per tick (appended line by line)
    ckpt.pt                      the latest *resume point*: EMA weights + training_state
    network-snapshot-XXXXXX.pt   weights-only snapshots (EMA), XXXXXX = kimg; never overwritten

The ``.pt`` files and ``training_options.json`` are written atomically and durably (temporary
file, fsync, rename, fsync of the folder): a crash or Ctrl-C never leaves a half-written one, and
the last resume point stays valid. ``log.txt`` and ``stats.jsonl`` are plain appends, not atomic:
a crash can cut their last line short, and they may describe ticks after the last resume point.
On resume, ``stats.jsonl`` is therefore rewritten (atomically) to the entries up to the resume
point - later entries and any torn line are dropped, so the redone ticks are not listed twice;
``log.txt`` is only appended to (it is a human record: the lines of the lost ticks stay, followed
by a "resuming at ..." line).

``training_state`` (see `training/checkpoint.py` for the container) holds the raw network and
optimizer state, counters, every rank's torch/NumPy RNG state and data-sampler position, and the
options. Resuming continues *bit-identically* (on CPU; on CUDA as far as its kernels are
deterministic) when the world size, the per-round batch ``batch_gpu`` and the device type are
those of the interrupted run: the data order, noise, dropout and augmentation streams pick up
exactly where they stopped. What a resume may change is `RESUME_MUTABLE` (where files go, how
long to run, reporting intervals, ``batch_gpu``, device and threads); every other option must
equal the checkpoint's (`check_resume_options`, used by the CLI and by the API alike; build the
options with `resume_options`). Changing ``batch_gpu`` keeps the mathematics (the gradient of a
step is the same sum over the same images) but draws sigma and noise in per-round chunks of a
different size, so the noise each image gets - and hence the run - is no longer bit-identical
to the uninterrupted one; a different world size or device type reseeds or switches the random
streams likewise. The log says so when it happens.

Data order: each epoch is a fresh permutation drawn from ``RandomState([seed, epoch])`` and
dealt round-robin to the ranks (the reference uses a windowed shuffle instead; either is an
unbiased infinite sampler). Seeds: NumPy is seeded with (seed * W + rank) mod 2^31 and torch
from NumPy, as in the reference, so ranks draw different noise.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from edm_deploy.runtime.errors import InputError
from edm_deploy.runtime.fileio import atomic_write_bytes
from edm_deploy.training import distributed as dist_utils
from edm_deploy.training import presets as presets_mod
from edm_deploy.training.augment import TRAIN_PY_CONFIG, AugmentPipe
from edm_deploy.training.checkpoint import build_network, load_checkpoint, load_weights, save_checkpoint
from edm_deploy.training.dataset import Dataset, open_dataset

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
    resume: Optional[str] = None             # path of a ckpt.pt to continue
    device: str = "auto"                     # auto | cpu | cuda
    deterministic: bool = True               # torch.use_deterministic_algorithms (warn-only)
    threads: Optional[int] = None            # CPU threads for torch (None: torch's default)
    max_images: Optional[int] = None         # use only the first N dataset images
    preset: Optional[str] = None             # the preset the options were built from (record)

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
    "outdir", "resume", "duration_kimg", "kimg_per_tick", "snapshot_kimg", "ckpt_kimg", "batch_gpu",
    "device", "threads", "preset",
})

# TrainingOptions field -> `edm-deploy train` flag, for messages (unlisted fields have no flag).
CLI_FLAGS = {
    "data": "--data", "outdir": "--outdir", "cond": "--cond/--uncond", "arch": "--arch", "precond": "--precond",
    "batch": "--batch", "batch_gpu": "--batch-gpu", "duration_kimg": "--duration", "lr": "--lr",
    "lr_rampup_kimg": "--lr-rampup", "ema_halflife_kimg": "--ema", "dropout": "--dropout",
    "augment": "--augment", "xflip": "--xflip", "fp16": "--fp16", "loss_scaling": "--ls",
    "cbase": "--cbase", "cres": "--cres", "seed": "--seed", "kimg_per_tick": "--tick",
    "snapshot_kimg": "--snap-kimg", "resume": "--resume", "device": "--device", "threads": "--threads",
    "max_images": "--max-images", "preset": "--preset",
}


def _option_name(field_name: str) -> str:
    flag = CLI_FLAGS.get(field_name)
    return f"{field_name} ({flag})" if flag else field_name


def _stored_options(ckpt: dict, path: str) -> dict:
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
    values = _stored_options(ckpt, path)
    values.update({k: v for k, v in changes.items() if v is not None})
    values["resume"] = path
    options = TrainingOptions.from_dict(values)
    check_resume_options(options, ckpt, path)
    return options


def check_resume_options(options: TrainingOptions, ckpt: dict, path: str) -> None:
    """Refuse a resume whose options differ from the checkpoint's outside `RESUME_MUTABLE`."""
    stored = _stored_options(ckpt, path)
    given = options.to_dict()
    changed = [k for k in given if k not in RESUME_MUTABLE and given[k] != stored.get(k)]
    if changed:
        detail = ", ".join(f"{_option_name(k)}: {stored.get(k)!r} in the run, {given[k]!r} now" for k in changed)
        raise InputError(
            f"--resume continues the stored run, so these options cannot change: {detail} "
            f"(changeable: {', '.join(sorted(RESUME_MUTABLE - {'resume', 'preset'}))})"
        )


def options_from_preset(name: Optional[str], **overrides: Any) -> TrainingOptions:
    """Options = defaults <- preset <- explicit overrides (None values are ignored)."""
    values: dict[str, Any] = {}
    if name is not None:
        values.update(presets_mod.preset(name))
        values["preset"] = name
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainingOptions.from_dict(values)


@dataclass
class TrainingResult:
    net: torch.nn.Module
    ema: torch.nn.Module
    cur_nimg: int
    network: dict
    stats: list
    wall_time: float


# ----------------------------------------------------------------------------------------------
# Small pure pieces (tested on their own).


def learning_rate(lr: float, rampup_kimg: float, cur_nimg: int) -> float:
    """lr * min(cur_nimg / (rampup_kimg * 1000), 1); no ramp-up when rampup_kimg <= 0."""
    if rampup_kimg <= 0:
        return lr
    return lr * min(cur_nimg / max(rampup_kimg * 1000, 1e-8), 1)


def ema_beta(batch: int, cur_nimg: int, halflife_kimg: float, rampup_ratio: Optional[float]) -> float:
    """The per-step EMA decay for a half-life in images (with the reference's ramp-up)."""
    halflife_nimg = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * rampup_ratio)
    return 0.5 ** (batch / max(halflife_nimg, 1e-8))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * net, parameters only."""
    for p_ema, p_net in zip(ema.parameters(), net.parameters()):
        p_ema.copy_(p_net.detach().lerp(p_ema, beta))


def sanitize_gradients(params) -> None:
    """NaN -> 0, +inf -> 1e5, -inf -> -1e5, in place (the reference's guard; no clipping)."""
    for p in params:
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)


class RankSampler:
    """Infinite, resumable, per-rank index stream: a new seeded permutation every epoch."""

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if size < world_size:
            raise InputError(f"the dataset has {size} images, fewer than the {world_size} training processes")
        self.size, self.seed, self.rank, self.world_size = size, int(seed), rank, world_size
        self.epoch, self.pos = 0, 0
        self._shard = self._make_shard()

    def _make_shard(self) -> np.ndarray:
        perm = np.random.RandomState([self.seed % (1 << 32), self.epoch]).permutation(self.size)
        return perm[self.rank:: self.world_size]

    def take(self, count: int) -> np.ndarray:
        out = []
        while count > 0:
            if self.pos >= len(self._shard):
                self.epoch, self.pos = self.epoch + 1, 0
                self._shard = self._make_shard()
            chunk = self._shard[self.pos: self.pos + count]
            out.append(chunk)
            self.pos += len(chunk)
            count -= len(chunk)
        return np.concatenate(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        if int(state["size"]) != self.size:
            raise InputError(
                f"the dataset now has {self.size} images but the run was trained on {state['size']}; "
                f"resume with the same data"
            )
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._shard = self._make_shard()


def network_description(options: TrainingOptions, img_resolution: int, img_channels: int, label_dim: int) -> dict:
    """The checkpoint's network entry: reference preconditioner class + constructor kwargs."""
    precond_cls, _ = presets_mod.precond_classes(options.precond)
    kwargs: dict[str, Any] = dict(
        img_resolution=int(img_resolution), img_channels=int(img_channels),
        label_dim=int(label_dim) if options.cond else 0, use_fp16=bool(options.fp16),
    )
    kwargs.update(presets_mod.arch_kwargs(options.arch))
    if options.cbase is not None:
        kwargs["model_channels"] = int(options.cbase)
    if options.cres is not None:
        kwargs["channel_mult"] = [int(c) for c in options.cres]
    kwargs["dropout"] = float(options.dropout)
    if options.augment > 0:
        kwargs["augment_dim"] = AugmentPipe(**TRAIN_PY_CONFIG).label_dim
    kwargs.update(copy.deepcopy(options.network_overrides))
    return {"class_name": precond_cls, "init_kwargs": kwargs}


def make_loss(precond: str):
    from edm_deploy.training import loss as loss_mod

    _, loss_cls = presets_mod.precond_classes(precond)
    return getattr(loss_mod, loss_cls)()


def check_options(o: TrainingOptions, world_size: int = 1) -> None:
    """Every option problem as one InputError, before anything is built or written."""
    presets_mod.arch_kwargs(o.arch)
    presets_mod.precond_classes(o.precond)
    if o.batch < 1:
        raise InputError(f"--batch must be >= 1, got {o.batch}")
    if o.batch % world_size:
        raise InputError(f"--batch {o.batch} is not divisible by the {world_size} training processes")
    per_rank = o.batch // world_size
    if o.batch_gpu is not None:
        if o.batch_gpu < 1 or per_rank % o.batch_gpu:
            raise InputError(f"--batch-gpu {o.batch_gpu} must divide the per-process batch {per_rank}")
    checks = [
        (o.duration_kimg > 0, f"--duration must be > 0 kimg, got {o.duration_kimg}"),
        (o.lr > 0 and math.isfinite(o.lr), f"--lr must be a positive number, got {o.lr}"),
        (o.lr_rampup_kimg >= 0, f"lr ramp-up must be >= 0 kimg, got {o.lr_rampup_kimg}"),
        (o.ema_halflife_kimg >= 0, f"--ema must be >= 0 kimg, got {o.ema_halflife_kimg}"),
        (0 <= o.dropout < 1, f"--dropout must lie in [0, 1), got {o.dropout}"),
        (0 <= o.augment <= 1, f"--augment must lie in [0, 1], got {o.augment}"),
        (o.loss_scaling > 0, f"--ls must be > 0, got {o.loss_scaling}"),
        (o.kimg_per_tick > 0, f"--tick must be > 0 kimg, got {o.kimg_per_tick}"),
        (o.snapshot_kimg > 0, f"--snap-kimg must be > 0, got {o.snapshot_kimg}"),
        (o.ckpt_kimg is None or (o.ckpt_kimg > 0 and math.isfinite(o.ckpt_kimg)),
         f"ckpt_kimg must be > 0 (or None: every --snap-kimg), got {o.ckpt_kimg}"),
        (o.max_images is None or o.max_images >= 1, f"--max-images must be at least 1, got {o.max_images}"),
        (o.cbase is None or o.cbase >= 1, f"--cbase must be >= 1, got {o.cbase}"),
        (o.device in ("auto", "cpu", "cuda") or o.device.startswith("cuda:"), f"unknown device {o.device!r}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise InputError(msg)
    if o.cres is not None and (not o.cres or any(int(c) < 1 for c in o.cres)):
        raise InputError(f"--cres must be a list of positive integers, got {o.cres}")
    if o.device.startswith("cuda:"):
        index = o.device.split(":", 1)[1]
        if not index.isdigit():
            raise InputError(f"--device {o.device}: the GPU index must be a non-negative integer")
        if world_size > 1:
            raise InputError(
                f"--device {o.device} names one GPU, but {world_size} processes were started; use --device cuda "
                f"(each process then takes the GPU of its LOCAL_RANK; choose GPUs with CUDA_VISIBLE_DEVICES)"
            )


# ----------------------------------------------------------------------------------------------
# RNG state (kept as plain tensors/lists so checkpoints load with weights_only=True).


def _rng_state(device: torch.device) -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _seed_everything(seed: int, rank: int, world_size: int) -> None:
    np.random.seed((int(seed) * world_size + rank) % (1 << 31))
    torch.manual_seed(int(np.random.randint(1 << 31)))


def _resolve_device(name: str, ctx: dist_utils.DistContext) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("--device cuda was requested but no CUDA GPU is available")
        index = ctx.local_rank if name == "cuda" else int(name.split(":")[1])
        if index >= torch.cuda.device_count():
            raise InputError(
                f"--device {name}: GPU {index} does not exist ({torch.cuda.device_count()} visible)"
                + (f"; LOCAL_RANK is {ctx.local_rank}" if name == "cuda" else "")
            )
        return torch.device("cuda", index)
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Output folder.


class _RunFiles:
    """Rank 0's writer for the run folder (does nothing on other ranks or without an outdir)."""

    def __init__(self, outdir: Optional[str], active: bool, echo: Optional[Callable[[str], None]]):
        self.outdir = outdir if active else None
        self.echo = echo if active else None

    def path(self, name: str) -> str:
        assert self.outdir is not None
        return os.path.join(self.outdir, name)

    def log(self, line: str) -> None:
        if self.echo is not None:
            self.echo(line)
        if self.outdir is not None:
            with open(self.path("log.txt"), "a", encoding="utf-8") as f:
                f.write(line + "\n")

    def stats(self, entry: dict) -> None:
        if self.outdir is not None:
            with open(self.path("stats.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, sort_keys=True) + "\n")

    def snapshot_name(self, cur_nimg: int) -> str:
        """network-snapshot-{kimg:06d}.pt, with a suffix rather than ever replacing a file."""
        base = f"network-snapshot-{cur_nimg // 1000:06d}"
        name, n = base + ".pt", 1
        while os.path.exists(self.path(name)):
            name, n = f"{base}-{n}.pt", n + 1
        return name


def _truncate_stats(files: _RunFiles, cur_tick: int, cur_nimg: int) -> None:
    """Drop stats.jsonl entries after the resume point (and torn lines), so redone ticks are not listed twice."""
    if files.outdir is None or not os.path.exists(files.path("stats.jsonl")):
        return
    with open(files.path("stats.jsonl"), "rb") as f:
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    keep = []
    for line in lines:
        try:
            entry = json.loads(line)
            if int(entry["tick"]) < cur_tick and float(entry["kimg"]) <= cur_nimg / 1000 + 1e-6:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash, or not ours
    if len(keep) != len(lines):
        atomic_write_bytes(files.path("stats.jsonl"), "".join(line + "\n" for line in keep).encode(), durable=True)


def prepare_outdir(outdir: str, resume: Optional[str], create: bool = True) -> None:
    """Create the run folder; refuse to start a *new* run over an existing resume point.

    Every rank runs the (read-only) checks so that all of them fail together; only rank 0 creates.
    """
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise InputError(f"--outdir {outdir} exists and is not a folder")
    if create:
        os.makedirs(outdir, exist_ok=True)
    existing = os.path.join(outdir, RESUME_FILE)
    if os.path.exists(existing):
        same = resume is not None and os.path.abspath(resume) == os.path.abspath(existing)
        if not same:
            raise InputError(
                f"{outdir} already holds a training run ({RESUME_FILE}); continue it with "
                f"--resume {existing} or choose another --outdir"
            )


# ----------------------------------------------------------------------------------------------
# The loop.


def _load_data(options: TrainingOptions) -> Dataset:
    return open_dataset(options.data, require_labels=options.cond, max_images=options.max_images)


def _fetch(dataset: Dataset, indices: np.ndarray, xflip: bool, label_dim: int, device: torch.device):
    n = len(dataset)
    base = indices % n if xflip else indices
    images, labels = dataset.batch(base)
    images = torch.from_numpy(np.ascontiguousarray(images))
    if xflip:
        flip = torch.from_numpy(indices >= n).view(-1, 1, 1, 1)
        images = torch.where(flip, images.flip(3), images)
    images = images.to(device=device, dtype=torch.float32) / 127.5 - 1
    if label_dim:
        onehot = torch.zeros(len(indices), label_dim, dtype=torch.float32)
        onehot[torch.arange(len(indices)), torch.from_numpy(labels)] = 1
        return images, onehot.to(device)
    return images, None


def training_loop(
    options: TrainingOptions,
    echo: Optional[Callable[[str], None]] = print,
    progress: bool = True,
) -> TrainingResult:
    """Train according to `options` (see the module docstring); returns the final state.

    Under torchrun (WORLD_SIZE > 1) this joins the process group and, if it created the group,
    destroys it again before returning or raising. To resume, pass options whose ``resume`` names
    a ``ckpt.pt`` and whose other fields equal the stored ones outside `RESUME_MUTABLE` (build
    them with `resume_options`); anything else is an InputError before any file is touched.
    """
    ctx = dist_utils.init_from_env("cuda" if options.device.startswith("cuda") or
                                   (options.device == "auto" and torch.cuda.is_available()) else "cpu")
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_det_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_threads = torch.get_num_threads()
    try:
        if options.threads is not None:
            if options.threads < 1:
                raise InputError(f"--threads must be >= 1, got {options.threads}")
            torch.set_num_threads(int(options.threads))
        return _train(options, ctx, echo, progress)
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_det_warn)
        torch.set_num_threads(prev_threads)
        dist_utils.shutdown(ctx)  # only a process group this call created (torchrun launches)


def _train(options: TrainingOptions, ctx: dist_utils.DistContext, echo, progress: bool) -> TrainingResult:
    start_time = time.time()
    ckpt = None
    if options.resume is not None:
        ckpt = load_checkpoint(options.resume)
        check_resume_options(options, ckpt, options.resume)
    check_options(options, ctx.world_size)
    device = _resolve_device(options.device, ctx)
    if options.outdir is not None:
        prepare_outdir(options.outdir, options.resume, create=ctx.is_main)
    dist_utils.barrier(ctx)
    files = _RunFiles(options.outdir, ctx.is_main, echo)

    # Determinism and precision (facts 4.3 / 2.7).
    torch.use_deterministic_algorithms(bool(options.deterministic), warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not options.deterministic
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    _seed_everything(options.seed, ctx.rank, ctx.world_size)

    # Data.
    dataset = _load_data(options)
    label_dim = dataset.label_dim if options.cond else 0
    if ckpt is not None:
        network = ckpt["network"]
        kw = network["init_kwargs"]
        got = (int(kw["img_resolution"]), int(kw["img_channels"]), int(kw.get("label_dim", 0)))
        want = (dataset.resolution, dataset.num_channels, label_dim)
        if got != want:
            raise InputError(
                f"{options.resume} was trained on {got[1]}x{got[0]}x{got[0]} images with label_dim {got[2]}, "
                f"but {options.data} gives {want[1]}x{want[0]}x{want[0]} with label_dim {want[2]}"
            )
    else:
        network = network_description(options, dataset.resolution, dataset.num_channels, label_dim)
    data_size = len(dataset) * (2 if options.xflip else 1)
    sampler = RankSampler(data_size, options.seed, ctx.rank, ctx.world_size)
    batch_per_rank = options.batch // ctx.world_size
    batch_gpu = options.batch_gpu or batch_per_rank
    rounds = batch_per_rank // batch_gpu

    # Network, EMA, optimizer, loss, augmentation.
    net = build_network(network, options.resume or "options").train().requires_grad_(True).to(device)
    dist_utils.broadcast_module(ctx, net)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=options.lr, betas=(0.9, 0.999), eps=1e-8)
    loss_fn = make_loss(options.precond)
    augment_pipe = AugmentPipe(p=options.augment, **TRAIN_PY_CONFIG) if options.augment > 0 else None
    cur_nimg, cur_tick, total_time = 0, 0, 0.0
    if ckpt is not None:
        ts = ckpt["training_state"]
        load_weights(net, ts["net"], options.resume, "the training network's weights")
        load_weights(ema, ckpt["ema"], options.resume, "the EMA weights")
        try:
            optimizer.load_state_dict(ts["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise InputError(f"{options.resume}: the optimizer state does not fit the network ({exc})") from exc
        cur_nimg, cur_tick, total_time = int(ts["cur_nimg"]), int(ts["cur_tick"]), float(ts.get("total_time", 0))
        stored = _stored_options(ckpt, options.resume)
        stored_world = int(ts["world_size"])
        stored_batch_gpu = stored["batch_gpu"] or stored["batch"] // stored_world
        if stored_world == ctx.world_size and stored_batch_gpu != batch_gpu:
            files.log(f"note: --batch-gpu {batch_gpu} (the run used {stored_batch_gpu}): each step still averages "
                      f"the loss over the same images, but sigma and noise are drawn in rounds of a different "
                      f"size, so from here on the run is not bit-identical to an uninterrupted one")
        if ts.get("device_type", device.type) != device.type:
            files.log(f"note: resuming on {device.type} (saved on {ts['device_type']}): the random streams differ, "
                      f"so the run is no longer bit-identical to an uninterrupted one")
        if int(ts["world_size"]) == ctx.world_size:
            _set_rng_state(ts["rng"][ctx.rank], device)
            sampler.load_state_dict(ts["sampler"][ctx.rank])
        else:
            # A different world size cannot continue the same streams; reseed from the position.
            _seed_everything(options.seed + cur_nimg, ctx.rank, ctx.world_size)
            sampler = RankSampler(data_size, options.seed + cur_nimg, ctx.rank, ctx.world_size)
            files.log(f"note: resuming with {ctx.world_size} processes (saved with {ts.get('world_size')}); "
                      f"data order and noise are reseeded")
        _truncate_stats(files, cur_tick, cur_nimg)  # the resume is accepted: drop the ticks it redoes
    ddp = net
    if ctx.enabled:
        # Default buffer handling (synced at init and forward). Never broadcast_buffers=False:
        # since PyTorch 2.1 that also skips the init sync (facts 4.3); we broadcast above anyway.
        ddp = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)

    # Run folder bookkeeping.
    if files.outdir is not None:
        opts_path = files.path("training_options.json")
        if not os.path.exists(opts_path):
            record = {"options": options.to_dict(), "network": network, "dataset": dataset.describe(),
                      "world_size": ctx.world_size, "augment": augment_pipe.init_kwargs if augment_pipe else None}
            atomic_write_bytes(opts_path, (json.dumps(record, indent=2, default=str) + "\n").encode(), durable=True)
    n_params = sum(p.numel() for p in net.parameters())
    files.log(
        f"{'resuming at ' + format(cur_nimg / 1000, '.1f') + ' kimg' if ckpt else 'training'}: {dataset.describe()}; "
        f"{network['class_name']}/{network['init_kwargs'].get('model_type')} {n_params:,} parameters; "
        f"batch {options.batch} ({ctx.world_size} x {rounds} x {batch_gpu}); device {device}; "
        f"{options.duration_kimg:g} kimg"
    )

    total_nimg = int(round(options.duration_kimg * 1000))
    tick_nimg = max(int(round(options.kimg_per_tick * 1000)), 1)
    snap_nimg = max(int(round(options.snapshot_kimg * 1000)), 1)
    ckpt_nimg = max(int(round((options.ckpt_kimg or options.snapshot_kimg) * 1000)), 1)
    tick_start_nimg, tick_start_time = cur_nimg, time.time()
    last_snap, last_ckpt = cur_nimg // snap_nimg, cur_nimg // ckpt_nimg
    loss_sum, loss_count = 0.0, 0
    stats: list = []
    bar = None
    if progress and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=round(total_nimg / 1000, 3), initial=round(min(cur_nimg, total_nimg) / 1000, 3),
                   unit="kimg", desc="train", dynamic_ncols=True, leave=False, disable=None)
        if files.echo is not None and not bar.disable:
            files.echo = tqdm.write
    done = cur_nimg >= total_nimg
    try:
        while not done:
            # ---- one optimisation step ----
            optimizer.zero_grad(set_to_none=True)
            for r in range(rounds):
                images, labels = _fetch(dataset, sampler.take(batch_gpu), options.xflip, label_dim, device)
                sync = (r == rounds - 1) or not ctx.enabled
                with (ddp.no_sync() if not sync else _null()):
                    loss = loss_fn(net=ddp, images=images, labels=labels, augment_pipe=augment_pipe)
                    loss.sum().mul(options.loss_scaling / batch_per_rank).backward()
                loss_sum += float(loss.detach().sum())
                loss_count += loss.numel()
            lr_now = learning_rate(options.lr, options.lr_rampup_kimg, cur_nimg)
            for g in optimizer.param_groups:
                g["lr"] = lr_now
            sanitize_gradients(net.parameters())
            optimizer.step()
            beta = ema_beta(options.batch, cur_nimg, options.ema_halflife_kimg, options.ema_rampup_ratio)
            update_ema(ema, net, beta)
            cur_nimg += options.batch
            done = cur_nimg >= total_nimg
            if bar is not None:
                bar.update(round(min(cur_nimg, total_nimg) / 1000 - bar.n, 3))

            # ---- tick: status, stats, snapshots ----
            if not done and cur_nimg < tick_start_nimg + tick_nimg:
                continue
            now = time.time()
            tick_time = now - tick_start_time
            total_time += tick_time
            ls, lc = dist_utils.all_reduce_sum(ctx, [loss_sum, float(loss_count)], device)
            mean_loss = ls / max(lc, 1)
            kimg_done = (cur_nimg - tick_start_nimg) / 1000
            entry = {
                "tick": cur_tick, "kimg": round(cur_nimg / 1000, 3), "Loss/loss": mean_loss, "loss": mean_loss,
                "lr": lr_now, "ema_beta": beta, "sec_per_tick": round(tick_time, 3),
                "sec_per_kimg": round(tick_time / max(kimg_done, 1e-9), 3),
                "img_per_sec": round((cur_nimg - tick_start_nimg) / max(tick_time, 1e-9), 2),
                "total_sec": round(total_time, 2), "timestamp": round(now, 3),
            }
            stats.append(entry)
            files.stats(entry)
            files.log(
                f"tick {cur_tick:<5d} kimg {cur_nimg / 1000:<9.2f} loss {mean_loss:<8.4f} lr {lr_now:<9.3g} "
                f"sec/kimg {entry['sec_per_kimg']:<7.2f} time {_fmt_time(total_time)}"
            )
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
            if not math.isfinite(mean_loss):
                files.log("warning: the loss is not finite")

            snap_due = done or cur_nimg // snap_nimg > last_snap
            ckpt_due = done or snap_due or cur_nimg // ckpt_nimg > last_ckpt
            if ckpt_due:
                training_state = {
                    "net": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
                    "optimizer": optimizer.state_dict(),
                    "cur_nimg": cur_nimg, "cur_tick": cur_tick + 1, "total_time": total_time,
                    "rng": dist_utils.gather_objects(ctx, _rng_state(device)),
                    "sampler": dist_utils.gather_objects(ctx, sampler.state_dict()),
                    "world_size": ctx.world_size,
                    "device_type": device.type,
                    "options": options.to_dict(),
                }
            if snap_due or ckpt_due:
                dist_utils.check_consistency(ctx, net)
            if files.outdir is not None:
                meta = {"kimg": cur_nimg / 1000, "loss": mean_loss, "seed": options.seed,
                        "dataset": dataset.describe(), "preset": options.preset}
                if snap_due:
                    save_checkpoint(files.path(files.snapshot_name(cur_nimg)), network, ema.state_dict(), None, meta)
                if ckpt_due:
                    save_checkpoint(files.path(RESUME_FILE), network, ema.state_dict(), training_state, meta)
            last_snap, last_ckpt = cur_nimg // snap_nimg, cur_nimg // ckpt_nimg
            dist_utils.barrier(ctx)
            cur_tick += 1
            tick_start_nimg, tick_start_time = cur_nimg, time.time()
            loss_sum, loss_count = 0.0, 0
    finally:
        if bar is not None:
            bar.close()
    files.log(f"done: {cur_nimg / 1000:.1f} kimg in {_fmt_time(time.time() - start_time)}")
    return TrainingResult(net=net, ema=ema, cur_nimg=cur_nimg, network=network, stats=stats,
                          wall_time=time.time() - start_time)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _fmt_time(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {(s // 60) % 60:02d}m"
