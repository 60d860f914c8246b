"""Consistency tuning (ECT): the r(t) schedule, the loss, the training run, its records and its errors.

The loss is checked against hand-computed values and closed forms (an identity network makes
the per-image loss ||eps||, whatever t and r are); the runs use the micro SongUNet of
test_training.py on the 8x8 digits, so each test takes a few seconds on two CPU cores.
"""

from __future__ import annotations

import json
import math
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from edm_deploy.runtime.core.errors import InputError  # noqa: E402
from edm_deploy.runtime.core.fileio import sha256_file  # noqa: E402
from edm_deploy.training import training_loop as TL  # noqa: E402
from edm_deploy.training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from edm_deploy.training.consistency_loss import ECTLoss, ect_gap, ect_r, ect_stage  # noqa: E402
from edm_deploy.training.options import consistency_options  # noqa: E402
from tests.test_training import _cli_error, _equal_states, micro  # noqa: E402

# A consistency tuning of the micro network: ticks and resume points every step, stages of 2 steps.
TUNE = dict(data="digits", batch=16, max_images=40, seed=3, lr=1e-3, kimg_per_tick=0.016, snapshot_kimg=0.016,
            ect_stage_kimg=0.032, dropout=0.1, duration_kimg=0.048)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A micro EDM checkpoint (two steps of training; what matters here is its format)."""
    out = str(tmp_path_factory.mktemp("teacher") / "run")
    TL.training_loop(micro(outdir=out, duration_kimg=0.032, augment=0), echo=None, progress=False)
    return os.path.join(out, "ckpt.pt")


def tune(teacher: str, **kw) -> TL.TrainingOptions:
    return consistency_options(teacher, **{**TUNE, **kw})


# ----------------------------------------------------------------------------------------------
# The schedule: stages and r(t).


def test_stage_grows_by_one_every_stage_kimg():
    assert [ect_stage(n, 25) for n in (0, 24_999, 25_000, 49_999, 50_000, 75_000)] == [0, 0, 1, 1, 2, 3]
    assert ect_stage(3_200_000 * 7, 3200) == 7


def test_r_of_t_matches_hand_computed_values():
    t = torch.tensor([0.5, 1.0, 10.0, 80.0], dtype=torch.float64)
    for stage, q in ((0, 2.0), (3, 2.0), (1, 4.0)):
        expected = []
        for tv in t.tolist():
            adj = 1 + 8 / (1 + math.exp(tv))  # 1 + k sigmoid(-b t), k 8, b 1
            expected.append(max(tv * (1 - adj / q ** (stage + 1)), 0.0))
        assert torch.allclose(ect_r(t, stage, q=q), torch.tensor(expected, dtype=torch.float64), rtol=1e-12)
    # Stage 0 at q = 2: r = 0 for small t (the sigmoid makes adj > 2 there), about t / 2 for large t.
    r0 = ect_r(t, 0)
    assert r0[0] == 0 and r0[1] == 0 and r0[2] == pytest.approx(4.998184, abs=1e-6)
    assert ect_r(torch.tensor([1.0]), 3).item() == pytest.approx(1 - (1 + 8 / (1 + math.e)) / 16, rel=1e-7)


def test_each_stage_halves_the_gap_at_q_2():
    t = torch.logspace(-1, 2, 50, dtype=torch.float64)
    for stage in range(2, 7):  # from stage 2 on, q^(stage+1) = 8 > max adj = 5: r > 0 for every t
        gap, next_gap = t - ect_r(t, stage), t - ect_r(t, stage + 1)
        assert torch.allclose(next_gap, gap / 2, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# The loss.


class RecordingNet(torch.nn.Module):
    """p * dropout(x): records every call (inputs, grad mode, the dropout mask) - an identity at p = 1, no dropout."""

    def __init__(self, p: float = 1.0, dropout: float = 0.0):
        super().__init__()
        self.p = torch.nn.Parameter(torch.tensor(p))
        self.dropout = torch.nn.Dropout(dropout)
        self.calls: list[dict] = []

    def forward(self, x, sigma, labels=None, augment_labels=None):
        ones = self.dropout(torch.ones_like(x))
        self.calls.append({"x": x.detach().clone(), "sigma": sigma.detach().clone(), "grad": torch.is_grad_enabled(),
                           "mask": ones.detach().clone()})
        return self.p * x * ones


def _images(n=32):
    return torch.linspace(-1, 1, n * 64).reshape(n, 1, 8, 8)


def _draws(n, seed, P_mean=-1.1, P_std=2.0):
    """The t and eps the loss draws from a generator seeded with `seed` (t first, then the noise)."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn([n, 1, 1, 1], generator=g) * P_std + P_mean).exp()
    return t, torch.randn([n, 1, 8, 8], generator=g)


