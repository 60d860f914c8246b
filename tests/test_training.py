"""The training loop: schedule maths, a real (tiny) run, exact resume, DDP, checkpoints and the CLI.

Everything here uses a micro SongUNet on the 8x8 digits so the file runs in well under a minute
on two CPU cores. The long quality check (a `tiny` preset model whose samples a classifier must
recognise) is marked slow: run it with `pytest -m slow`.
"""

from __future__ import annotations

import copy
import json
import os
import socket

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from edm_deploy.runtime.core.errors import InputError  # noqa: E402
from edm_deploy.training import training_loop as TL  # noqa: E402
from edm_deploy.training.checkpoint import (  # noqa: E402
    build_network,
    load_checkpoint,
    load_network,
    save_checkpoint,
)
from edm_deploy.training.dataset import load_digits_split  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

MICRO = dict(
    data="digits", cond=True, arch="ddpmpp", precond="edm", cbase=16, cres=[1],
    network_overrides=dict(num_blocks=1, attn_resolutions=[]), batch=16, lr=5e-3, lr_rampup_kimg=0.05,
    ema_halflife_kimg=0.05, dropout=0.1, augment=0.2, kimg_per_tick=0.032, snapshot_kimg=0.032,
    max_images=40, xflip=True, seed=7,
)


def micro(**kw) -> TL.TrainingOptions:
    values = dict(MICRO)
    values.update(kw)
    return TL.TrainingOptions(**values)


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fixed_loss(precond):
    """A loss without randomness (sigma fixed, no noise): runs differ only in how they split the batch."""

    def loss(net, images, labels=None, augment_pipe=None):
        sigma = torch.full([images.shape[0], 1, 1, 1], 0.7)
        return (net(images * 0.8, sigma, labels) - images) ** 2

    return loss


def _loss_before_and_after(result, opts, loss_fn, n=16):
    """The loss of the loop's initial weights and of its final weights on one fixed batch and noise."""
    TL._seed_everything(opts.seed, 0, 1)
    init = build_network(result.network).eval()  # the loop's initial weights, rebuilt
    tr_x, tr_y = load_digits_split()[:2]
    x = torch.from_numpy(tr_x[:n]).float().repeat(8, 1, 1, 1) / 127.5 - 1
    y = torch.eye(10)[torch.from_numpy(tr_y[:n])].repeat(8, 1)

    def loss_of(net):
        with torch.no_grad():
            return loss_fn(net.eval(), x, y, generator=torch.Generator().manual_seed(0)).mean().item()

    changed = [not torch.equal(a, b) for a, b in zip(init.parameters(), result.net.parameters())]
    return loss_of(init), loss_of(result.net), changed


# ----------------------------------------------------------------------------------------------
# Schedule maths.


def test_learning_rate_ramp():
    assert TL.learning_rate(1e-3, 10, 0) == 0
    assert TL.learning_rate(1e-3, 10, 5000) == pytest.approx(5e-4)
    assert TL.learning_rate(1e-3, 10, 10000) == pytest.approx(1e-3)
    assert TL.learning_rate(1e-3, 10, 10**9) == pytest.approx(1e-3)
    assert TL.learning_rate(1e-3, 0, 0) == 1e-3


def test_ema_beta_and_update():
    assert TL.ema_beta(128, 0, 500, 0.05) == 0  # ramp-up: the first step copies the network
    assert TL.ema_beta(128, 10**6, 10, 0.05) == pytest.approx(0.5 ** (128 / 10000))
    assert TL.ema_beta(128, 10**5, 10, 0.05) == pytest.approx(0.5 ** (128 / 5000))  # min(h, 0.05 nimg)
    assert TL.ema_beta(128, 0, 10, None) == pytest.approx(0.5 ** (128 / 10000))
    net, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        net.weight.fill_(2.0)
        ema.weight.fill_(1.0)
        net.running_mean.fill_(5.0)
    TL.update_ema(ema, net, 0.75)
    assert torch.allclose(ema.weight, torch.full((3,), 0.75 * 1 + 0.25 * 2))
    assert torch.equal(ema.running_mean, torch.zeros(3))  # buffers are not averaged


def test_nan_guard():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.5])
    q = torch.nn.Parameter(torch.zeros(2))  # no gradient at all
    TL.sanitize_gradients([p, q])
    assert p.grad.tolist() == [0.0, 1e5, -1e5, 1.5] and q.grad is None


