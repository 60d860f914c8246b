"""The onnxruntime backend, the generate loop, writers and `edm-deploy sample`, torch-free.

The model is a hand-built ONNX graph of the Gaussian oracle (tests/onnx_oracles.py), so every
result has an exact NumPy counterpart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from edm_deploy.runtime import GaussianDenoiser, StackedRandomGenerator, edm_sampler
from edm_deploy.runtime.core.errors import InputError, NumericalError
from edm_deploy.runtime.sampling.generate import generate, quantize_uint8
from edm_deploy.runtime.sampling.seeds import parse_seeds, parse_shard, shard_batches
from tests.conftest import REPO, requires_onnx, run_cli

pytestmark = requires_onnx


@pytest.fixture(scope="module")
def oracle_files(tmp_path_factory):
    from tests.onnx_oracles import gaussian_onnx, nan_onnx

    d = tmp_path_factory.mktemp("oracles")
    return {
        "uncond": gaussian_onnx(str(d / "gauss.onnx")),
        "cond": gaussian_onnx(str(d / "gauss_cond.onnx"), label_dim=10),
        "rgb": gaussian_onnx(str(d / "gauss_rgb.onnx"), channels=3, resolution=16, max_batch=4),
        "nan": nan_onnx(str(d / "nan.onnx")),
    }


def test_onnxruntime_backend_matches_numpy_oracle(oracle_files):
    from edm_deploy.loading import load

    den = load(oracle_files["uncond"], device="cpu")
    assert den.provider == "CPUExecutionProvider"
    rnd = StackedRandomGenerator(range(6))
    lat = rnd.randn((1, 8, 8))
    out = edm_sampler(den, lat, num_steps=18)
    ref = edm_sampler(GaussianDenoiser(1, 8, mu=0.3, std=0.5), lat, num_steps=18)
    assert np.abs(out - ref).max() < 1e-5
    assert den.calls == 35


def test_batches_above_max_batch_are_split_transparently(oracle_files):
    from edm_deploy.loading import load

    den = load(oracle_files["rgb"], device="cpu", max_batch=3)
    assert den.max_batch == 3
    x = np.random.default_rng(0).standard_normal((10, 3, 16, 16))
    sigma = np.linspace(0.1, 5, 10)
    split = den(x, sigma)
    whole = load(oracle_files["rgb"], device="cpu")(x, sigma)
    assert split.shape == (10, 3, 16, 16)
    np.testing.assert_array_equal(split, whole)


def test_same_seeds_same_images_whatever_the_batch(oracle_files):
    from edm_deploy.loading import load

    den = load(oracle_files["cond"], device="cpu")
    a = generate(den, seeds=range(20), batch_size=20, num_steps=8)
    b = generate(den, seeds=range(20), batch_size=3, num_steps=8)
    np.testing.assert_array_equal(a, b)
    c = generate(den, seeds=[7], batch_size=1, num_steps=8)
    np.testing.assert_array_equal(c[0], a[7])


def test_quantization_matches_reference_rule():
    x = np.array([-1.5, -1.0, -0.0039, 0.0, 0.5, 1.0, 2.0]).reshape(1, 1, 1, 7)
    q = quantize_uint8(x)
    np.testing.assert_array_equal(q.reshape(-1), np.clip(x.reshape(-1) * 127.5 + 128, 0, 255).astype(np.uint8))
    assert q.shape == (1, 1, 7, 1)


def test_nan_output_names_the_seeds(oracle_files):
    from edm_deploy.loading import load

    den = load(oracle_files["nan"], device="cpu")
    with pytest.raises(NumericalError, match="seeds"):
        generate(den, seeds=range(40), num_steps=4)


def test_seed_parsing_and_sharding():
    assert parse_seeds("0-3,10") == [0, 1, 2, 3, 10]
    with pytest.raises(InputError):
        parse_seeds("5-2")
    with pytest.raises(InputError):
        parse_seeds("a-b")
    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(InputError):
        parse_shard("4/4")
    seeds = list(range(1000))
    shards = [[s for b in shard_batches(seeds, 64, r, 3) for s in b] for r in range(3)]
    assert sorted(sum(shards, [])) == seeds
    assert all(set(a).isdisjoint(b) for i, a in enumerate(shards) for b in shards[i + 1:])


def _read_pngs(folder):
    from PIL import Image

    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".png"):
                out[os.path.relpath(os.path.join(root, f), folder)] = np.asarray(Image.open(os.path.join(root, f)))
    return out


def _other_files(folder):
    return [f for _, _, files in os.walk(folder) for f in files if not f.endswith(".png")]


def test_sample_cli_png_npz_grid(oracle_files, tmp_path, cli_env):
    res = run_cli(["sample", oracle_files["cond"], "-n", "30", "--outdir", str(tmp_path / "png"), "--batch", "8", "--subdirs", "--steps", "6"], env=cli_env)
    assert res.returncode == 0, res.stderr
    assert "img/s" in res.stdout and "NFE 11/image" in res.stdout
    pngs = _read_pngs(tmp_path / "png")
    assert len(pngs) == 30 and os.path.join("000000", "000029.png") in pngs
    res = run_cli(["sample", oracle_files["cond"], "--seeds", "0-29", "--npz", str(tmp_path / "s.npz"), "--batch", "7", "--steps", "6"], env=cli_env)
    assert res.returncode == 0, res.stderr
    data = np.load(tmp_path / "s.npz")
    assert data["images"].shape == (30, 8, 8, 1) and data["images"].dtype == np.uint8
    assert data["seeds"].tolist() == list(range(30)) and data["labels"].min() >= 0
    # PNG tree and npz hold identical pixels for every seed.
    for seed in range(30):
        np.testing.assert_array_equal(pngs[os.path.join("000000", f"{seed:06d}.png")], data["images"][seed, :, :, 0])
    assert not os.path.exists(str(tmp_path / "s.npz") + ".parts")
    res = run_cli(["sample", oracle_files["cond"], "-n", "10", "--grid", str(tmp_path / "g.png"), "--class", "3", "--steps", "4"], env=cli_env)
    assert res.returncode == 0, res.stderr
    assert os.path.getsize(tmp_path / "g.png") > 0


@pytest.mark.parametrize(
    "args,match",
    [
        (["--class", "10"], "out of range"),
        (["--seeds", "3-1"], "seed range"),
    ],
)
def test_sample_cli_bad_input_conditional(oracle_files, tmp_path, cli_env, args, match):
    res = run_cli(["sample", oracle_files["cond"], "--outdir", str(tmp_path / "o"), *args], env=cli_env)
    assert res.returncode == 1
    assert match in res.stderr and "Traceback" not in res.stderr
    assert len([ln for ln in res.stderr.splitlines() if ln.startswith("error:")]) == 1


def test_sample_cli_bad_inputs(oracle_files, tmp_path, cli_env):
    bogus = tmp_path / "model.bin"
    bogus.write_bytes(b"xx")
    cases = [
        ([str(bogus), "--outdir", str(tmp_path / "a")], "unknown model file type"),
        ([oracle_files["uncond"], "--outdir", str(tmp_path / "b"), "--class", "1"], "unconditional"),
        ([oracle_files["nan"], "--outdir", str(tmp_path / "c"), "-n", "40"], "NaN"),
        ([oracle_files["uncond"], "--outdir", "/proc/forbidden/out"], "cannot write"),
        ([oracle_files["uncond"]], "exactly one output"),
    ]
    for args, match in cases:
        res = run_cli(["sample", *args], env=cli_env)
        assert res.returncode == 1, (args, res.stderr)
        assert match in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr


def test_kill_mid_run_then_rerun_gives_the_uninterrupted_result(oracle_files, tmp_path, cli_env):
    args = ["sample", oracle_files["rgb"], "-n", "400", "--batch", "4", "--steps", "40"]
    ref = run_cli(args + ["--outdir", str(tmp_path / "ref")], env=cli_env)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "edm_deploy.cli", *args, "--outdir", str(out)],
                            env=cli_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or len(os.listdir(out)) < 40):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len([f for f in os.listdir(out) if f.endswith(".png")])
    assert 0 < partial < 400
    res = run_cli(args + ["--outdir", str(out)], env=cli_env)
    assert res.returncode == 0, res.stderr
    assert "already done" in res.stderr
    got, want = _read_pngs(out), _read_pngs(tmp_path / "ref")
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    # The rerun clears the temporary files the killed run left; only the run record and the lock remain.
    assert sorted(_other_files(out)) == [".edm-deploy-sample.json", ".edm-deploy.lock"]


def test_temporary_names_never_look_like_outputs_and_reruns_clear_stale_ones(oracle_files, tmp_path, cli_env):
    from edm_deploy.runtime.core.fileio import TEMP_SUFFIX, atomic_write_bytes, is_temp_name

    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        real_replace(src, dst)

    os.replace = spy
    try:
        atomic_write_bytes(str(tmp_path / "000007.png"), b"x")
    finally:
        os.replace = real_replace
    assert len(seen) == 1 and is_temp_name(seen[0]) and not seen[0].endswith(".png")
    out = tmp_path / "o"
    (out / "000000").mkdir(parents=True)
    stale = [out / (".tmp-zcc3jg6m-000051.png" + TEMP_SUFFIX),
             out / "000000" / (".tmp-abc-000003.png" + TEMP_SUFFIX)]
    for f in stale:
        f.write_bytes(b"half")
    keep = out / "notes.txt"
    keep.write_text("mine")
    res = run_cli(["sample", oracle_files["uncond"], "-n", "4", "--steps", "2", "--outdir", str(out), "--subdirs"],
                  env=cli_env)
    assert res.returncode == 0, res.stderr
    assert not any(f.exists() for f in stale) and keep.read_text() == "mine"


def test_sharded_runs_cover_the_seeds_once(oracle_files, tmp_path, cli_env):
    for i in range(3):
        res = run_cli(["sample", oracle_files["uncond"], "-n", "50", "--batch", "8", "--steps", "4",
                       "--outdir", str(tmp_path / "o"), "--shard", f"{i}/3"], env=cli_env)
        assert res.returncode == 0, res.stderr
    assert sorted(_read_pngs(tmp_path / "o")) == [f"{s:06d}.png" for s in range(50)]


def test_info_prints_manifest(oracle_files, cli_env):
    res = run_cli(["info", oracle_files["cond"]], env=cli_env)
    assert res.returncode == 0, res.stderr
    assert "10 classes" in res.stdout and "1x8x8" in res.stdout


def test_resume_refuses_other_settings_and_failed_grids_write_nothing(oracle_files, tmp_path, cli_env):
    out = str(tmp_path / "o")
    base = ["sample", oracle_files["cond"], "-n", "8", "--outdir", out, "--steps", "4"]
    assert run_cli(base, env=cli_env).returncode == 0
    res = run_cli(base[:-1] + ["5"], env=cli_env)  # other --steps: the images there would not match
    assert res.returncode == 1 and "other settings" in res.stderr and "sampler" in res.stderr
    res = run_cli(base + ["--class", "2"], env=cli_env)
    assert res.returncode == 1 and "class" in res.stderr
    assert run_cli(base, env=cli_env).returncode == 0  # same settings: resumes (nothing to do)
    grid = tmp_path / "nan.png"
    res = run_cli(["sample", oracle_files["nan"], "-n", "40", "--batch", "8", "--grid", str(grid)], env=cli_env)
    assert res.returncode == 1 and not grid.exists()


def test_empty_or_invalid_shards(oracle_files, tmp_path, cli_env):
    npz = tmp_path / "s.npz"
    res = run_cli(["sample", oracle_files["uncond"], "-n", "2", "--shard", "3/4", "--npz", str(npz)], env=cli_env)
    assert res.returncode == 0 and "holds none" in res.stdout
    assert not any(p.name.startswith("s.") for p in tmp_path.iterdir())
    env = dict(cli_env, RANK="5", WORLD_SIZE="2")
    res = run_cli(["sample", oracle_files["uncond"], "-n", "4", "--outdir", str(tmp_path / "o")], env=env)
    assert res.returncode == 1 and "RANK" in res.stderr


def test_options_that_do_not_apply_are_refused(oracle_files, tmp_path, cli_env):
    res = run_cli(["sample", oracle_files["uncond"], "-n", "2", "--grid", str(tmp_path / "g.png"), "--compile"], env=cli_env)
    assert res.returncode == 1 and "--compile does not apply" in res.stderr


def test_a_cpu_session_keeps_no_memory_plan_per_batch_shape(oracle_files):
    """A server's batches take every size up to its limit, and a memory pattern is held per size (RSS 183 ->
    313 MB over batch sizes 1-64 on the Fashion-MNIST network, benchmarks/serving_memory.py --sweep), so the
    CPU backend runs without them; the images do not change."""
    from edm_deploy.loading import load
    from edm_deploy.runtime.backends.onnxrt import OnnxRuntimeDenoiser

    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16))
    sigma = np.array([0.2, 1.0, 4.0])
    served = load(oracle_files["rgb"], device="cpu")
    assert served.session.get_session_options().enable_mem_pattern is False
    patterned = OnnxRuntimeDenoiser(oracle_files["rgb"], device="cpu", memory_pattern=True)
    assert patterned.session.get_session_options().enable_mem_pattern is True
    np.testing.assert_array_equal(served(x, sigma), patterned(x, sigma))