def test_identity_network_gives_the_noise_norm_with_the_1_over_t_minus_r_weight():
    # D(x) = x: D(x_t) - D(x_r) = (t - r) eps, and where r = 0, D(x_t) - y = t eps = (t - r) eps too.
    y = _images()
    for stage in (0, 2):
        loss_fn = ECTLoss(stage_kimg=1, images_seen=lambda stage=stage: stage * 1000)
        loss = loss_fn(RecordingNet(), y, generator=torch.Generator().manual_seed(5))
        t, eps = _draws(len(y), 5)
        assert loss.shape == (len(y),)
        assert torch.allclose(loss, eps.flatten(1).norm(dim=1), rtol=1e-5)
    assert bool((ect_r(t, 0) == 0).any()) and bool((ect_r(t, 0) > 0).any())  # both branches were taken


def test_pseudo_huber_metric():
    y = _images()
    c = 0.03
    loss = ECTLoss(c=c, stage_kimg=1, images_seen=lambda: 1000)(RecordingNet(), y,
                                                                 generator=torch.Generator().manual_seed(6))
    t, eps = _draws(len(y), 6)
    gap = (t - ect_r(t, 1)).flatten()
    d = gap * eps.flatten(1).norm(dim=1)
    assert torch.allclose(loss, (torch.sqrt(d**2 + c**2) - c) / gap, rtol=1e-5)


def test_r_side_shares_noise_and_dropout_mask_and_gets_no_gradient():
    y = _images(16)
    net = RecordingNet(p=1.3, dropout=0.5)
    loss_fn = ECTLoss(stage_kimg=1, images_seen=lambda: 2000)  # stage 2: r > 0 for every t
    loss = loss_fn(net, y, generator=torch.Generator().manual_seed(7))
    (t_call, r_call) = net.calls
    t, r = t_call["sigma"], r_call["sigma"]
    assert bool((r > 0).all()) and bool((r < t).all())
    assert t_call["grad"] and not r_call["grad"]
    assert torch.equal(t_call["mask"], r_call["mask"]) and 0 < float((t_call["mask"] == 0).float().mean()) < 1
    assert torch.allclose((t_call["x"] - y) / t, (r_call["x"] - y) / r, atol=1e-5)  # one eps for both

    # The gradient is the t-side's alone: d/dp of ||D_t - sg(D_r)|| / (t - r).
    loss.sum().backward()
    D_t = 1.3 * t_call["x"] * t_call["mask"]
    D_r = 1.3 * r_call["x"] * r_call["mask"]
    diff = (D_t - D_r).flatten(1)
    expected = ((diff * (t_call["x"] * t_call["mask"]).flatten(1)).sum(1) / diff.norm(dim=1) / (t - r).flatten()).sum()
    assert net.p.grad.item() == pytest.approx(expected.item(), rel=1e-4)
    with_r_gradient = ((diff * ((t_call["x"] - r_call["x"]) * t_call["mask"]).flatten(1)).sum(1)
                       / diff.norm(dim=1) / (t - r).flatten()).sum()
    assert abs(with_r_gradient.item() - expected.item()) > 0.1 * abs(expected.item())  # the test can tell them apart


def test_the_global_dropout_stream_continues_as_after_one_forward():
    torch.manual_seed(11)
    ECTLoss(stage_kimg=1, images_seen=lambda: 2000)(RecordingNet(dropout=0.5), _images(4),
                                                     generator=torch.Generator().manual_seed(1))
    after_loss = torch.rand(3)
    torch.manual_seed(11)
    RecordingNet(dropout=0.5)(_images(4), torch.ones(4, 1, 1, 1))
    assert torch.equal(after_loss, torch.rand(3))


