"""The EDM training loop: Adam, lr ramp-up, EMA, gradient accumulation, DDP, exact resume.

It keeps the reference NVlabs/edm `training_loop.py`'s semantics (`_one_step`) so its presets
reproduce, and adds what a long run needs: a locked run folder, atomic resume points by kimg and
by time, a bit-identical resume, a stop on divergence (docs/DESIGN.md, "Training runs").
`training_loop` runs the stages below in order, `_check_run` to `_train_steps`; the loss is the
pluggable part (`make_loss`, or ECT's `make_consistency_loss` with ``consistency``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from edm_deploy.runtime.core.errors import InputError, NumericalError, param_error
from edm_deploy.runtime.core.fileio import (
    atomic_write_bytes,
    exclusive_output,
    refuse_overwriting_inputs,
    sha256_file,
)

from . import distributed as dist_utils
from . import presets as presets_mod
from .augment import TRAIN_PY_CONFIG, AugmentPipe
from .checkpoint import build_network, load_checkpoint, load_weights, save_checkpoint
from .consistency import check_tuning_fits, load_teacher, tuned_network
from .consistency_loss import ECTLoss, ect_stage
from .dataset import Dataset, open_dataset
from .options import (
    RESUME_FILE,
    RESUME_MUTABLE,
    TrainingOptions,
    check_device,
    check_options,
    check_resume_options,
    cpu_count,
    options_from_preset,
    resume_options,
    stored_options,
)

# The loop's API: the public names of `training.options` (to build a run's options) and the loop's own.
__all__ = [
    "RESUME_FILE", "RESUME_MUTABLE", "TrainingOptions", "TrainingResult", "check_device", "check_options",
    "check_resume_options", "cpu_count", "options_from_preset", "resume_options", "training_loop",
    "make_loss", "network_description", "learning_rate", "ema_beta", "update_ema", "sanitize_gradients",
    "RankSampler", "prepare_outdir", "check_run_files",
]


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
    """Infinite, resumable, per-rank index stream: a new seeded permutation every epoch.

    Each epoch is a permutation drawn from ``RandomState([seed, epoch])`` and dealt round-robin
    to the ranks (the reference uses a windowed shuffle instead; either is an unbiased infinite
    sampler).
    """

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
    if options.cond_drop > 0:
        kwargs["label_dropout"] = float(options.cond_drop)  # the reference networks' label_dropout
    if options.augment > 0:
        kwargs["augment_dim"] = AugmentPipe(**TRAIN_PY_CONFIG).label_dim
    kwargs.update(copy.deepcopy(options.network_overrides))
    return {"class_name": precond_cls, "init_kwargs": kwargs}


def make_loss(precond: str):
    """The EDM paper's loss of a --precond (`training.loss`)."""
    from . import loss as loss_mod

    _, loss_cls = presets_mod.precond_classes(precond)
    return getattr(loss_mod, loss_cls)()


def make_consistency_loss(options: TrainingOptions, images_seen: Callable[[], int]):
    """ECT's objective with the run's settings; `images_seen` gives the loop's image count (its stage)."""
    return ECTLoss(P_mean=options.ect_p_mean, P_std=options.ect_p_std, q=options.ect_q, k=options.ect_k,
                   b=options.ect_b, c=options.ect_c, stage_kimg=options.ect_stage_kimg, images_seen=images_seen)


def make_optimizer(options: TrainingOptions, params) -> torch.optim.Optimizer:
    """Adam (EDM) or RAdam (ECT's tuning), betas (0.9, 0.999), eps 1e-8, no weight decay."""
    cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[options.optimizer]
    return cls(params, lr=options.lr, betas=(0.9, 0.999), eps=1e-8)



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
    """NumPy from (seed * W + rank) mod 2^31, torch from NumPy, as the reference: ranks draw different noise."""
    np.random.seed((int(seed) * world_size + rank) % (1 << 31))
    torch.manual_seed(int(np.random.randint(1 << 31)))


def _resolve_device(name: str, ctx: dist_utils.DistContext) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("device cuda was requested but no CUDA GPU is available", param="device")
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

    def log(self, line: str, echo: bool = True) -> None:
        if echo and self.echo is not None:
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


