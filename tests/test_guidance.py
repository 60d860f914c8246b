"""Guidance as a composition of two contract denoisers: exactness, the interval, the batched
classifier-free call, analytic checks, and the errors. Torch-free except the device-array test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edm_deploy.runtime import GaussianDenoiser, StackedRandomGenerator, edm_sampler
from edm_deploy.runtime.core.contract import DenoiserBase
from edm_deploy.runtime.core.errors import InputError
from edm_deploy.runtime.core.rounding import TableRound
from edm_deploy.runtime.sampling.guidance import GuidedDenoiser, mix
from tests.conftest import requires_torch


class Counting(DenoiserBase):
    """Wraps a denoiser, counting calls and rows."""

    def __init__(self, inner, max_batch=None):
        self.inner, self.calls, self.rows = inner, 0, []
        self.img_channels, self.img_resolution = inner.img_channels, inner.img_resolution
        self.label_dim, self.sigma_min, self.sigma_max = inner.label_dim, inner.sigma_min, inner.sigma_max
        self.max_batch = max_batch

    def round_sigma(self, sigma):
        return self.inner.round_sigma(sigma)

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        self.rows.append(int(x.shape[0]))
        return self.inner(x, sigma, class_labels)


class ConditionalGaussian(DenoiserBase):
    """Class c's data is N(means[c], std^2); the zero label vector is the unconditional N(mean, std^2)."""

    def __init__(self, means, std=0.5, resolution=4):
        self.means = np.asarray(means, np.float64)
        self.std, self.img_channels, self.img_resolution, self.label_dim = std, 1, resolution, len(means)

    def __call__(self, x, sigma, class_labels=None):
        x = np.asarray(x, np.float64)
        labels = np.zeros((len(x), self.label_dim)) if class_labels is None else np.asarray(class_labels, np.float64)
        mu = np.where(labels.sum(1) > 0, labels @ self.means, self.means.mean()).reshape(-1, 1, 1, 1)
        s2 = np.square(np.asarray(sigma, np.float64)).reshape(-1, 1, 1, 1)
        return mu + self.std**2 / (self.std**2 + s2) * (x - mu)


def _latents(n=6, res=8):
    rnd = StackedRandomGenerator(range(n))
    return rnd, rnd.randn((1, res, res))


def test_a_guide_equal_to_the_model_reproduces_unguided_sampling_exactly():
    _, lat = _latents()
    model = GaussianDenoiser(1, 8, mu=0.2, std=0.4)
    want = edm_sampler(model, lat, num_steps=10)
    for guide in (model, GaussianDenoiser(1, 8, mu=0.2, std=0.4)):
        for w in (0.3, 1.0, 2.0, 3.5):
            np.testing.assert_array_equal(edm_sampler(GuidedDenoiser(model, guide, w), lat, num_steps=10), want)


def test_weight_one_is_exact_and_never_calls_the_guide():
    _, lat = _latents()
    model, guide = GaussianDenoiser(1, 8, mu=0.2, std=0.4), Counting(GaussianDenoiser(1, 8, mu=-0.3, std=0.7))
    np.testing.assert_array_equal(edm_sampler(GuidedDenoiser(model, guide, 1.0), lat, num_steps=8),
                                  edm_sampler(model, lat, num_steps=8))
    assert guide.calls == 0


def test_composition_with_analytic_denoisers_follows_the_formula():
    model, weak = GaussianDenoiser(1, 8, mu=0.2, std=0.4), GaussianDenoiser(1, 8, mu=-0.1, std=0.9)
    rng = np.random.default_rng(0)
    x, sigma = rng.standard_normal((5, 1, 8, 8)) * 3, np.array([0.01, 0.3, 1.0, 7.0, 80.0])
    for w in (0.0, 0.25, 1.7, 3.0):
        want = weak(x, sigma) + w * (model(x, sigma) - weak(x, sigma))
        np.testing.assert_allclose(GuidedDenoiser(model, weak, w)(x, sigma), want, rtol=0, atol=1e-12)
    assert mix(np.array([1.0]), np.array([5.0]), 1.0)[0] == 1.0