def test_rank_sampler_shards_and_resumes():
    a, b = TL.RankSampler(10, 3, 0, 2), TL.RankSampler(10, 3, 1, 2)
    first = set(a.take(5).tolist()) | set(b.take(5).tolist())
    assert first == set(range(10))  # one epoch, dealt without overlap
    state = a.state_dict()
    nxt = a.take(7)
    c = TL.RankSampler(10, 3, 0, 2)
    c.load_state_dict(state)
    assert c.take(7).tolist() == nxt.tolist()


def test_network_descriptions_follow_the_reference():
    c10 = TL.options_from_preset("cifar10")
    net = TL.network_description(c10, 32, 3, 10)
    kw = net["init_kwargs"]
    assert net["class_name"] == "EDMPrecond" and kw["model_type"] == "SongUNet"
    assert kw["model_channels"] == 128 and kw["channel_mult"] == [2, 2, 2] and kw["label_dim"] == 10
    assert kw["augment_dim"] == 9 and kw["dropout"] == 0.13 and kw["resample_filter"] == [1, 1]
    assert c10.batch == 512 and c10.lr == 1e-3 and c10.ema_halflife_kimg == 500 and c10.duration_kimg == 200000
    im = TL.options_from_preset("imagenet64")
    kw = TL.network_description(im, 64, 3, 1000)["init_kwargs"]
    assert kw["model_type"] == "DhariwalUNet" and kw["use_fp16"] and "augment_dim" not in kw
    assert im.loss_scaling == 100 and im.batch == 4096 and im.ema_halflife_kimg == 50000
    ffhq = TL.options_from_preset("ffhq64", batch=64)  # explicit values override the preset
    assert ffhq.batch == 64 and ffhq.cres == [1, 2, 2, 2] and ffhq.dropout == 0.05
    assert TL.options_from_preset("afhq64").dropout == 0.25
    with pytest.raises(InputError, match="unknown preset"):
        TL.options_from_preset("cifar100")
    with pytest.raises(InputError, match="batch_gpu 5 must divide"):
        TL.check_options(micro(batch_gpu=5))


# ----------------------------------------------------------------------------------------------
# Real training runs on a micro network.


def test_training_reduces_the_loss():
    from edm_deploy.training.loss import EDMLoss

    opts = micro(max_images=16, xflip=False, augment=0, dropout=0, lr=1e-2, lr_rampup_kimg=0,
                 duration_kimg=0.016 * 25, kimg_per_tick=0.2)
    result = TL.training_loop(opts, echo=None, progress=False)
    before, after, changed = _loss_before_and_after(result, opts, EDMLoss())
    assert all(torch.isfinite(torch.tensor([s["loss"] for s in result.stats])))
    assert after < 0.7 * before, (before, after)
    assert all(changed)


def test_resume_is_bit_exact_and_files(tmp_path):
    steps, k = 6, 3
    full_dir, part_dir = str(tmp_path / "full"), str(tmp_path / "part")
    full = TL.training_loop(micro(outdir=full_dir, duration_kimg=0.016 * steps, batch_gpu=8), echo=None, progress=False)
    TL.training_loop(micro(outdir=part_dir, duration_kimg=0.016 * k, batch_gpu=8), echo=None, progress=False)
    ckpt = os.path.join(part_dir, "ckpt.pt")
    assert load_checkpoint(ckpt)["training_state"]["cur_nimg"] == 16 * k
    resumed = TL.training_loop(micro(outdir=part_dir, duration_kimg=0.016 * steps, batch_gpu=8, resume=ckpt),
                               echo=None, progress=False)
    assert resumed.cur_nimg == full.cur_nimg == 16 * steps
    assert _equal_states(full.net.state_dict(), resumed.net.state_dict())
    assert _equal_states(full.ema.state_dict(), resumed.ema.state_dict())
    assert not _equal_states(full.net.state_dict(), full.ema.state_dict())

    # The run folder: resume point, weights-only snapshots, stats and log.
    files = sorted(os.listdir(part_dir))
    assert "ckpt.pt" in files and "log.txt" in files and "stats.jsonl" in files and "training_options.json" in files
    snaps = [f for f in files if f.startswith("network-snapshot-")]
    assert len(snaps) >= 3 and not [f for f in files if f.startswith(".tmp")]
    assert load_checkpoint(os.path.join(part_dir, snaps[0]))["training_state"] is None
    net = load_network(ckpt)
    assert _equal_states(net.state_dict(), {k: v for k, v in resumed.ema.state_dict().items()})
    lines = [json.loads(line) for line in open(os.path.join(part_dir, "stats.jsonl"))]
    assert [round(s["kimg"], 3) for s in lines] == [0.032, 0.048, 0.08, 0.096]
    assert {"loss", "lr", "sec_per_kimg", "kimg", "tick"} <= set(lines[0])
    assert "tick" in open(os.path.join(part_dir, "log.txt")).read()

    # Nothing is overwritten: a new run in the same folder is refused, a snapshot cannot resume.
    with pytest.raises(InputError, match="already holds a training run"):
        TL.training_loop(micro(outdir=part_dir, duration_kimg=0.016), echo=None, progress=False)
    with pytest.raises(InputError, match="weights only"):
        TL.training_loop(micro(resume=os.path.join(part_dir, snaps[0])), echo=None, progress=False)


