"""The classes of careless or hostile use of `sample`, `bench` and the shared output machinery:
outputs onto inputs, resume that trusts what it finds, two writers, the batch-invariance
promise, unchecked values, misleading messages. Torch-free: the models are hand-built ONNX
oracles (tests/onnx_oracles.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from edm_deploy.runtime.core.errors import InputError
from tests.conftest import REPO, requires_onnx, run_cli

pytestmark = requires_onnx


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.onnx_oracles import gaussian_onnx

    d = tmp_path_factory.mktemp("models")
    return {"uncond": gaussian_onnx(str(d / "gauss.onnx")), "cond": gaussian_onnx(str(d / "cond.onnx"), label_dim=10)}


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _one_error_line(res) -> str:
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 1 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    return errors[0]


# -- 1. outputs never replace inputs ------------------------------------------------------------


def test_no_output_may_replace_the_model(models, tmp_path, cli_env):
    model = tmp_path / "m.onnx"
    model.write_bytes(open(models["uncond"], "rb").read())
    before = _sha(model)
    link = tmp_path / "link.png"
    os.symlink(model, link)
    hard = tmp_path / "hard.npz"
    os.link(model, hard)
    cases = [
        ["sample", str(model), "-n", "2", "--grid", str(model)],
        ["sample", str(model), "-n", "2", "--grid", str(link)],
        ["sample", str(model), "-n", "2", "--npz", str(hard)],
        ["sample", str(model), "-n", "2", "--npz", str(model)],
        ["bench", str(model), "--batch", "2", "--repeats", "1", "--no-sampling", "--json", str(model)],
    ]
    for args in cases:
        line = _one_error_line(run_cli(args, env=cli_env))
        assert "would overwrite MODEL" in line, (args, line)
        assert _sha(model) == before


def test_refusal_happens_for_derived_outputs_too(models, tmp_path, cli_env):
    """`--npz x.npz` also writes x.npz.parts/; a model of that name is an input too."""
    parts = tmp_path / "s.npz.parts"
    model = tmp_path / "model.onnx"
    model.write_bytes(open(models["uncond"], "rb").read())
    os.symlink(model, parts)
    line = _one_error_line(run_cli(["sample", str(model), "-n", "2", "--npz", str(tmp_path / "s.npz")], env=cli_env))
    assert "would overwrite" in line


# -- 4. resume checks what it finds -------------------------------------------------------------


def test_rerun_redoes_damaged_images_and_keeps_good_ones(models, tmp_path, cli_env):
    out = tmp_path / "o"
    args = ["sample", models["uncond"], "-n", "12", "--steps", "4", "--batch", "4", "--outdir", str(out)]
    assert run_cli(args, env=cli_env).returncode == 0
    good = {f: (out / f).read_bytes() for f in os.listdir(out) if f.endswith(".png")}
    (out / "000001.png").write_bytes(good["000001.png"][: len(good["000001.png"]) // 2])  # truncated
    (out / "000002.png").write_bytes(b"")  # empty
    (out / "000003.png").write_bytes(b"not an image at all")  # not an image
    from PIL import Image

    Image.new("L", (4, 4)).save(out / "000004.png")  # an image of the wrong size
    mtime = os.path.getmtime(out / "000009.png")
    res = run_cli(args, env=cli_env)
    assert res.returncode == 0, res.stderr
    assert "8 already done" in res.stderr
    for name, data in good.items():
        assert (out / name).read_bytes() == data, name
    assert os.path.getmtime(out / "000009.png") == mtime  # complete batches are not rewritten


def test_a_folder_named_like_an_image_is_one_clear_error(models, tmp_path, cli_env):
    out = tmp_path / "o"
    args = ["sample", models["uncond"], "-n", "12", "--steps", "3", "--outdir", str(out)]
    assert run_cli(args, env=cli_env).returncode == 0
    os.unlink(out / "000011.png")
    os.mkdir(out / "000011.png")
    line = _one_error_line(run_cli(args, env=cli_env))
    assert "000011.png is a folder" in line


def test_a_folder_of_foreign_images_is_not_adopted(models, tmp_path, cli_env):
    from PIL import Image

    out = tmp_path / "photos"
    out.mkdir()
    Image.new("L", (8, 8)).save(out / "000000.png")
    line = _one_error_line(run_cli(["sample", models["uncond"], "-n", "4", "--outdir", str(out)], env=cli_env))
    assert "no edm-deploy run record" in line
    assert sorted(os.listdir(out)) == [".edm-deploy.lock", "000000.png"]


def test_a_failed_run_does_not_poison_its_folder(models, tmp_path, cli_env):
    out = tmp_path / "o"
    bad = run_cli(["sample", models["uncond"], "-n", "4", "--outdir", str(out), "--sigma_min", "90"], env=cli_env)
    assert "sigma_min" in _one_error_line(bad)
    good = run_cli(["sample", models["uncond"], "-n", "4", "--steps", "3", "--outdir", str(out)], env=cli_env)
    assert good.returncode == 0, good.stderr
    assert len([f for f in os.listdir(out) if f.endswith(".png")]) == 4


def test_damaged_npz_parts_are_redone(tmp_path):
    from edm_deploy.runtime.output.writers import NpzWriter

    npz = str(tmp_path / "s.npz")
    images = np.arange(12 * 64, dtype=np.uint8).reshape(12, 8, 8, 1)
    first = NpzWriter(npz, range(12), image_shape=(8, 8, 1))
    first.submit(images[:4], [0, 1, 2, 3])
    first.submit(images[4:8], [4, 5, 6, 7])
    first.submit(np.zeros((4, 4, 4, 1), np.uint8), [8, 9, 10, 11])  # another run's image size
    broken = os.path.join(first.parts_dir, "part-0000000004-4.npz")
    with open(broken, "r+b") as f:
        f.truncate(100)
    again = NpzWriter(npz, range(12), image_shape=(8, 8, 1))
    assert sorted(again.done) == [0, 1, 2, 3]
    assert sorted(os.listdir(again.parts_dir)) == ["part-0000000000-4.npz"]
    again.submit(images[4:8], [4, 5, 6, 7])
    again.submit(images[8:], [8, 9, 10, 11])
    again.close()
    np.testing.assert_array_equal(np.load(npz)["images"], images)


def test_a_finished_npz_keeps_its_record(models, tmp_path, cli_env):
    npz = tmp_path / "s.npz"
    args = ["sample", models["uncond"], "-n", "6", "--batch", "4", "--steps", "3", "--npz", str(npz)]
    assert run_cli(args, env=cli_env).returncode == 0
    before = _sha(npz)
    again = run_cli(args, env=cli_env)
    assert again.returncode == 0 and "nothing to do" in again.stdout and _sha(npz) == before
    other = run_cli(args[:-4] + ["--steps", "5", "--npz", str(npz)], env=cli_env)
    assert "holds images sampled with other settings" in _one_error_line(other) and _sha(npz) == before
    more = run_cli(["sample", models["uncond"], "-n", "9", "--batch", "4", "--steps", "3", "--npz", str(npz)], env=cli_env)
    assert "holds other seeds" in _one_error_line(more) and _sha(npz) == before
    foreign = tmp_path / "f.npz"
    np.savez(foreign, images=np.zeros((2, 8, 8, 1), np.uint8))
    res = run_cli(["sample", models["uncond"], "-n", "2", "--npz", str(foreign)], env=cli_env)
    assert "was not written by edm-deploy sample" in _one_error_line(res)


def test_the_folder_layout_is_part_of_the_record(models, tmp_path, cli_env):
    out = tmp_path / "o"
    base = ["sample", models["uncond"], "-n", "4", "--steps", "3", "--outdir", str(out)]
    assert run_cli(base + ["--subdirs"], env=cli_env).returncode == 0
    assert "subdirs" in _one_error_line(run_cli(base, env=cli_env))


# -- 5. two writers, one output -----------------------------------------------------------------


def _start_long_run(model, out_flag, out, cli_env):
    args = [sys.executable, "-m", "edm_deploy.cli", "sample", model, "-n", "400", "--batch", "2", "--steps", "200",
            out_flag, str(out)]
    return subprocess.Popen(args, env=cli_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("out_flag,name", [("--outdir", "o"), ("--npz", "s.npz")])
def test_a_second_writer_is_refused(models, tmp_path, cli_env, out_flag, name):
    out = tmp_path / name
    first = _start_long_run(models["uncond"], out_flag, out, cli_env)
    try:
        marker = out / "000000.png" if out_flag == "--outdir" else tmp_path / "s.npz.parts" / "part-0000000000-2.npz"
        deadline = time.time() + 60
        while time.time() < deadline and not marker.exists():
            time.sleep(0.05)
        assert marker.exists(), first.stderr.read() if first.poll() is not None else "no first image"
        second = run_cli(["sample", models["uncond"], "-n", "400", "--batch", "2", "--steps", "3", out_flag, str(out)],
                         env=cli_env)
        assert "another edm-deploy process is writing" in _one_error_line(second)
    finally:
        first.kill()
        first.wait()


def test_shards_of_one_run_write_side_by_side_but_not_twice(models, tmp_path, cli_env):
    out = tmp_path / "o"
    # long enough (10^6 network calls) to be still writing while the other processes start, on any machine
    args = ["sample", models["uncond"], "-n", "10000", "--batch", "2", "--steps", "200", "--outdir", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "edm_deploy.cli", *args, "--shard", "0/2"], env=cli_env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (out / "000000.png").exists():
            time.sleep(0.05)
        same = run_cli(args + ["--shard", "0/2"], env=cli_env)
        assert "another edm-deploy process is writing" in _one_error_line(same)
        unsharded = run_cli(["sample", models["uncond"], "-n", "400", "--batch", "2", "--steps", "3", "--outdir",
                             str(out)], env=cli_env)
        assert "another edm-deploy process is writing" in _one_error_line(unsharded)
        other = run_cli(["sample", models["uncond"], "-n", "400", "--batch", "2", "--steps", "3", "--outdir", str(out),
                         "--shard", "1/2"], env=cli_env)
        assert "other settings" in _one_error_line(other)  # a shard of another run: refused while one writes
    finally:
        first.kill()
        first.wait()
    # The other shard of the same run joins it, and the two cover the seeds.
    rest = run_cli(["sample", models["uncond"], "-n", "40", "--batch", "2", "--steps", "200", "--outdir", str(out),
                    "--shard", "1/2"], env=cli_env)
    assert rest.returncode == 0, rest.stderr
    assert {f"{s:06d}.png" for s in range(2, 40, 4)} <= set(os.listdir(out))


# -- 6. the batch-invariance promise ------------------------------------------------------------


class _ShapeSpy:
    """A Gaussian oracle that records every batch size it is called with."""

    def __init__(self):
        from edm_deploy.runtime import GaussianDenoiser

        self.inner = GaussianDenoiser(1, 8, mu=0.1, std=0.6)
        self.shapes: list[int] = []
        for name in ("sigma_min", "sigma_max", "img_channels", "img_resolution", "label_dim", "max_batch"):
            setattr(self, name, getattr(self.inner, name))

    def round_sigma(self, sigma):
        return self.inner.round_sigma(sigma)

    def __call__(self, x, sigma, class_labels=None):
        self.shapes.append(int(x.shape[0]))
        return self.inner(x, sigma, class_labels)


def test_fixed_batch_calls_the_network_at_one_shape_only():
    from edm_deploy.runtime.sampling.fixed_shape import FixedShapeDenoiser
    from edm_deploy.runtime.sampling.generate import generate

    results = {}
    for batch in (1, 5, 8, 13):
        spy = _ShapeSpy()
        results[batch] = generate(FixedShapeDenoiser(spy, 8), range(13), batch_size=batch, num_steps=4)
        assert set(spy.shapes) == {8}, (batch, set(spy.shapes))
    for batch in (5, 8, 13):
        np.testing.assert_array_equal(results[batch], results[1])
    with pytest.raises(InputError, match="fixed_batch"):
        FixedShapeDenoiser(_ShapeSpy(), 0)


def test_fixed_batch_images_equal_across_batch_sizes_and_shards(models, tmp_path, cli_env):
    runs = {"b1": ["--batch", "1"], "b7": ["--batch", "7"], "b64": ["--batch", "64"],
            "shards": ["--batch", "4", "--shard", "0/2"]}
    got = {}
    for name, extra in runs.items():
        out = tmp_path / name
        base = ["sample", models["cond"], "-n", "30", "--steps", "5", "--fixed-batch", "4", "--outdir", str(out)]
        assert run_cli(base + extra, env=cli_env).returncode == 0
        if name == "shards":
            assert run_cli(base + ["--batch", "4", "--shard", "1/2"], env=cli_env).returncode == 0
        got[name] = {f: (out / f).read_bytes() for f in os.listdir(out) if f.endswith(".png")}
    assert len(got["b1"]) == 30
    for name in runs:
        assert got[name] == got["b1"], name


def test_resuming_at_another_batch_size_is_refused_without_fixed_batch(models, tmp_path, cli_env):
    out = tmp_path / "o"
    base = ["sample", models["uncond"], "-n", "8", "--steps", "3", "--outdir", str(out)]
    assert run_cli(base + ["--batch", "4"], env=cli_env).returncode == 0
    assert "batch" in _one_error_line(run_cli(base + ["--batch", "8"], env=cli_env))


# -- 7 and 9. values nobody checked, messages that misled -----------------------------------------


@pytest.mark.parametrize("args,match", [
    (["--seeds", ""], "no seeds"),
    (["--seeds", "0-99999999999"], "seeds must lie in"),
    (["--seeds", "0-20000000"], "more than one run takes"),
    (["-n", "99999999999"], "more than one run takes"),
    (["--rho", "1e-300"], "--rho"),
    (["--S_churn", "nan"], "not a finite number"),
    (["--S_max", "nan"], "not a finite number"),
    (["--sigma_max", "inf"], "not a finite number"),
    (["--threads", "100000"], "--threads"),
    (["--steps", "10000000"], "--steps"),
])
def test_unchecked_values_are_one_line_before_any_work(models, tmp_path, cli_env, args, match):
    out = tmp_path / "o"
    res = run_cli(["sample", models["uncond"], "--outdir", str(out), *args], env=cli_env, timeout=60)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert match in res.stderr, res.stderr
    assert not out.exists() or not [f for f in os.listdir(out) if f.endswith(".png")]


def test_grid_columns_and_huge_shard_counts_are_checked_before_sampling(models, tmp_path, cli_env):
    grid = tmp_path / "g.png"
    line = _one_error_line(run_cli(["sample", models["uncond"], "-n", "4", "--steps", "400", "--grid", str(grid),
                                    "--grid-cols", str(10**20)], env=cli_env))
    assert "--grid-cols" in line and not grid.exists()
    res = run_cli(["sample", models["uncond"], "-n", "4", "--steps", "3", "--outdir", str(tmp_path / "o"),
                   "--shard", f"3/{10**20}"], env=cli_env, timeout=60)
    assert res.returncode == 0 and "holds none" in res.stdout


def test_messages_name_the_real_problem(models, tmp_path, cli_env):
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = _one_error_line(run_cli(["sample", models["uncond"], "-n", "2", "--npz", str(afile / "x.npz")], env=cli_env))
    assert "is a file" in line and "File exists" not in line
    line = _one_error_line(run_cli(["sample", models["uncond"], "-n", "2", "--grid", str(tmp_path / "g.gif")], env=cli_env))
    assert ".png" in line
    jpg = tmp_path / "g.jpg"
    assert run_cli(["sample", models["uncond"], "-n", "4", "--steps", "3", "--grid", str(jpg)], env=cli_env).returncode == 0
    assert jpg.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG bytes under a .jpg name
    png = tmp_path / "g.png"
    assert run_cli(["sample", models["uncond"], "-n", "4", "--steps", "3", "--grid", str(png)], env=cli_env).returncode == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    zero = tmp_path / "zero.onnx"
    zero.write_bytes(b"")
    for args in (["sample", str(zero), "-n", "2", "--outdir", str(tmp_path / "e")], ["info", str(zero)]):
        line = _one_error_line(run_cli(args, env=cli_env))
        assert "is empty (0 bytes)" in line and "manifest" not in line


def test_library_errors_name_parameters_and_the_cli_names_flags(models, tmp_path, cli_env):
    from edm_deploy.loading import load

    with pytest.raises(InputError) as info:
        load(models["uncond"], compile=True)
    assert str(info.value).startswith("compile does not apply") and info.value.param == "compile"
    line = _one_error_line(run_cli(["sample", models["uncond"], "-n", "2", "--grid", str(tmp_path / "g.png"), "--compile"],
                                   env=cli_env))
    assert line.startswith("error: --compile does not apply")
    with pytest.raises(InputError, match="^class_idx 12 is out of range"):
        from edm_deploy.runtime.sampling.generate import generate

        generate(load(models["cond"]), seeds=[0], class_idx=12)


def test_backends_close_and_work_as_context_managers(models):
    from edm_deploy.loading import load

    with load(models["uncond"]) as a, load(models["cond"]) as b:
        x = np.zeros((2, 1, 8, 8))
        assert a(x, [1.0, 2.0]).shape == b(x, [1.0, 2.0]).shape == (2, 1, 8, 8)
    with pytest.raises(InputError, match="closed"):
        a(x, [1.0, 2.0])


def test_ranks_starting_together_both_claim_their_shards(tmp_path):
    """torchrun starts its ranks at once: they take turns at the record check instead of refusing each other."""
    code = (
        "import sys, time\n"
        "from edm_deploy.runtime.output.writers import claim_folder\n"
        "rank = int(sys.argv[1])\n"
        "with claim_folder(sys.argv[2], {'run': 1}, (rank, 2)):\n"
        "    time.sleep(1.0)\n"
    )
    out = str(tmp_path / "o")
    env = dict(os.environ, PYTHONPATH=REPO)
    for _ in range(3):
        procs = [subprocess.Popen([sys.executable, "-c", code, str(r), out], env=env, stderr=subprocess.PIPE, text=True)
                 for r in (0, 1)]
        results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
        assert all(rc == 0 for rc, _ in results), results