def test_the_interval_is_lo_exclusive_hi_inclusive_and_outside_it_the_guide_is_not_called():
    model, weak = GaussianDenoiser(1, 8, mu=0.2, std=0.4), GaussianDenoiser(1, 8, mu=-0.1, std=0.9)
    guide = Counting(weak)
    guided = GuidedDenoiser(model, guide, 2.0, interval=(0.5, 2.0))
    x = np.ones((4, 1, 8, 8))
    sigma = np.array([0.5, 0.50001, 2.0, 2.00001])
    out = guided(x, sigma)
    expect_guided = [False, True, True, False]
    for row, g in enumerate(expect_guided):
        want = weak(x[row:row + 1], sigma[row:row + 1]) + 2.0 * (model(x[row:row + 1], sigma[row:row + 1]) -
                                                                 weak(x[row:row + 1], sigma[row:row + 1]))
        ref = want if g else model(x[row:row + 1], sigma[row:row + 1])
        np.testing.assert_allclose(out[row:row + 1], ref, atol=1e-12)
    guide.calls = 0
    guided(x, np.full(4, 3.0))
    guided(x, np.full(4, 0.1))
    assert guide.calls == 0
    # In a sampler run, the guide runs exactly at the evaluations inside the interval.
    _, lat = _latents()
    guided = GuidedDenoiser(model, guide, 2.0, interval=(0.28, 1.6))
    edm_sampler(guided, lat, num_steps=18)
    from edm_deploy.runtime.core.schedules import edm_sigma_steps

    steps = edm_sigma_steps(18, 0.002, 80)
    inside_first = sum(0.28 < s <= 1.6 for s in steps)  # every step evaluates at t_i ...
    inside_second = sum(0.28 < s <= 1.6 for s in steps[1:])  # ... and all but the last at t_{i+1}
    assert guide.calls == inside_first + inside_second


def test_classifier_free_guidance_batches_both_branches_into_one_call_and_equals_two_calls():
    cond = ConditionalGaussian([-0.5, 0.0, 0.7])
    one = Counting(cond)  # no batch limit: one call of 2B rows
    two = Counting(cond, max_batch=5)  # 2B = 8 > 5: two calls of B rows
    x = np.random.default_rng(1).standard_normal((4, 1, 4, 4))
    labels = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    sigma = np.full(4, 1.3)
    a = GuidedDenoiser(one, None, 2.5)(x, sigma, labels)
    b = GuidedDenoiser(two, None, 2.5)(x, sigma, labels)
    np.testing.assert_array_equal(a, b)
    assert one.rows == [8] and two.rows == [4, 4]
    uncond = cond(x, sigma, np.zeros_like(labels))
    np.testing.assert_allclose(a, uncond + 2.5 * (cond(x, sigma, labels) - uncond), atol=1e-12)


def test_the_composition_is_a_denoiser_with_the_intersected_range_and_smaller_batch_limit():
    model, weak = Counting(GaussianDenoiser(1, 8), max_batch=16), Counting(GaussianDenoiser(1, 8), max_batch=4)
    model.sigma_min, model.sigma_max, weak.sigma_min, weak.sigma_max = 0.002, 80.0, 0.01, 120.0
    g = GuidedDenoiser(model, weak, 2.0)
    assert (g.sigma_min, g.sigma_max, g.max_batch) == (0.01, 80.0, 4)
    _, lat = _latents()
    out = edm_sampler(g, lat, num_steps=4)
    assert out.shape == lat.shape and np.isfinite(out).all()


@pytest.mark.parametrize("guide,match", [
    (GaussianDenoiser(3, 8), "guide makes 3x8x8"),
    (GaussianDenoiser(1, 16), "guide makes 1x16x16"),
])
def test_mismatched_guides_are_refused(guide, match):
    with pytest.raises(InputError, match=match):
        GuidedDenoiser(GaussianDenoiser(1, 8), guide, 2.0)