# The files a run writes into its folder besides the snapshots (whose names never replace a file).
RUN_FILES = ("training_options.json", "log.txt", "stats.jsonl", RESUME_FILE)


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
        raise param_error("outdir", f"outdir {outdir} exists and is not a folder")
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


def check_run_files(options: TrainingOptions) -> None:
    """No file the run writes may be one it reads (symlinks resolved); continuing a run's own
    ckpt.pt is the one exception: a resume point is meant to be replaced by the next one."""
    if options.outdir is None:
        return
    outputs = {f"outdir file {name}": os.path.join(options.outdir, name) for name in RUN_FILES}
    if options.resume is not None and os.path.abspath(options.resume) == os.path.abspath(outputs[f"outdir file {RESUME_FILE}"]):
        del outputs[f"outdir file {RESUME_FILE}"]
    inputs = {"resume": options.resume, "tune_from": options.tune_from,
              "data": options.data if os.path.exists(str(options.data)) else None}
    refuse_overwriting_inputs(inputs, outputs)


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
    """Train according to `options`; returns the final state.

    Under torchrun (WORLD_SIZE > 1) this joins the process group and, if it created the group,
    destroys it again before returning or raising. To resume, pass options whose ``resume`` names
    a ``ckpt.pt`` and whose other fields equal the stored ones outside `RESUME_MUTABLE` (build
    them with `resume_options`); anything else is an InputError before any file is touched.
    While it runs, the run folder is locked: a second run into the same folder is refused. A run
    whose loss or weights stop being finite stops with a `NumericalError` before saving anything
    from that point, so the last resume point stays a finite one.
    """
    ctx = dist_utils.init_from_env("cuda" if options.device.startswith("cuda") or
                                   (options.device == "auto" and torch.cuda.is_available()) else "cpu")
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_det_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_threads = torch.get_num_threads()
    try:
        return _train(options, ctx, echo, progress)
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_det_warn)
        torch.set_num_threads(prev_threads)
        dist_utils.shutdown(ctx)  # only a process group this call created (torchrun launches)


@dataclass
class _Run:
    """The state of one run, shared by its stages (`_train` says in which order they come)."""

    options: TrainingOptions
    ctx: dist_utils.DistContext
    device: torch.device
    ckpt: Optional[dict]
    teacher: Optional[dict] = None  # the checkpoint a consistency tuning starts from (until its weights are loaded)
    teacher_sha256: Optional[str] = None
    files: _RunFiles = None  # type: ignore[assignment]
    dataset: Dataset = None  # type: ignore[assignment]
    label_dim: int = 0
    network: dict = None  # type: ignore[assignment]
    data_size: int = 0
    sampler: RankSampler = None  # type: ignore[assignment]
    batch_per_rank: int = 0
    batch_gpu: int = 0
    rounds: int = 0
    net: torch.nn.Module = None  # type: ignore[assignment]
    ddp: torch.nn.Module = None  # type: ignore[assignment]
    ema: torch.nn.Module = None  # type: ignore[assignment]
    optimizer: torch.optim.Optimizer = None  # type: ignore[assignment]
    loss_fn: Callable = None  # type: ignore[assignment]
    augment_pipe: Optional[AugmentPipe] = None
    cur_nimg: int = 0
    cur_tick: int = 0
    total_time: float = 0.0
    # Per tick: where it started and the loss summed over its steps.
    tick_start_nimg: int = 0
    tick_start_time: float = 0.0
    loss_sum: float = 0.0
    loss_count: int = 0
    lr_now: float = 0.0
    beta: float = 0.0
    stats: list = field(default_factory=list)
    resume_point: Optional[str] = None  # the last resume point written (or resumed from), for messages
    resume_kimg: float = 0.0


def _train(options: TrainingOptions, ctx: dist_utils.DistContext, echo, progress: bool) -> TrainingResult:
    start_time = time.time()
    run = dist_utils.agree(ctx, lambda: _check_run(options, ctx))
    _set_up_data(run)
    with contextlib.ExitStack() as held:
        _take_run_folder(run, echo, held)
        _build_network(run)
        if run.ckpt is not None:
            _resume(run)
        _start_records(run)
        _train_steps(run, progress)
        run.files.log(f"done: {run.cur_nimg / 1000:.1f} kimg in {_fmt_time(time.time() - start_time)}")
    return TrainingResult(net=run.net, ema=run.ema, cur_nimg=run.cur_nimg, network=run.network, stats=run.stats,
                          wall_time=time.time() - start_time)