def test_boundary_condition_at_r_zero():
    # At stage 0 small t give r = 0: there the target is the clean image y itself, D(x, 0) = x.
    class Zero(RecordingNet):
        def forward(self, x, sigma, labels=None, augment_labels=None):
            super().forward(x, sigma)
            return torch.zeros_like(x) * self.p

    y = _images()
    net = Zero()
    loss = ECTLoss(stage_kimg=1, images_seen=lambda: 0)(net, y, generator=torch.Generator().manual_seed(5))
    t, _ = _draws(len(y), 5)
    r = ect_r(t, 0).flatten()
    at_zero = r == 0
    assert bool(at_zero.any()) and bool((~at_zero).any())
    expected = y.flatten(1).norm(dim=1) / t.flatten()  # || 0 - y || / (t - 0)
    assert torch.allclose(loss[at_zero], expected[at_zero], rtol=1e-5)
    assert torch.allclose(loss[~at_zero], torch.zeros(int((~at_zero).sum())))  # 0 - 0 where r > 0
    assert bool((net.calls[1]["sigma"] > 0).all())  # the network is never evaluated at sigma = 0


def test_loss_settings_are_checked():
    for kw in (dict(q=1.0), dict(P_std=0), dict(c=-1), dict(stage_kimg=0)):
        with pytest.raises(InputError, match="ECTLoss: need"):
            ECTLoss(**kw)
    for kw in (dict(P_mean=float("nan")), dict(q=float("inf")), dict(P_std=float("inf")), dict(stage_kimg=float("inf")),
               dict(q=True), dict(k="8")):
        with pytest.raises(InputError, match="ECTLoss: (P_mean|q|P_std|stage_kimg|k) must be a (finite )?number"):
            ECTLoss(**kw)


def test_a_stage_past_float32_resolution_is_refused_before_it_divides_by_zero(teacher):
    from edm_deploy.training.options import check_options, consistency_options

    t = torch.tensor([0.01, 1.0, 80.0])
    loss = ECTLoss(stage_kimg=1, images_seen=lambda: 15_000)  # stage 15: the gap shrunk by 2^16, still resolved
    images = torch.zeros(3, 1, 8, 8)
    out = loss(lambda x, sigma, labels, augment_labels=None: x * 0, images)
    assert torch.isfinite(out).all()
    gap = t * (1 + 8 * torch.sigmoid(-t)) / 2.0**16
    assert torch.allclose(ect_gap(t, 15), gap, rtol=1e-6)
    assert torch.allclose(t - ect_r(t, 15), gap, rtol=0.05)  # t - r is already only a few hundred ulps
    with pytest.raises(InputError, match="stage 17: the gap t - r has shrunk by q\\^18"):
        ECTLoss(stage_kimg=1, images_seen=lambda: 17_000)(lambda x, *a, **k: x, images)
    with pytest.raises(InputError, match="reaches stage 30"):
        check_options(consistency_options(teacher, preset="tiny", duration_kimg=750))


# ----------------------------------------------------------------------------------------------
# Tuning runs.


def _consistency_loss_of(network_state, network, seed=0, stage=0):
    from edm_deploy.training.checkpoint import build_network
    from edm_deploy.training.dataset import load_digits_split

    net = build_network(network)
    net.load_state_dict(network_state)
    tr_x, tr_y = load_digits_split()[:2]
    x = torch.from_numpy(tr_x[:16]).float().repeat(8, 1, 1, 1) / 127.5 - 1
    y = torch.eye(10)[torch.from_numpy(tr_y[:16])].repeat(8, 1)
    with torch.no_grad():
        loss = ECTLoss(stage_kimg=1, images_seen=lambda: stage * 1000)(net.eval(), x, y,
                                                                        generator=torch.Generator().manual_seed(seed))
    return loss.mean().item()


def test_a_short_tuning_lowers_the_consistency_loss_and_starts_at_the_teacher(teacher):
    # 40 steps on 16 images in stage 0. Its loss is dominated by small t, where r = 0 and the task
    # is denoising (||D(y + t eps, t) - y|| / t), which a two-step teacher has barely begun: the
    # loss falls slowly, so the bar is modest (measured: 5.97 -> 5.41, 0.91x).
    opts = tune(teacher, max_images=16, lr=1e-2, dropout=0, duration_kimg=0.016 * 40, kimg_per_tick=0.32,
                ect_stage_kimg=100)
    res = TL.training_loop(opts, echo=None, progress=False)
    ckpt = load_checkpoint(teacher)
    before = _consistency_loss_of(ckpt["ema"], ckpt["network"])
    after = _consistency_loss_of(res.net.state_dict(), res.network)
    assert after < 0.95 * before, (before, after)
    # The run started from the teacher's EMA weights: the EMA (half-life 887 kimg) has barely moved.
    drift = max((res.ema.state_dict()[k] - v).abs().max().item() for k, v in ckpt["ema"].items())
    assert drift < 1e-3