def test_mismatched_classes_rounding_range_and_weights_are_refused():
    cond = ConditionalGaussian([0.0, 1.0], resolution=8)
    with pytest.raises(InputError, match="2 classes"):
        GuidedDenoiser(GaussianDenoiser(1, 8), cond, 2.0)
    table = GaussianDenoiser(1, 8)
    table.round_sigma = TableRound(np.geomspace(80, 0.002, 50))
    with pytest.raises(InputError, match="rounds noise levels differently"):
        GuidedDenoiser(GaussianDenoiser(1, 8), table, 2.0)
    far = GaussianDenoiser(1, 8)
    far.sigma_min, far.sigma_max = 100.0, 200.0
    near = GaussianDenoiser(1, 8)
    near.sigma_max = 80.0
    with pytest.raises(InputError, match="does not overlap"):
        GuidedDenoiser(near, far, 2.0)
    with pytest.raises(InputError, match="unconditional"):
        GuidedDenoiser(GaussianDenoiser(1, 8), None, 2.0)
    for interval in [(2.0, 1.0), (-1, 3), (math.nan, 1.0), (1,)]:
        with pytest.raises(InputError, match="guidance_interval"):
            GuidedDenoiser(GaussianDenoiser(1, 8), GaussianDenoiser(1, 8), 2.0, interval=interval)
    with pytest.raises(InputError, match="guidance"):
        GuidedDenoiser(GaussianDenoiser(1, 8), GaussianDenoiser(1, 8), math.inf)


@requires_torch
def test_guidance_on_a_device_array_state_matches_the_host_state():
    import torch

    class TorchGaussian(GaussianDenoiser):
        def __call__(self, x, sigma, class_labels=None):
            if isinstance(x, torch.Tensor):
                return torch.from_numpy(super().__call__(x.cpu().numpy(), sigma))
            return super().__call__(x, sigma)

        def to_device(self, host_array):
            return torch.from_numpy(np.ascontiguousarray(host_array))

    model, weak = TorchGaussian(1, 8, mu=0.2, std=0.4), TorchGaussian(1, 8, mu=-0.1, std=0.9)
    _, lat = _latents()
    g = GuidedDenoiser(model, weak, 2.0, interval=(0.3, 5.0))
    host = edm_sampler(g, lat, num_steps=8)
    device = edm_sampler(g, torch.from_numpy(lat), num_steps=8)
    assert isinstance(device, torch.Tensor)
    np.testing.assert_array_equal(device.numpy(), host)


# -- the command line --------------------------------------------------------------------------

from tests.conftest import requires_onnx, run_cli  # noqa: E402


def _with_label_dropout(src: str, dst: str, p: float) -> str:
    import json

    import onnx

    from edm_deploy.runtime.core.manifest import ONNX_METADATA_KEY

    model = onnx.load(src)
    for prop in model.metadata_props:
        if prop.key == ONNX_METADATA_KEY:
            manifest = json.loads(prop.value)
            manifest["network"]["init_kwargs"]["label_dropout"] = p
            prop.value = json.dumps(manifest)
    onnx.save(model, dst)
    return dst


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory):
    from tests.onnx_oracles import gaussian_onnx

    d = tmp_path_factory.mktemp("guidance")
    return {
        "model": gaussian_onnx(str(d / "model.onnx"), mu=0.2, std=0.4, label_dim=10),
        "guide": gaussian_onnx(str(d / "guide.onnx"), mu=-0.1, std=0.9, label_dim=10),
        "rgb": gaussian_onnx(str(d / "rgb.onnx"), channels=3, label_dim=10),
        "cfg": _with_label_dropout(gaussian_onnx(str(d / "c0.onnx"), label_dim=10), str(d / "cfg.onnx"), 0.1),
    }


def _pngs(folder):
    import os

    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder)) if f.endswith(".png")}


@requires_onnx
def test_cli_guide_equal_to_the_model_reproduces_unguided_sampling(onnx_models, tmp_path, cli_env):
    base = ["sample", onnx_models["model"], "-n", "6", "--steps", "6"]
    assert run_cli(base + ["--outdir", str(tmp_path / "plain")], env=cli_env).returncode == 0
    res = run_cli(base + ["--guide", onnx_models["model"], "--guidance", "2.5", "--outdir", str(tmp_path / "self")],
                  env=cli_env)
    assert res.returncode == 0, res.stderr
    assert _pngs(tmp_path / "self") == _pngs(tmp_path / "plain")