def _check_run(options: TrainingOptions, ctx: dist_utils.DistContext) -> _Run:
    """Stage 1, every rank (read-only): the options, the resume point, the device, the run folder."""
    ckpt = teacher = teacher_sha256 = None
    if options.resume is not None:
        ckpt = load_checkpoint(options.resume)
        check_resume_options(options, ckpt, options.resume)
    check_options(options, ctx.world_size)
    if ckpt is not None:
        _check_left_to_train(options, ckpt)
    elif options.consistency:
        teacher = load_teacher(options.tune_from)  # a resumed tuning has its network in its resume point
        teacher_sha256 = sha256_file(options.tune_from)
    device = _resolve_device(options.device, ctx)
    check_device(options, device)
    if options.outdir is not None:
        prepare_outdir(options.outdir, options.resume, create=False)
        check_run_files(options)
    if options.threads is not None:
        torch.set_num_threads(int(options.threads))
    return _Run(options=options, ctx=ctx, device=device, ckpt=ckpt, teacher=teacher, teacher_sha256=teacher_sha256)


def _check_left_to_train(options: TrainingOptions, ckpt: dict) -> None:
    """A resume into another folder must have something to train: else it would write nothing there.

    Resuming into the run's own folder with the duration already reached is a no-op (the folder
    holds the finished run); into a new folder it is refused, since the user asked for a run there.
    A duration asked for below what the run has already trained is refused anywhere: it would
    read as done although the run is longer than asked.
    """
    done_nimg = int(ckpt["training_state"]["cur_nimg"])
    stored = (ckpt["training_state"].get("options") or {}).get("duration_kimg")
    if int(round(options.duration_kimg * 1000)) < done_nimg and options.duration_kimg != stored:
        raise param_error(
            "duration_kimg",
            f"{options.resume} is already at {done_nimg / 1000:g} kimg, beyond duration_kimg {options.duration_kimg:g}: "
            f"a run cannot be made shorter than it is; give more than {done_nimg / 1000:g} kimg to continue it, or "
            f"use {options.resume} as it is")
    if done_nimg < int(round(options.duration_kimg * 1000)) or options.outdir is None:
        return
    if os.path.abspath(os.path.dirname(options.resume)) == os.path.abspath(options.outdir):
        return
    raise param_error(
        "duration_kimg",
        f"{options.resume} is already at {done_nimg / 1000:g} kimg, which reaches duration_kimg "
        f"{options.duration_kimg:g}: resuming into {options.outdir} would train nothing and write nothing there; "
        f"to continue the run in {options.outdir}, make it longer than {done_nimg / 1000:g} kimg")