def test_resume_after_a_kill_equals_the_uninterrupted_tuning(teacher, tmp_path, monkeypatch):
    steps = 6  # stages of 2 steps: the run crosses stages 0 -> 2, the kill falls inside stage 1
    full = TL.training_loop(tune(teacher, outdir=str(tmp_path / "full"), duration_kimg=0.016 * steps),
                            echo=None, progress=False)
    real = TL.make_consistency_loss
    calls = {"n": 0}

    def flaky(options, images_seen):
        inner = real(options, images_seen)

        def loss(**kw):
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
            return inner(**kw)

        return loss

    monkeypatch.setattr(TL, "make_consistency_loss", flaky)
    part = str(tmp_path / "part")
    with pytest.raises(KeyboardInterrupt):
        TL.training_loop(tune(teacher, outdir=part, duration_kimg=0.016 * steps), echo=None, progress=False)
    monkeypatch.setattr(TL, "make_consistency_loss", real)
    ckpt = os.path.join(part, "ckpt.pt")
    assert load_checkpoint(ckpt)["training_state"]["cur_nimg"] == 48
    resumed = TL.training_loop(TL.resume_options(ckpt), echo=None, progress=False)
    assert resumed.cur_nimg == full.cur_nimg
    assert _equal_states(full.net.state_dict(), resumed.net.state_dict())
    assert _equal_states(full.ema.state_dict(), resumed.ema.state_dict())
    stats = [json.loads(line) for line in open(os.path.join(part, "stats.jsonl"))]
    assert [s["ect_stage"] for s in stats] == [0, 1, 1, 2, 2, 3]


def test_tuned_checkpoint_and_manifests_record_the_teacher(teacher, tmp_path):
    pytest.importorskip("onnxruntime")
    from edm_deploy.commands.info import summary_lines
    from edm_deploy.export.onnx_export import export_onnx
    from edm_deploy.loading import load, read_manifest
    from edm_deploy.training.checkpoint import load_network

    out = str(tmp_path / "ect")
    res = TL.training_loop(tune(teacher, outdir=out, duration_kimg=0.032), echo=None, progress=False)
    ckpt_path = os.path.join(out, "ckpt.pt")
    record = load_checkpoint(ckpt_path)["network"]["consistency"]
    assert record == {"method": "ect", "from_checkpoint": "ckpt.pt", "from_sha256": sha256_file(teacher),
                      "from_kimg": 0.032}
    assert res.network["init_kwargs"]["dropout"] == 0.1  # the tuning's dropout, the teacher's weights
    snapshot = sorted(f for f in os.listdir(out) if f.startswith("network-snapshot-"))[0]
    assert load_checkpoint(os.path.join(out, snapshot))["network"]["consistency"] == record
    options = json.load(open(os.path.join(out, "training_options.json")))
    assert options["network"]["consistency"] == record and options["options"]["optimizer"] == "radam"

    manifest = read_manifest(ckpt_path)
    assert manifest["consistency"] == record and "consistency" not in manifest["network"]
    assert any(line.startswith("consistency : ect") and sha256_file(teacher)[:16] in line for line in summary_lines(manifest))
    assert not any(line.startswith("consistency") for line in summary_lines(read_manifest(teacher)))
    onnx_path = str(tmp_path / "ect.onnx")
    export_onnx(load_network(ckpt_path), load_checkpoint(ckpt_path)["network"], onnx_path, max_batch=4, opt_batch=2,
                source_path=ckpt_path)
    assert read_manifest(onnx_path)["consistency"] == record
    for path, tuned in ((onnx_path, True), (ckpt_path, True), (teacher, False)):
        with load(path, device="cpu") as den:
            assert den.consistency_tuned is tuned
            assert (den.consistency == record) if tuned else den.consistency is None