def test_resume_through_the_api_checks_the_options(tmp_path):
    run = str(tmp_path / "run")
    TL.training_loop(micro(outdir=run, duration_kimg=0.032), echo=None, progress=False)
    ckpt = os.path.join(run, "ckpt.pt")
    before = sorted(os.listdir(run))
    # Anything that shapes the trajectory must equal the stored options, as with the CLI.
    for change in (dict(lr=1e-3), dict(seed=8), dict(batch=32), dict(augment=0.0), dict(precond="vp"),
                   dict(arch="ncsnpp"), dict(cbase=32), dict(network_overrides=dict(num_blocks=2, attn_resolutions=[]))):
        with pytest.raises(InputError, match="cannot change") as exc:
            TL.training_loop(micro(outdir=run, duration_kimg=0.064, resume=ckpt, **change), echo=None, progress=False)
        assert next(iter(change)) in str(exc.value) and "\n" not in str(exc.value)
        with pytest.raises(InputError, match="cannot change"):
            TL.resume_options(ckpt, duration_kimg=0.064, **change)
    assert sorted(os.listdir(run)) == before  # refused before anything was written
    # resume_options = the stored options + the allowed changes; --batch-gpu may change, with a note.
    opts = TL.resume_options(ckpt, duration_kimg=0.064, batch_gpu=4)
    assert opts.lr == MICRO["lr"] and opts.seed == MICRO["seed"] and opts.resume == ckpt
    lines: list = []
    res = TL.training_loop(opts, echo=lines.append, progress=False)
    assert res.cur_nimg == 64
    assert any("--batch-gpu 4" in line and "not bit-identical" in line for line in lines), lines


def interrupt_on_loss_call(monkeypatch, n: int) -> None:
    """Make the n-th loss evaluation raise KeyboardInterrupt (a Ctrl-C in the middle of a step)."""
    real = TL.make_loss
    calls = {"n": 0}

    def flaky_loss(precond):
        inner = real(precond)

        def loss(**kw):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return inner(**kw)

        return loss

    monkeypatch.setattr(TL, "make_loss", flaky_loss)


def test_resume_after_a_crash_lists_each_tick_once(tmp_path, monkeypatch):
    # Ticks every 16 images, resume points every 32: the crash during step 4 loses the tick at 48,
    # which stats.jsonl already lists (and a torn half line, as a crash mid-append would leave).
    interrupt_on_loss_call(monkeypatch, 4)
    out = str(tmp_path / "run")
    opts = dict(outdir=out, duration_kimg=0.016 * 6, kimg_per_tick=0.016, snapshot_kimg=0.032)
    with pytest.raises(KeyboardInterrupt):
        TL.training_loop(micro(**opts), echo=None, progress=False)
    stats = os.path.join(out, "stats.jsonl")
    assert [json.loads(line)["kimg"] for line in open(stats)] == [0.016, 0.032, 0.048]
    with open(stats, "a") as f:
        f.write('{"tick": 3, "kimg": 0.0')
    ckpt = os.path.join(out, "ckpt.pt")
    assert load_checkpoint(ckpt)["training_state"]["cur_nimg"] == 32
    TL.training_loop(micro(resume=ckpt, **opts), echo=None, progress=False)
    entries = [json.loads(line) for line in open(stats)]
    assert [e["kimg"] for e in entries] == [0.016, 0.032, 0.048, 0.064, 0.08, 0.096]
    assert [e["tick"] for e in entries] == list(range(6))
    log = open(os.path.join(out, "log.txt")).read()
    assert log.count("kimg 0.05") == 2 and "resuming at" in log  # the human log keeps the lost tick