def _set_up_data(run: _Run) -> None:
    """Stage 2: determinism, seeds, the dataset and the network description (checked against a resume)."""
    options, device = run.options, run.device
    # Determinism and precision: no TF32 or reduced-precision reductions, deterministic kernels.
    torch.use_deterministic_algorithms(bool(options.deterministic), warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not options.deterministic
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    _seed_everything(options.seed, run.ctx.rank, run.ctx.world_size)

    if run.teacher is not None:
        check_tuning_fits(run.teacher["network"], options.tune_from, options.cond, options.augment)
    run.dataset = _load_data(options)
    run.label_dim = run.dataset.label_dim if options.cond else 0
    if run.ckpt is not None or run.teacher is not None:
        source = options.resume if run.ckpt is not None else options.tune_from
        if run.ckpt is not None:
            run.network = run.ckpt["network"]
        else:
            run.network = tuned_network(run.teacher, options.tune_from, run.teacher_sha256, options.dropout,
                                        options.fp16)
        kw = run.network["init_kwargs"]
        got = (int(kw["img_resolution"]), int(kw["img_channels"]), int(kw.get("label_dim", 0)))
        want = (run.dataset.resolution, run.dataset.num_channels, run.label_dim)
        if got != want:
            raise InputError(
                f"{source} was trained on {got[1]}x{got[0]}x{got[0]} images with label_dim {got[2]}, "
                f"but {options.data} gives {want[1]}x{want[0]}x{want[0]} with label_dim {want[2]}"
            )
    else:
        run.network = network_description(options, run.dataset.resolution, run.dataset.num_channels, run.label_dim)
    run.data_size = len(run.dataset) * (2 if options.xflip else 1)
    run.sampler = RankSampler(run.data_size, options.seed, run.ctx.rank, run.ctx.world_size)
    run.batch_per_rank = options.batch // run.ctx.world_size
    run.batch_gpu = options.batch_gpu or run.batch_per_rank
    run.rounds = run.batch_per_rank // run.batch_gpu


def _take_run_folder(run: _Run, echo, held: contextlib.ExitStack) -> None:
    """Stage 3: create and lock the run folder for the whole run (rank 0, which alone writes).

    The lock (`exclusive_output`) refuses a second run into the same folder at once, and the
    check for an existing run is repeated under it, so two starts cannot both pass it. Every
    rank learns rank 0's verdict, so all of them stop together.
    """
    options, ctx = run.options, run.ctx

    def take() -> None:
        prepare_outdir(options.outdir, options.resume, create=True)
        held.enter_context(exclusive_output(options.outdir))
        prepare_outdir(options.outdir, options.resume, create=False)

    if options.outdir is not None:
        dist_utils.agree(ctx, take, ranks=(0,))
    dist_utils.barrier(ctx)
    run.files = _RunFiles(options.outdir, ctx.is_main, echo)


def _build_network(run: _Run) -> None:
    """Stage 4: network, EMA, optimizer, loss and augmentation (the network draws from the seeded RNG)."""
    options = run.options
    run.net = build_network(run.network, options.resume or "options").train().requires_grad_(True).to(run.device)
    if run.teacher is not None:
        # ECT starts the network and its EMA at the teacher's EMA weights.
        load_weights(run.net, run.teacher["ema"], options.tune_from, "the weights to tune")
        run.teacher = None  # held only until here
    dist_utils.broadcast_module(run.ctx, run.net)
    run.ema = copy.deepcopy(run.net).eval().requires_grad_(False)
    run.optimizer = make_optimizer(options, run.net.parameters())
    if options.consistency:
        run.loss_fn = make_consistency_loss(options, lambda: run.cur_nimg)
    else:
        run.loss_fn = make_loss(options.precond)
    run.augment_pipe = AugmentPipe(p=options.augment, **TRAIN_PY_CONFIG) if options.augment > 0 else None
    run.ddp = run.net


def _resume(run: _Run) -> None:
    """Stage 5: weights, optimizer, counters, random streams and data position of the resume point.

    ``training_state`` holds every rank's torch/NumPy RNG state and data position, so the run
    continues bit-identically (on CUDA as far as its kernels are deterministic) with the same
    world size, ``batch_gpu`` and device type. Another ``batch_gpu`` keeps each step's gradient
    but draws sigma and noise in rounds of another size; another world size or device type
    reseeds or switches the streams: the log says so.
    """
    options, ctx, files, ckpt = run.options, run.ctx, run.files, run.ckpt
    ts = ckpt["training_state"]
    load_weights(run.net, ts["net"], options.resume, "the training network's weights")
    load_weights(run.ema, ckpt["ema"], options.resume, "the EMA weights")
    try:
        run.optimizer.load_state_dict(ts["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise InputError(f"{options.resume}: the optimizer state does not fit the network ({exc})") from exc
    run.cur_nimg, run.cur_tick = int(ts["cur_nimg"]), int(ts["cur_tick"])
    run.total_time = float(ts.get("total_time", 0))
    run.resume_point, run.resume_kimg = options.resume, run.cur_nimg / 1000
    stored = stored_options(ckpt, options.resume)
    stored_world = int(ts["world_size"])
    stored_batch_gpu = stored["batch_gpu"] or stored["batch"] // stored_world
    if stored_world == ctx.world_size and stored_batch_gpu != run.batch_gpu:
        files.log(f"note: --batch-gpu {run.batch_gpu} (the run used {stored_batch_gpu}): each step still averages "
                  f"the loss over the same images, but sigma and noise are drawn in rounds of a different "
                  f"size, so from here on the run is not bit-identical to an uninterrupted one")
    if ts.get("device_type", run.device.type) != run.device.type:
        files.log(f"note: resuming on {run.device.type} (saved on {ts['device_type']}): the random streams differ, "
                  f"so the run is no longer bit-identical to an uninterrupted one")
    if stored_world == ctx.world_size:
        _set_rng_state(ts["rng"][ctx.rank], run.device)
        run.sampler.load_state_dict(ts["sampler"][ctx.rank])
    else:
        # A different world size cannot continue the same streams; reseed from the position.
        _seed_everything(options.seed + run.cur_nimg, ctx.rank, ctx.world_size)
        run.sampler = RankSampler(run.data_size, options.seed + run.cur_nimg, ctx.rank, ctx.world_size)
        files.log(f"note: resuming with {ctx.world_size} processes (saved with {ts.get('world_size')}); "
                  f"data order and noise are reseeded")
    _truncate_stats(files, run.cur_tick, run.cur_nimg)  # the resume is accepted: drop the ticks it redoes


def _start_records(run: _Run) -> None:
    """Stage 6: DDP wrapping, training_options.json (once per run folder) and the opening log line."""
    options, ctx, files = run.options, run.ctx, run.files
    if ctx.enabled:
        # Default buffer handling (synced at init and forward). Never broadcast_buffers=False:
        # since PyTorch 2.1 that also skips the init sync (NVlabs/edm commit 008a4e5, "Fix a DDP
        # consistency issue with PyTorch 2.1"); we broadcast above anyway.
        run.ddp = torch.nn.parallel.DistributedDataParallel(
            run.net, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if files.outdir is not None:
        opts_path = files.path("training_options.json")
        if not os.path.exists(opts_path):
            record = {"options": options.to_dict(), "network": run.network, "dataset": run.dataset.describe(),
                      "world_size": ctx.world_size,
                      "augment": run.augment_pipe.init_kwargs if run.augment_pipe else None}
            atomic_write_bytes(opts_path, (json.dumps(record, indent=2, default=str) + "\n").encode(), durable=True)
    n_params = sum(p.numel() for p in run.net.parameters())
    what = f"consistency tuning (ECT) of {options.tune_from}" if options.consistency else "training"
    files.log(
        f"{'resuming at ' + format(run.cur_nimg / 1000, '.1f') + ' kimg' if run.ckpt else what}: "
        f"{run.dataset.describe()}; {run.network['class_name']}/{run.network['init_kwargs'].get('model_type')} "
        f"{n_params:,} parameters; batch {options.batch} ({ctx.world_size} x {run.rounds} x {run.batch_gpu}); "
        f"device {run.device}; {options.duration_kimg:g} kimg"
    )


def _train_steps(run: _Run, progress: bool) -> None:
    """Stage 7: optimisation steps until the duration is reached, with a tick every kimg_per_tick."""
    options = run.options
    total_nimg = int(round(options.duration_kimg * 1000))
    tick_nimg = max(int(round(options.kimg_per_tick * 1000)), 1)
    snap_nimg = max(int(round(options.snapshot_kimg * 1000)), 1)
    ckpt_nimg = max(int(round((options.ckpt_kimg or options.snapshot_kimg) * 1000)), 1)
    run.tick_start_nimg, run.tick_start_time = run.cur_nimg, time.time()
    last = {"snap": run.cur_nimg // snap_nimg, "ckpt": run.cur_nimg // ckpt_nimg, "ckpt_time": time.time()}
    bar = _progress_bar(run, total_nimg) if progress and run.ctx.is_main else None
    done = run.cur_nimg >= total_nimg
    try:
        while not done:
            _one_step(run)
            done = run.cur_nimg >= total_nimg
            if bar is not None:
                bar.update(round(min(run.cur_nimg, total_nimg) / 1000 - bar.n, 3))
            if not done and run.cur_nimg < run.tick_start_nimg + tick_nimg:
                continue
            mean_loss = _tick(run, bar)
            snap_due = done or run.cur_nimg // snap_nimg > last["snap"]
            ckpt_due = (done or snap_due or run.cur_nimg // ckpt_nimg > last["ckpt"]
                        or _seconds_due(run, time.time() - last["ckpt_time"]))
            _save(run, mean_loss, snap_due, ckpt_due)
            last["snap"], last["ckpt"] = run.cur_nimg // snap_nimg, run.cur_nimg // ckpt_nimg
            if ckpt_due:
                last["ckpt_time"] = time.time()
            dist_utils.barrier(run.ctx)
            run.cur_tick += 1
            run.tick_start_nimg, run.tick_start_time = run.cur_nimg, time.time()
            run.loss_sum, run.loss_count = 0.0, 0
    finally:
        if bar is not None:
            bar.close()


def _seconds_due(run: _Run, elapsed: float) -> bool:
    """Whether ckpt_seconds have passed since the last resume point, by rank 0's clock (all ranks agree).

    Writing a resume point reads the random streams but draws nothing, so when it happens does
    not change the run: a run resumed from any of them equals the uninterrupted one.
    """
    if not run.options.ckpt_seconds:
        return False
    (elapsed,) = dist_utils.all_reduce_sum(run.ctx, [elapsed if run.ctx.is_main else 0.0], run.device)
    return elapsed >= run.options.ckpt_seconds


def _progress_bar(run: _Run, total_nimg: int):
    from tqdm import tqdm

    bar = tqdm(total=round(total_nimg / 1000, 3), initial=round(min(run.cur_nimg, total_nimg) / 1000, 3),
               unit="kimg", desc="tune" if run.options.consistency else "train", dynamic_ncols=True, leave=False,
               disable=None)
    if run.files.echo is not None and not bar.disable:
        run.files.echo = tqdm.write
    return bar


def _one_step(run: _Run) -> None:
    """One optimisation step over `batch` images, as the reference takes it.

    1. The batch is split over the W ranks and, per rank, into rounds of ``batch_gpu``;
       gradients accumulate over rounds (DDP synchronises on the last). Each round: uint8 ->
       x/127.5 - 1, one-hot labels, the loss (per element, or per image for ECT), ``loss.sum() *
       loss_scaling / (batch / W)`` backward.
    2. `learning_rate` (the first step has lr 0, as in the reference), `sanitize_gradients`, then
       Adam(betas=(0.9, 0.999), eps=1e-8) or RAdam (ECT's): no weight decay, no clipping, and
       the static loss scale is not divided out (Adam is invariant to it up to eps).
    3. The EMA of the parameters (`ema_beta`, `update_ema`); then cur_nimg += batch.
    """
    options, ctx, net = run.options, run.ctx, run.net
    run.optimizer.zero_grad(set_to_none=True)
    for r in range(run.rounds):
        images, labels = _fetch(run.dataset, run.sampler.take(run.batch_gpu), options.xflip, run.label_dim, run.device)
        sync = (r == run.rounds - 1) or not ctx.enabled
        with (run.ddp.no_sync() if not sync else contextlib.nullcontext()):
            loss = run.loss_fn(net=run.ddp, images=images, labels=labels, augment_pipe=run.augment_pipe)
            loss.sum().mul(options.loss_scaling / run.batch_per_rank).backward()
        run.loss_sum += float(loss.detach().sum())
        run.loss_count += loss.numel()
    run.lr_now = learning_rate(options.lr, options.lr_rampup_kimg, run.cur_nimg)
    for g in run.optimizer.param_groups:
        g["lr"] = run.lr_now
    sanitize_gradients(net.parameters())
    run.optimizer.step()
    run.beta = ema_beta(options.batch, run.cur_nimg, options.ema_halflife_kimg, options.ema_rampup_ratio)
    update_ema(run.ema, net, run.beta)
    run.cur_nimg += options.batch


def _tick(run: _Run, bar) -> float:
    """Status line and stats entry of the tick that just ended; stops a run that diverged."""
    now = time.time()
    tick_time = now - run.tick_start_time
    run.total_time += tick_time
    ls, lc = dist_utils.all_reduce_sum(run.ctx, [run.loss_sum, float(run.loss_count)], run.device)
    mean_loss = ls / max(lc, 1)
    kimg_done = (run.cur_nimg - run.tick_start_nimg) / 1000
    entry = {
        "tick": run.cur_tick, "kimg": round(run.cur_nimg / 1000, 3), "Loss/loss": mean_loss, "loss": mean_loss,
        "lr": run.lr_now, "ema_beta": run.beta, "sec_per_tick": round(tick_time, 3),
        "sec_per_kimg": round(tick_time / max(kimg_done, 1e-9), 3),
        "img_per_sec": round((run.cur_nimg - run.tick_start_nimg) / max(tick_time, 1e-9), 2),
        "total_sec": round(run.total_time, 2), "timestamp": round(now, 3),
    }
    if run.options.consistency:  # the ECT stage the tick ended in (the gap t - r is q^-(stage+1) t adj(t))
        entry["ect_stage"] = ect_stage(run.cur_nimg, run.options.ect_stage_kimg)
    run.stats.append(entry)
    run.files.stats(entry)
    run.files.log(
        f"tick {run.cur_tick:<5d} kimg {run.cur_nimg / 1000:<9.2f} loss {mean_loss:<8.4f} lr {run.lr_now:<9.3g} "
        f"sec/kimg {entry['sec_per_kimg']:<7.2f} time {_fmt_time(run.total_time)}"
        + (f" ect stage {entry['ect_stage']}" if "ect_stage" in entry else "")
    )
    if bar is not None:
        bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
    _check_finite(run, mean_loss)
    return mean_loss


def _check_finite(run: _Run, mean_loss: float) -> None:
    """Stop before anything of a diverged run is saved: a NaN/Inf loss or weight ends the run.

    Every rank sees the same all-reduced loss and the same (synchronised) weights, so all of
    them stop together.
    """
    bad = None
    if not math.isfinite(mean_loss):
        bad = f"the loss is {mean_loss}"
    else:
        for name, tensor in list(run.net.named_parameters()) + list(run.ema.named_parameters()):
            if not bool(torch.isfinite(tensor).all()):
                bad = f"the weight {name} holds NaN/Inf"
                break
    if bad is None:
        return
    kept = (f"the last resume point, {run.resume_point} at {run.resume_kimg:g} kimg, is unchanged"
            if run.resume_point else "no resume point was written")
    message = (f"training diverged at {run.cur_nimg / 1000:g} kimg: {bad} (lr {run.options.lr:g}; a smaller lr "
               f"or a longer lr ramp-up usually helps); nothing from this point was saved, {kept}")
    run.files.log(f"error: {message}", echo=False)
    raise NumericalError(message)


def _save(run: _Run, mean_loss: float, snap_due: bool, ckpt_due: bool) -> None:
    """Weights-only snapshot and/or resume point, as due (every rank joins the gathers)."""
    options, ctx, files = run.options, run.ctx, run.files
    if ckpt_due:
        training_state = {
            "net": {k: v.detach().cpu().clone() for k, v in run.net.state_dict().items()},
            "optimizer": run.optimizer.state_dict(),
            "cur_nimg": run.cur_nimg, "cur_tick": run.cur_tick + 1, "total_time": run.total_time,
            "rng": dist_utils.gather_objects(ctx, _rng_state(run.device)),
            "sampler": dist_utils.gather_objects(ctx, run.sampler.state_dict()),
            "world_size": ctx.world_size,
            "device_type": run.device.type,
            "options": options.to_dict(),
        }
    if snap_due or ckpt_due:
        dist_utils.check_consistency(ctx, run.net)
    if files.outdir is not None:
        meta = {"kimg": run.cur_nimg / 1000, "loss": mean_loss, "seed": options.seed,
                "dataset": run.dataset.describe(), "preset": options.preset}
        if snap_due:
            save_checkpoint(files.path(files.snapshot_name(run.cur_nimg)), run.network, run.ema.state_dict(), None, meta)
        if ckpt_due:
            save_checkpoint(files.path(RESUME_FILE), run.network, run.ema.state_dict(), training_state, meta)
            run.resume_point, run.resume_kimg = files.path(RESUME_FILE), run.cur_nimg / 1000


def _fmt_time(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {(s // 60) % 60:02d}m"