@requires_onnx
def test_cli_autoguidance_changes_images_and_its_settings_guard_the_resume(onnx_models, tmp_path, cli_env):
    import json

    from edm_deploy.runtime.output.writers import RUN_RECORD

    out = tmp_path / "g"
    base = ["sample", onnx_models["model"], "-n", "6", "--steps", "6", "--guide", onnx_models["guide"], "--outdir", str(out)]
    res = run_cli(base + ["--guidance", "2", "--guidance-interval", "0.3,5"], env=cli_env)
    assert res.returncode == 0, res.stderr
    assert "autoguided" in res.stderr
    assert run_cli(["sample", onnx_models["model"], "-n", "6", "--steps", "6", "--outdir", str(tmp_path / "p")],
                   env=cli_env).returncode == 0
    assert _pngs(out) != _pngs(tmp_path / "p")
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["guidance"] == 2 and record["guidance_interval"] == [0.3, 5] and len(record["guide_sha256"]) == 64
    res = run_cli(base + ["--guidance", "3", "--guidance-interval", "0.3,5"], env=cli_env)
    assert res.returncode == 1 and "guidance" in res.stderr


@requires_onnx
def test_cli_classifier_free_guidance_needs_label_dropout(onnx_models, tmp_path, cli_env):
    res = run_cli(["sample", onnx_models["model"], "-n", "2", "--guidance", "2", "--outdir", str(tmp_path / "a")],
                  env=cli_env)
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 1 and len(line) == 1 and "--cond-drop" in line[0] and "--guide" in line[0]
    res = run_cli(["sample", onnx_models["cfg"], "-n", "4", "--steps", "4", "--guidance", "2",
                   "--outdir", str(tmp_path / "b")], env=cli_env)
    assert res.returncode == 0, res.stderr
    assert "classifier-free" in res.stderr


@requires_onnx
@pytest.mark.parametrize("extra,match", [
    (["--guide", "RGB", "--guidance", "2"], "guide makes 3x8x8"),
    (["--guide", "GUIDE"], "--guidance (the weight W) is needed"),
    (["--guide", "GUIDE", "--guidance", "2", "--guidance-interval", "5,1"], "0 <= lo < hi"),
    (["--guide", "GUIDE", "--guidance", "nan"], "not a finite number"),
    (["--guide", "GUIDE", "--guidance", "2", "--guidance-interval", "abc"], "two numbers"),
])
def test_cli_guidance_errors_are_one_line(onnx_models, tmp_path, cli_env, extra, match):
    extra = [onnx_models["rgb"] if a == "RGB" else onnx_models["guide"] if a == "GUIDE" else a for a in extra]
    res = run_cli(["sample", onnx_models["model"], "-n", "2", *extra, "--outdir", str(tmp_path / "o")], env=cli_env)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 1 and len(errors) == 1 and match in errors[0], res.stderr


@requires_torch
def test_cond_drop_is_trained_recorded_exported_and_enables_classifier_free_guidance(tmp_path, cli_env):
    out = tmp_path / "run"
    res = run_cli(["train", "--preset", "tiny", "--outdir", str(out), "--duration", "0.5", "--cond-drop", "0.1",
                   "--tick", "0.5", "--no-progress"], env=cli_env)
    assert res.returncode == 0, res.stderr
    import torch

    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["network"]["init_kwargs"]["label_dropout"] == 0.1
    res = run_cli(["export", str(out / "ckpt.pt"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")], env=cli_env)
    assert res.returncode == 0, res.stderr
    info = run_cli(["info", str(tmp_path / "m.onnx")], env=cli_env)
    assert "label dropout 0.1" in info.stdout
    res = run_cli(["sample", str(tmp_path / "m.onnx"), "-n", "4", "--steps", "4", "--guidance", "1.5",
                   "--grid", str(tmp_path / "g.png")], env=cli_env)
    assert res.returncode == 0 and "classifier-free" in res.stderr, res.stderr
    bad = run_cli(["train", "--preset", "tiny", "--uncond", "--outdir", str(tmp_path / "bad"), "--cond-drop", "0.1"],
                  env=cli_env)
    assert bad.returncode == 1 and "--cond-drop" in bad.stderr and not (tmp_path / "bad").exists()