def test_option_checks():
    with pytest.raises(InputError, match="ckpt_kimg"):
        TL.check_options(micro(ckpt_kimg=0))
    with pytest.raises(InputError, match="LOCAL_RANK"):
        TL.check_options(micro(device="cuda:1"), world_size=2)  # every rank would pick GPU 1
    TL.check_options(micro(device="cuda:1"), world_size=1)
    with pytest.raises(InputError, match="GPU index"):
        TL.check_options(micro(device="cuda:one"))


def test_checkpoint_problems_are_one_clear_error(tmp_path):
    network = TL.network_description(micro(), 8, 1, 10)
    bad = copy.deepcopy(network)
    bad["init_kwargs"]["no_such_kwarg"] = 1
    with pytest.raises(InputError, match="cannot build EDMPrecond.*no_such_kwarg"):
        build_network(bad)
    # Weights of a wider network under this description: the first misfit, both shapes.
    wide = copy.deepcopy(network)
    wide["init_kwargs"]["model_channels"] = 32
    path = str(tmp_path / "w.pt")
    save_checkpoint(path, network, build_network(wide).state_dict())
    with pytest.raises(InputError, match=r"do not fit the described network: model\.\S+ has shape \[\d+(, \d+)*\] "
                                         r"in the file, \[\d+(, \d+)*\] in the network") as exc:
        load_network(path)
    assert "\n" not in str(exc.value)
    fewer = {k: v for k, v in build_network(network).state_dict().items() if "dec" not in k}
    save_checkpoint(path, network, fewer)
    with pytest.raises(InputError, match="missing .* tensors"):
        load_network(path)
    # A resume state that the loop could not use.
    weights = build_network(network).state_dict()
    for state, match in (("junk", "must be a dict"), ({"cur_nimg": 5}, "incomplete.*optimizer"),
                         (dict(net={}, optimizer={}, cur_nimg="5", cur_tick=0, rng=[{}], sampler=[{}], world_size=1,
                               options={}), "cur_nimg.*must be int"),
                         (dict(net={}, optimizer={}, cur_nimg=5, cur_tick=0, rng=[], sampler=[{}], world_size=1,
                               options={}), "world_size 1")):
        save_checkpoint(path, network, weights, training_state=state)
        with pytest.raises(InputError, match=match):
            load_checkpoint(path)


def test_digits_evaluation_needs_a_conditional_digits_model():
    from edm_deploy.training import digits_eval

    net = build_network(TL.network_description(micro(cond=False), 8, 1, 10))
    with pytest.raises(InputError, match="unconditional"):
        digits_eval.evaluate(net)
    net = build_network(TL.network_description(micro(), 16, 1, 10))
    with pytest.raises(InputError, match="1x8x8"):
        digits_eval.sample_digits(net)


def test_gradient_accumulation_matches_one_big_round(monkeypatch):
    monkeypatch.setattr(TL, "make_loss", _fixed_loss)  # no randomness: only the split into rounds differs
    kw = dict(duration_kimg=0.016 * 3, lr_rampup_kimg=0, augment=0, dropout=0, xflip=False)
    one = TL.training_loop(micro(**kw), echo=None, progress=False)
    four = TL.training_loop(micro(batch_gpu=4, **kw), echo=None, progress=False)
    for a, b in zip(one.net.parameters(), four.net.parameters()):
        assert torch.allclose(a, b, atol=2e-5, rtol=0)


@pytest.mark.parametrize("precond", ["vp", "ve", "iddpm"])
def test_other_preconditioners_train(precond):
    # 30 steps on 16 fixed images: each preconditioner with its own loss must really learn (its loss
    # on a fixed batch and fixed noise drops clearly), not merely stay finite.
    opts = micro(precond=precond, max_images=16, xflip=False, augment=0, dropout=0, lr=1e-2, lr_rampup_kimg=0,
                 duration_kimg=0.016 * 30, kimg_per_tick=1)
    res = TL.training_loop(opts, echo=None, progress=False)
    assert res.network["class_name"] == {"vp": "VPPrecond", "ve": "VEPrecond", "iddpm": "iDDPMPrecond"}[precond]
    assert all(torch.isfinite(p).all() for p in res.ema.parameters())
    before, after, changed = _loss_before_and_after(res, opts, TL.make_loss(precond))
    assert after < 0.6 * before, (before, after)  # measured: ~1.0 -> 0.17 (vp, iddpm), 0.38 (ve)
    assert all(changed)