def test_a_forged_consistency_record_is_refused(teacher, tmp_path):
    from edm_deploy.runtime.core.manifest import validate

    ckpt = load_checkpoint(teacher)
    network = dict(ckpt["network"], consistency={"method": "magic", "from_sha256": "00"})
    path = str(tmp_path / "forged.pt")
    save_checkpoint(path, ckpt["network"], ckpt["ema"])
    torch_ckpt = torch.load(path, weights_only=True)
    torch_ckpt["network"] = network
    torch.save(torch_ckpt, path)
    with pytest.raises(InputError, match="consistency entry must name a method"):
        load_checkpoint(path)
    manifest = {"format": "edm-deploy-manifest", "version": 1, "img_resolution": 8, "img_channels": 1, "label_dim": 0,
                "sigma_min": 0, "sigma_max": None, "precond": "edm", "sigma_rounding": {"kind": "identity"},
                "consistency": {"method": "ect", "from_sha256": "x" * 64}}
    with pytest.raises(InputError, match="consistency entry"):
        validate(manifest, "m.onnx")


# ----------------------------------------------------------------------------------------------
# Bad input: one clear error, before anything is written.


def test_what_cannot_be_tuned(teacher, tmp_path):
    from edm_deploy.training.dataset import write_dataset_zip

    out = tmp_path / "out"
    not_ckpt = tmp_path / "notes.pt"
    not_ckpt.write_text("hello")
    opts = tune(teacher, outdir=str(out))
    opts.tune_from = str(not_ckpt)
    with pytest.raises(InputError, match="not a torch.save file"):
        TL.training_loop(opts, echo=None, progress=False)
    vp = str(tmp_path / "vp")
    TL.training_loop(micro(outdir=vp, precond="vp", duration_kimg=0.016, augment=0), echo=None, progress=False)
    with pytest.raises(InputError, match="holds a VPPrecond network; consistency tuning .* does not support VP, VE"):
        TL.training_loop(tune(os.path.join(vp, "ckpt.pt"), outdir=str(out)), echo=None, progress=False)
    tuned = str(tmp_path / "tuned")
    TL.training_loop(tune(teacher, outdir=tuned, duration_kimg=0.016), echo=None, progress=False)
    with pytest.raises(InputError, match="already consistency-tuned"):
        TL.training_loop(tune(os.path.join(tuned, "ckpt.pt"), outdir=str(out)), echo=None, progress=False)
    big = str(tmp_path / "digits16.zip")
    write_dataset_zip("digits", big, resolution=16, max_images=40)
    with pytest.raises(InputError, match=r"trained on 1x8x8 images with label_dim 10, but .* gives 1x16x16"):
        TL.training_loop(tune(teacher, outdir=str(out), data=big), echo=None, progress=False)
    five = str(tmp_path / "five.zip")
    write_dataset_zip("digits", five, max_images=5)
    with pytest.raises(InputError, match=r"label_dim 10, but .* gives 1x8x8 with label_dim [1-9]$"):
        TL.training_loop(tune(teacher, outdir=str(out), data=five), echo=None, progress=False)
    with pytest.raises(InputError, match=r"class-conditional \(10 classes\): tune it with cond"):
        TL.training_loop(tune(teacher, outdir=str(out), cond=False), echo=None, progress=False)
    with pytest.raises(InputError, match="trained without augmentation labels"):
        TL.training_loop(tune(teacher, outdir=str(out), augment=0.1), echo=None, progress=False)
    for name, value in (("arch", "ncsnpp"), ("cbase", 32), ("precond", "vp")):
        with pytest.raises(InputError, match=f"^{name} cannot be set for a consistency tuning") as info:
            TL.training_loop(tune(teacher, outdir=str(out), **{name: value}), echo=None, progress=False)
        assert info.value.param == name
    assert not out.exists()


def test_consistency_options_need_each_other():
    with pytest.raises(InputError, match="needs consistency") as info:
        TL.check_options(micro(ect_q=4.0))
    assert info.value.param == "ect_q"
    with pytest.raises(InputError, match="^tune_from is the checkpoint of a consistency tuning"):
        TL.check_options(micro(tune_from="x.pt"))
    with pytest.raises(InputError, match="starts from a trained EDM checkpoint"):
        TL.check_options(TL.TrainingOptions(consistency=True))
    with pytest.raises(InputError, match="ect_q must be a number above 1"):
        TL.check_options(TL.TrainingOptions(consistency=True, tune_from="x.pt", ect_q=1.0))
    with pytest.raises(InputError, match="unknown optimizer 'sgd'"):
        TL.check_options(micro(optimizer="sgd"))