def test_interrupt_leaves_the_last_resume_point_intact(tmp_path, monkeypatch):
    interrupt_on_loss_call(monkeypatch, 4)
    out = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        TL.training_loop(micro(outdir=out, duration_kimg=0.016 * 6, kimg_per_tick=0.016, snapshot_kimg=0.016),
                         echo=None, progress=False)
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["training_state"]["cur_nimg"] == 48
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


# ----------------------------------------------------------------------------------------------
# Two processes with DistributedDataParallel (gloo on CPU).


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, outdir: str, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # NCSN++ has a random FourierEmbedding buffer: it must be broadcast from rank 0.
    opts = micro(arch="ncsnpp", outdir=outdir, duration_kimg=0.016 * 3, augment=0.2, device="cpu")
    res = TL.training_loop(opts, echo=None, progress=False)
    torch.save({"net": res.net.state_dict(), "ema": res.ema.state_dict()}, os.path.join(result_dir, f"rank{rank}.pt"))
    import torch.distributed as dist

    assert not dist.is_initialized()  # the loop created the process group, so it destroyed it


# Same global batch in 1 and 2 processes: seed 0 makes rank 0's initial weights those of the
# 1-process run (NumPy is seeded with seed * W + rank), the dealt data shards of each step together
# are the 1-process run's batch, and the fixed loss removes the per-rank noise streams (which differ
# by design), so only the reduction order differs.
DDP_VS_ONE = dict(seed=0, duration_kimg=0.016 * 4, augment=0, dropout=0, lr_rampup_kimg=0, device="cpu")


def _ddp_fixed_loss_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    TL.make_loss = _fixed_loss
    res = TL.training_loop(micro(batch_gpu=4, **DDP_VS_ONE), echo=None, progress=False)  # 2 rounds per rank
    torch.save({"net": res.net.state_dict(), "ema": res.ema.state_dict()}, os.path.join(result_dir, f"rank{rank}.pt"))


def test_ddp_two_processes_stay_identical(tmp_path):
    import torch.multiprocessing as mp

    outdir, result_dir = str(tmp_path / "run"), str(tmp_path / "res")
    os.makedirs(result_dir)
    mp.spawn(_ddp_worker, args=(2, _free_port(), outdir, result_dir), nprocs=2, join=True)
    r0 = torch.load(os.path.join(result_dir, "rank0.pt"), weights_only=True)
    r1 = torch.load(os.path.join(result_dir, "rank1.pt"), weights_only=True)
    assert any("freqs" in k for k in r0["net"])
    assert _equal_states(r0["net"], r1["net"]) and _equal_states(r0["ema"], r1["ema"])
    ckpt = load_checkpoint(os.path.join(outdir, "ckpt.pt"))
    ts = ckpt["training_state"]
    assert ts["world_size"] == 2 and len(ts["rng"]) == 2 and len(ts["sampler"]) == 2
    assert not torch.equal(ts["rng"][0]["torch"], ts["rng"][1]["torch"])  # ranks draw different noise
    assert _equal_states(ckpt["ema"], r0["ema"])


def test_ddp_matches_one_process_at_the_same_global_batch(tmp_path, monkeypatch):
    """2 processes x 2 rounds x 4 images == 1 process x 16 images, to float rounding.

    Not bit-exact: DDP averages the two ranks' gradients (all-reduce) where one process sums one
    batch, so float additions happen in another order. Adam divides each gradient by its running
    RMS, which turns a rounding difference in a tiny gradient into a visible step difference:
    after 4 steps (lr 5e-3, i.e. moves of up to ~2e-2) most weights agree to ~1e-6 and the worst
    one measured differs by 3e-5, hence the 1e-4 tolerance - still 200x below the steps taken.
    """
    import torch.multiprocessing as mp

    result_dir = str(tmp_path / "res")
    os.makedirs(result_dir)
    mp.spawn(_ddp_fixed_loss_worker, args=(2, _free_port(), result_dir), nprocs=2, join=True)
    r0 = torch.load(os.path.join(result_dir, "rank0.pt"), weights_only=True)
    monkeypatch.setattr(TL, "make_loss", _fixed_loss)
    one = TL.training_loop(micro(**DDP_VS_ONE), echo=None, progress=False)
    TL._seed_everything(0, 0, 1)
    init = build_network(one.network).state_dict()  # the shared initial weights
    moved = max((one.net.state_dict()[k] - v).abs().max().item() for k, v in init.items())
    assert moved > 1e-2
    for name, tensor in one.net.state_dict().items():
        assert torch.allclose(r0["net"][name], tensor, atol=1e-4, rtol=0), name
    for name, tensor in one.ema.state_dict().items():
        assert torch.allclose(r0["ema"][name], tensor, atol=1e-4, rtol=0), name