def test_train_cli_consistency_errors(teacher, tmp_path, capsys):
    out = str(tmp_path / "out")
    base = ["train", "--outdir", out, "--data", "digits", "--no-progress"]
    assert "--consistency tunes a trained EDM checkpoint: give it with --from" in _cli_error(capsys, base + ["--consistency"])
    assert "error: --from is the checkpoint of a consistency tuning" in _cli_error(capsys, base + ["--from", teacher])
    assert "error: --ect-q is a setting of consistency tuning" in _cli_error(capsys, base + ["--ect-q", "4"])
    assert "error: --arch cannot be set for a consistency tuning" in _cli_error(
        capsys, base + ["--consistency", "--from", teacher, "--arch", "adm"])
    assert "checkpoint not found" in _cli_error(capsys, base + ["--consistency", "--from", str(tmp_path / "missing.pt")])
    assert "unknown consistency preset 'ffhq64'" in _cli_error(
        capsys, ["train", "--outdir", out, "--consistency", "--from", teacher, "--preset", "ffhq64"])
    assert not os.path.exists(out)


def test_train_cli_tunes_and_resumes(teacher, tmp_path, capsys):
    from edm_deploy.cli import main

    out = str(tmp_path / "ect")
    args = ["train", "--consistency", "--from", teacher, "--data", "digits", "--outdir", out, "--batch", "16",
            "--max-images", "32", "--duration", "0.032", "--tick", "0.016", "--ect-stage", "0.016", "--ect-q", "4",
            "--no-progress"]
    main(args)
    text = capsys.readouterr().out
    assert "consistency tuning (ECT) of" in text and "ect stage 1" in text
    options = load_checkpoint(os.path.join(out, "ckpt.pt"))["training_state"]["options"]
    assert options["consistency"] and options["ect_q"] == 4.0 and options["cond"] and options["optimizer"] == "radam"
    main(["train", "--outdir", out, "--resume", os.path.join(out, "ckpt.pt"), "--duration", "0.048", "--no-progress"])
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["training_state"]["cur_nimg"] == 48
    assert "--ect-q: 4.0 in the run, 2.0 now" in _cli_error(
        capsys, ["train", "--outdir", out, "--resume", os.path.join(out, "ckpt.pt"), "--ect-q", "2"])


def _ddp_tune_worker(rank: int, world: int, port: int, teacher: str, outdir: str, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    res = TL.training_loop(tune(teacher, outdir=outdir, duration_kimg=0.016 * 3, device="cpu"), echo=None,
                           progress=False)
    torch.save({"net": res.net.state_dict(), "ema": res.ema.state_dict()}, os.path.join(result_dir, f"rank{rank}.pt"))


def test_ddp_tuning_keeps_the_two_processes_identical(teacher, tmp_path):
    # The r side runs through the DDP module without gradient between the t side's forward and
    # the backward; the gradients must still be synchronised, so both ranks end with equal weights.
    import torch.multiprocessing as mp

    from tests.test_training import _free_port

    outdir, result_dir = str(tmp_path / "run"), str(tmp_path / "res")
    os.makedirs(result_dir)
    mp.spawn(_ddp_tune_worker, args=(2, _free_port(), teacher, outdir, result_dir), nprocs=2, join=True)
    r0 = torch.load(os.path.join(result_dir, "rank0.pt"), weights_only=True)
    r1 = torch.load(os.path.join(result_dir, "rank1.pt"), weights_only=True)
    assert _equal_states(r0["net"], r1["net"]) and _equal_states(r0["ema"], r1["ema"])
    teacher_ema = load_checkpoint(teacher)["ema"]
    assert not _equal_states(r0["net"], teacher_ema)  # it did train
    ckpt = load_checkpoint(os.path.join(outdir, "ckpt.pt"))
    assert ckpt["training_state"]["world_size"] == 2 and ckpt["network"]["consistency"]["method"] == "ect"
    assert _equal_states(ckpt["ema"], r0["ema"])