# ----------------------------------------------------------------------------------------------
# CLI.


def _cli_error(capsys, args) -> str:
    from edm_deploy.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert "Traceback" not in err[0]
    return err[0]


def test_train_cli_errors(tmp_path, capsys):
    from edm_deploy.training.dataset import write_dataset_zip

    out = str(tmp_path / "out")
    assert "unknown preset" in _cli_error(capsys, ["train", "--outdir", out, "--preset", "cifar100"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images" in _cli_error(capsys, ["train", "--data", str(empty), "--outdir", out])
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    assert "ZIP" in _cli_error(capsys, ["train", "--data", str(bad), "--outdir", out])
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    from PIL import Image

    Image.new("L", (8, 8)).save(mixed / "a.png")
    Image.new("L", (16, 16)).save(mixed / "b.png")
    assert "mixed image sizes" in _cli_error(capsys, ["train", "--data", str(mixed), "--outdir", out])
    unlabelled = str(tmp_path / "u.zip")
    write_dataset_zip(str(mixed / "a.png").rsplit("/", 1)[0], unlabelled, resolution=8)
    assert "labels" in _cli_error(capsys, ["train", "--data", unlabelled, "--outdir", out, "--cond"])
    assert "unknown architecture" in _cli_error(capsys, ["train", "--data", "digits", "--outdir", out, "--arch", "unet"])
    assert "--cres" in _cli_error(capsys, ["train", "--data", "digits", "--outdir", out, "--cres", "a,b"])
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))


def test_train_cli_end_to_end(tmp_path, cli_env):
    out = str(tmp_path / "run")
    args = ["train", "--data", "digits", "--outdir", out, "--cond", "--cbase", "16", "--cres", "1",
            "--batch", "16", "--duration", "0.032", "--tick", "0.016", "--snap-kimg", "0.032",
            "--augment", "0", "--dropout", "0", "--max-images", "32", "--no-progress"]
    res = run_cli(args, env=cli_env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "tick" in res.stdout and os.path.exists(os.path.join(out, "ckpt.pt"))
    net = load_network(os.path.join(out, "ckpt.pt"))
    assert net.label_dim == 10 and net.img_resolution == 8
    # A second identical start is refused and leaves the run alone; --resume with a changed
    # network flag is refused too.
    before = os.path.getmtime(os.path.join(out, "ckpt.pt"))
    res = run_cli(args, env=cli_env, timeout=300)
    assert res.returncode == 1 and res.stderr.strip().startswith("error:") and "--resume" in res.stderr
    res = run_cli(["train", "--outdir", out, "--resume", os.path.join(out, "ckpt.pt"), "--lr", "1"],
                  env=cli_env, timeout=300)
    assert res.returncode == 1 and "cannot change" in res.stderr
    assert "error: --resume continues the stored run" in res.stderr and "--lr: " in res.stderr  # flags, not fields
    assert os.path.getmtime(os.path.join(out, "ckpt.pt")) == before
    res = run_cli(["train", "--help"], env=cli_env)
    assert res.returncode == 0 and "Example" in res.stdout


# ----------------------------------------------------------------------------------------------
# The quality bar (minutes): pytest -m slow tests/test_training.py -k digits_quality -s


@pytest.mark.slow
def test_tiny_preset_digits_quality(tmp_path):
    from edm_deploy.training import digits_eval

    opts = TL.options_from_preset("tiny", outdir=str(tmp_path / "tiny"))
    result = TL.training_loop(opts, echo=print, progress=False)
    report = digits_eval.evaluate(result.ema, per_class=50)
    print(
        f"tiny preset: {result.wall_time:.0f} s training; sample accuracy {report['accuracy']:.3f} "
        f"(per class {[round(a, 2) for a in report['per_class']]}); classifier test accuracy "
        f"{report['classifier_test_accuracy']:.3f}; pixel FD samples/test {report['fd_samples_test']:.3f} "
        f"vs train/test {report['fd_train_test']:.3f}"
    )
    assert report["classifier_test_accuracy"] > 0.95
    assert report["accuracy"] >= 0.90
