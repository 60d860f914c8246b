"""FID: the Fréchet distance against SciPy, the image sources, both detector kinds, the CLI.

The real Inception detector cannot be downloaded here, so the pipeline runs with a stand-in built
by the tests: a TorchScript module with the real one's call signature,
`detector(uint8 [N, 3, H, W], return_features=True) -> [N, 2048]` (resize inside, then a fixed
random projection), and its ONNX export made with `edm-deploy fid export-detector`.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile

import numpy as np
import pytest

from edm_deploy.cli import main
from edm_deploy.runtime.core.errors import BackendUnavailableError, EdmDeployError, InputError
from edm_deploy.runtime.fid import fid_images
from edm_deploy.runtime.fid.fid import (
    FeatureStats,
    calc_fid,
    compute_stats,
    fid_min_of,
    frechet_distance,
    load_detector,
    load_ref,
    make_ref,
    open_images,
    save_ref,
    select_indices,
)
from tests.conftest import REPO, has_module, requires_onnx, requires_torch

# ---------------------------------------------------------------------------------------------
# Fréchet distance and statistics


def scipy_fid(mu1, s1, mu2, s2):
    """Independent float64 computation, as the reference does it (scipy sqrtm, real part)."""
    import scipy.linalg

    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.real(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)))


def random_stats(rng, dim, n, shift=0.0):
    scale = rng.uniform(0.1, 3.0, dim)
    f = rng.standard_normal((n, dim)) * scale + shift
    return f.mean(0), np.cov(f, rowvar=False, ddof=1)


@pytest.mark.skipif(not has_module("scipy"), reason="scipy is not installed")
@pytest.mark.parametrize("dim,n", [(64, 2000), (64, 10), (64, 3), (160, 30), (128, 129)])
def test_frechet_distance_matches_scipy(dim, n):
    rng = np.random.default_rng(dim * 1000 + n)
    a = random_stats(rng, dim, n)
    b = random_stats(rng, dim, n, shift=0.2)
    ours, ref = frechet_distance(*a, *b), scipy_fid(*a, *b)
    assert abs(ours - ref) <= 1e-6 * abs(ref), (ours, ref)
    # identical statistics: FID ~ 0, even when rank-deficient (n < dim)
    same = frechet_distance(*a, *a)
    scale = np.trace(a[1])
    assert abs(same) <= 1e-9 * scale, same
    assert abs(same - scipy_fid(*a, *a)) <= 1e-6 * scale


@pytest.mark.skipif(not has_module("mpmath"), reason="mpmath is not installed")
def test_frechet_distance_matches_40_digit_arithmetic_when_singular():
    import mpmath as mp

    mp.mp.dps = 40
    rng = np.random.default_rng(7)
    (m1, s1), (m2, s2) = random_stats(rng, 12, 5), random_stats(rng, 12, 5, shift=0.3)
    S1, S2 = mp.matrix(s1.tolist()), mp.matrix(s2.tolist())
    w, v = mp.eigsy(S1)
    root = v * mp.diag([mp.sqrt(max(x, 0)) for x in w]) * v.T
    a = root * S2 * root
    lam = mp.eigsy((a + a.T) / 2, eigvals_only=True)
    exact = float(np.sum((m1 - m2) ** 2) + sum(S1[i, i] + S2[i, i] for i in range(12))
                  - 2 * sum(mp.sqrt(max(x, 0)) for x in lam))
    assert abs(frechet_distance(m1, s1, m2, s2) - exact) <= 1e-10 * exact


def test_feature_stats_are_float64_mean_and_unbiased_covariance():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((37, 16)).astype(np.float32) * 5 + 3
    stats = FeatureStats(16)
    for start in range(0, 37, 8):  # streamed in batches
        stats.update(f[start:start + 8])
    mu, sigma = stats.mean_cov()
    f64 = f.astype(np.float64)
    np.testing.assert_allclose(mu, f64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f64, rowvar=False, ddof=1), rtol=1e-9, atol=1e-12)
    one = FeatureStats(16)
    one.update(f[:1])
    with pytest.raises(InputError, match="at least 2"):
        one.mean_cov()


def test_ref_npz_round_trip_and_missing_keys(tmp_path):
    mu, sigma = np.arange(4.0), np.eye(4)
    save_ref(str(tmp_path / "r.npz"), mu, sigma)
    with np.load(tmp_path / "r.npz") as data:
        assert sorted(data.files) == ["mu", "sigma"] and data["sigma"].dtype == np.float64
    m2, s2 = load_ref(str(tmp_path / "r.npz"))
    np.testing.assert_array_equal(m2, mu)
    np.testing.assert_array_equal(s2, sigma)
    np.savez(tmp_path / "bad.npz", images=np.zeros(3))
    with pytest.raises(InputError, match="needs 'mu' and 'sigma'"):
        load_ref(str(tmp_path / "bad.npz"))
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(InputError, match="not an .npz"):
        load_ref(str(tmp_path / "text.npz"))


# ---------------------------------------------------------------------------------------------
# Image sources

N_IMAGES, RES = 24, 16


def make_images(n=N_IMAGES, res=RES, seed=0, channels=3):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, res, res, channels), dtype=np.uint8)
    return base


def write_tree(root, images, subdirs=True, names=None):
    import PIL.Image

    for i, img in enumerate(images):
        name = names[i] if names else (f"{i - i % 10:06d}/{i:06d}.png" if subdirs else f"{i:06d}.png")
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        PIL.Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(path)
    return root


def write_zip(path, images):
    import PIL.Image

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for i, img in enumerate(images):
            buf = io.BytesIO()
            PIL.Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(buf, format="png", compress_level=0)
            zf.writestr(f"{i // 1000:05d}/img{i:08d}.png", buf.getvalue())
        zf.writestr("dataset.json", json.dumps({"labels": None}))
    return path


def write_npz(path, images, seeds=None):
    seeds = np.arange(len(images)) if seeds is None else np.asarray(seeds)
    np.savez(path, images=images, seeds=seeds, labels=np.full(len(images), -1))
    return path


def read_all(source, indices=None, batch=5):
    indices = np.arange(len(source)) if indices is None else indices
    return np.concatenate(list(source.iter_batches(indices, batch)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid-data")
    imgs = make_images()
    return {
        "images": imgs,
        "tree": write_tree(str(root / "tree"), imgs),
        "zip": write_zip(str(root / "data.zip"), imgs),
        "npz": write_npz(str(root / "samples.npz"), imgs),
        "root": root,
    }


def test_tree_zip_and_npz_give_the_same_images_in_seed_order(data):
    expected = data["images"].transpose(0, 3, 1, 2)
    for key in ("tree", "zip", "npz"):
        source = open_images(data[key])
        assert len(source) == N_IMAGES, key
        got = read_all(source)
        assert got.dtype == np.uint8 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, expected, err_msg=key)
    tree = open_images(data["tree"])
    assert tree.names[:2] == ["000000/000000.png", "000000/000001.png"] and tree.names[10] == "000010/000010.png"


def test_reads_the_npz_that_sample_writes(tmp_path):
    from edm_deploy.runtime.output.writers import NpzWriter

    imgs = make_images(10)
    writer = NpzWriter(str(tmp_path / "s.npz"), seeds=range(100, 110))
    writer.submit(imgs[:6], range(100, 106))
    writer.submit(imgs[6:], range(106, 110))
    writer.close()
    source = open_images(str(tmp_path / "s.npz"))
    assert len(source) == 10 and source.describe(3).endswith("(seed 103)")
    np.testing.assert_array_equal(read_all(source, [1, 2, 5, 9], batch=3), imgs[[1, 2, 5, 9]].transpose(0, 3, 1, 2))


def test_files_are_sorted_by_relative_path_and_non_images_ignored(tmp_path):
    imgs = make_images(4)
    write_tree(str(tmp_path), imgs, names=["b/1.png", "a/2.png", "a/10.png", "c.png"])
    (tmp_path / "dataset.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("x")
    source = open_images(str(tmp_path))
    assert source.names == ["a/10.png", "a/2.png", "b/1.png", "c.png"]  # plain string order, as the reference
    np.testing.assert_array_equal(read_all(source), imgs[[2, 1, 0, 3]].transpose(0, 3, 1, 2))


def test_grey_images_are_repeated_to_three_channels(tmp_path):
    grey = make_images(3, channels=1)
    for key, path in {"tree": write_tree(str(tmp_path / "g"), grey),
                      "zip": write_zip(str(tmp_path / "g.zip"), grey),
                      "npz": write_npz(str(tmp_path / "g.npz"), grey)}.items():
        got = read_all(open_images(path))
        assert got.shape == (3, 3, RES, RES), key
        for c in range(3):
            np.testing.assert_array_equal(got[:, c], grey[:, :, :, 0], err_msg=key)


def test_seeded_subset_follows_the_reference_rule_and_is_deterministic():
    total, num = 100, 30
    a, b = select_indices(total, num, seed=5), select_indices(total, num, seed=5)
    np.testing.assert_array_equal(a, b)
    idx = np.arange(total)
    np.random.RandomState(5).shuffle(idx)  # the reference's max_size logic, written out
    np.testing.assert_array_equal(a, np.sort(idx[:num]))
    assert not np.array_equal(a, select_indices(total, num, seed=6))
    np.testing.assert_array_equal(select_indices(total, total), np.arange(total))
    np.testing.assert_array_equal(select_indices(total, None), np.arange(total))
    with pytest.raises(InputError, match="has 100 images but 101 were requested"):
        select_indices(total, 101)


def test_subset_picks_the_same_images_from_every_source_kind(data):
    idx = select_indices(N_IMAGES, 10, seed=3)
    expected = data["images"][idx].transpose(0, 3, 1, 2)
    for key in ("tree", "zip", "npz"):
        np.testing.assert_array_equal(read_all(open_images(data[key]), idx, batch=4), expected, err_msg=key)


def test_mixed_sizes_are_one_clear_error(tmp_path):
    write_tree(str(tmp_path), make_images(3, res=16), subdirs=False)
    write_tree(str(tmp_path), make_images(1, res=32), names=["000009.png"])
    with pytest.raises(InputError, match=r"mixed image sizes.*000000.png is 16x16 but .*000009.png is 32x32"):
        read_all(open_images(str(tmp_path)))


def test_unsupported_image_mode_is_refused(tmp_path):
    import PIL.Image

    PIL.Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA").save(tmp_path / "a.png")
    with pytest.raises(InputError, match="mode 'RGBA' is not supported"):
        read_all(open_images(str(tmp_path)))


def test_npz_without_images_and_missing_paths_are_errors(tmp_path):
    np.savez(tmp_path / "x.npz", mu=np.zeros(3))
    with pytest.raises(InputError, match="no 'images' array"):
        open_images(str(tmp_path / "x.npz"))
    with pytest.raises(InputError, match="images not found"):
        open_images(str(tmp_path / "nope"))


def test_npz_reader_streams_with_bounded_memory(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, size=(3000, 32, 32, 3), dtype=np.uint8)  # 9.2 MB
    path = write_npz(str(tmp_path / "big.npz"), imgs)
    del imgs
    source = open_images(path)
    idx = select_indices(3000, 2500, seed=1)
    tracemalloc.start()
    try:
        sizes, checksum = [], 0
        for x in source.iter_batches(idx, 16):
            sizes.append(len(x))
            checksum += int(x[:, :, 0, 0].sum())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(sizes) == 2500 and max(sizes) == 16
    assert peak < 1_000_000, f"peak {peak} bytes for a 9.2 MB array"
    with np.load(path) as d:  # streamed subset equals the in-memory subset
        assert checksum == int(d["images"][idx][:, 0, 0, :].sum())


def test_tree_reader_decodes_lazily(data, monkeypatch):
    calls = []
    real = fid_images._decode
    monkeypatch.setattr(fid_images, "_decode", lambda d, name: calls.append(name) or real(d, name))
    batches = open_images(data["tree"]).iter_batches(np.arange(N_IMAGES), 4)
    first = next(batches)
    assert first.shape == (4, 3, RES, RES) and len(calls) == 4  # nothing read beyond the first batch


# ---------------------------------------------------------------------------------------------
# Stand-in detectors (TorchScript, its ONNX export) and the full pipeline

STANDIN_SRC = '''
import torch
import torch.nn.functional as F


class StandIn(torch.nn.Module):
    """Same call signature as inception-2015-12-05.pt; resize inside, fixed random projection."""

    def __init__(self, dim: int, grid: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(3 * 8 * 8, dim, generator=g) / 8)
        self.grid = grid

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = img.to(torch.float32)
        if self.grid:  # the real detector resizes with affine_grid + grid_sample (ONNX opset 20)
            n = x.shape[0]
            theta = torch.eye(2, 3).unsqueeze(0).repeat(n, 1, 1)
            x = F.grid_sample(x, F.affine_grid(theta, [n, 3, 8, 8], align_corners=False),
                              mode="bilinear", padding_mode="border", align_corners=False)
        else:
            x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
        f = torch.tanh(x.flatten(1) / 64.0 - 2.0) @ self.proj
        if return_features:
            return f
        return f[:, :10]
'''


def build_standin(path, dim=2048, grid=False):
    import importlib.util

    import torch

    mod_path = os.path.join(os.path.dirname(path), "standin_module.py")
    with open(mod_path, "w") as f:
        f.write(STANDIN_SRC)
    spec = importlib.util.spec_from_file_location("standin_module", mod_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.jit.script(module.StandIn(dim, grid).eval()).save(path)
    return path


@pytest.fixture(scope="module")
def detectors(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from edm_deploy.export.detector import export_detector

    root = tmp_path_factory.mktemp("fid-det")
    pt = build_standin(str(root / "det.pt"))
    report = export_detector(pt, str(root / "det.onnx"), resolutions=(16, 24))
    return {"pt": pt, "onnx": str(root / "det.onnx"), "report": report, "root": root}


@requires_torch
@requires_onnx
def test_export_detector_is_verified_and_runs_on_onnxruntime(detectors):
    report = detectors["report"]
    assert report.opset == 17 and report.feature_dim == 2048
    assert [c["resolution"] for c in report.checks] == [16, 24] and report.max_rel_err < 1e-5
    import onnx

    model = onnx.load(detectors["onnx"])
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["edm_deploy_fid_detector"])["feature_dim"] == 2048
    det = load_detector(detectors["onnx"])
    assert det.kind == "onnx" and det.input_dtype == np.uint8
    # dynamic batch and resolution: any N, any size
    for shape in [(1, 3, 16, 16), (5, 3, 40, 40)]:
        assert det(np.zeros(shape, np.uint8)).shape == (shape[0], 2048)


@requires_torch
@requires_onnx
def test_export_falls_back_to_opset_20_for_affine_grid(tmp_path):
    from edm_deploy.export.detector import export_detector

    pt = build_standin(str(tmp_path / "grid.pt"), grid=True)
    report = export_detector(pt, str(tmp_path / "grid.onnx"), resolutions=(16,))
    assert report.opset == 20 and report.max_rel_err < 1e-5
    with pytest.raises(EdmDeployError, match="opset 17"):
        export_detector(pt, str(tmp_path / "grid17.onnx"), opset=17, resolutions=(16,))
    assert not os.path.exists(tmp_path / "grid17.onnx")


@requires_torch
@requires_onnx
def test_torch_and_onnx_detectors_give_the_same_statistics(data, detectors):
    stats = {}
    for kind in ("pt", "onnx"):
        det = load_detector(detectors[kind])
        stats[kind] = compute_stats(data["tree"], det, num=N_IMAGES, batch=7, progress=False)
    (mu_t, s_t), (mu_o, s_o) = stats["pt"], stats["onnx"]
    assert np.abs(mu_t - mu_o).max() <= 1e-5 * np.abs(mu_t).max()
    assert np.abs(s_t - s_o).max() <= 1e-5 * np.abs(s_t).max()
    # ...and the features really depend on the images: another set is far away
    other = write_npz(str(detectors["root"] / "other.npz"), make_images(N_IMAGES, seed=1) // 2)
    mu_x, _ = compute_stats(other, load_detector(detectors["onnx"]), num=N_IMAGES, progress=False)
    assert float(np.sum((mu_x - mu_o) ** 2)) > 1.0


@requires_torch
@requires_onnx
def test_statistics_do_not_depend_on_batch_size_or_source_kind(data, detectors):
    det = load_detector(detectors["onnx"])
    ref = compute_stats(data["zip"], det, num=None, batch=64, progress=False)
    for key, batch in [("tree", 1), ("npz", 5)]:
        mu, sigma = compute_stats(data[key], det, num=N_IMAGES, batch=batch, progress=False)
        np.testing.assert_allclose(mu, ref[0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(sigma, ref[1], rtol=1e-8, atol=1e-10)


@requires_torch
def test_detector_with_wrong_output_size_is_one_clear_error(data, tmp_path):
    from edm_deploy.export.detector import export_detector

    pt = build_standin(str(tmp_path / "small.pt"), dim=1000)
    det = load_detector(pt)
    with pytest.raises(InputError, match="returns features of size 1000"):
        compute_stats(data["npz"], det, num=N_IMAGES, progress=False)
    with pytest.raises(InputError, match="returns features of size 1000"):
        export_detector(pt, str(tmp_path / "small.onnx"))
    assert not os.path.exists(tmp_path / "small.onnx")


@requires_torch
def test_cli_export_detector_wrong_size_is_one_error_line(tmp_path, capsys):
    pt = build_standin(str(tmp_path / "small.pt"), dim=1000)
    code, _, err = run_main(["fid", "export-detector", pt, "--out", str(tmp_path / "x.onnx")], capsys)
    assert_one_error(code, err, "returns features of size 1000")


def test_pickled_detectors_are_refused(tmp_path):
    (tmp_path / "inception.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(InputError, match="refuse"):
        load_detector(str(tmp_path / "inception.pkl"))
    with pytest.raises(InputError, match="refuse"):
        load_detector("https://api.ngc.nvidia.com/v2/models/x/inception-2015-12-05.pkl")


def tiny_detector(dim=64):
    """A NumPy callable detector: lets the set logic be tested with cheap 64-d statistics."""
    proj = np.random.default_rng(0).standard_normal((3 * 4 * 4, dim))

    def det(x):
        n, c, h, w = x.shape
        pooled = x.astype(np.float64).reshape(n, c, 4, h // 4, 4, w // 4).mean(axis=(3, 5))
        return np.tanh(pooled.reshape(n, -1) / 64 - 2) @ proj

    return det


def test_min_of_splits_one_source_into_seed_ranges_or_scores_several(data, tmp_path):
    det = tiny_detector()
    imgs = data["images"]
    ref = compute_stats(data["npz"], det, num=None, progress=False)
    # one source split into 3 blocks of 8 = seeds 0-7, 8-15, 16-23
    results, best = fid_min_of([data["npz"]], ref, det, min_of=3, num=8, progress=False)
    expected = []
    for k in range(3):
        part = write_npz(str(tmp_path / f"p{k}.npz"), imgs[8 * k:8 * (k + 1)])
        expected.append(calc_fid(part, ref, det, num=8, progress=False))
    assert [r.num for r in results] == [8, 8, 8]
    np.testing.assert_allclose([r.fid for r in results], expected, rtol=1e-9)
    assert best == min(expected)
    assert "seed 0" in results[0].label and "seed 23" in results[2].label
    # three sources, one set each
    paths = [str(tmp_path / f"p{k}.npz") for k in range(3)]
    results2, best2 = fid_min_of(paths, ref, det, num=8, progress=False)
    np.testing.assert_allclose([r.fid for r in results2], expected, rtol=1e-9)
    assert best2 == best
    with pytest.raises(InputError, match="fewer than the 3 x 9"):
        fid_min_of([data["npz"]], ref, det, min_of=3, num=9, progress=False)
    with pytest.raises(InputError, match="min_of 2 needs"):
        fid_min_of(paths, ref, det, min_of=2, num=8, progress=False)


def test_make_ref_then_calc_on_the_same_images_is_zero(data, tmp_path):
    det = tiny_detector()
    make_ref(data["zip"], str(tmp_path / "ref.npz"), det, progress=False)
    value = calc_fid(data["tree"], str(tmp_path / "ref.npz"), det, num=N_IMAGES, progress=False)
    assert abs(value) < 1e-9
    with pytest.raises(InputError, match="has 24 images but 50000 were requested"):
        calc_fid(data["tree"], str(tmp_path / "ref.npz"), det, progress=False)


# ---------------------------------------------------------------------------------------------
# CLI


def run_main(args, capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_error(code, err, pattern):
    """Exit 1, no traceback, exactly one `error:` line (besides the `detector:` info line)."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("detector: ")]
    assert code == 1, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert pattern in lines[0], lines[0]


@requires_torch
@requires_onnx
def test_cli_ref_then_calc_with_the_onnx_detector(data, detectors, tmp_path, capsys):
    ref = str(tmp_path / "ref.npz")
    code, out, err = run_main(["fid", "ref", "--data", data["zip"], "--dest", ref,
                               "--detector", detectors["onnx"], "--quiet"], capsys)
    assert code == 0, err
    assert "wrote" in out and "from 24 images" in out
    mu, sigma = load_ref(ref)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    code, out, err = run_main(["fid", "calc", "--images", data["npz"], "--ref", ref, "--num", "24",
                               "--detector", detectors["onnx"], "--quiet"], capsys)
    assert code == 0, err
    line = [ln for ln in out.splitlines() if ln.startswith("FID = ")]
    assert len(line) == 1 and "24 images from" in line[0] and abs(float(line[0].split()[2])) < 1e-3, out


@requires_onnx
def test_cli_bad_inputs_are_one_error_line(data, tmp_path, capsys):
    det = make_onnx_detector(str(tmp_path / "ok.onnx"), 2048)
    wrong = make_onnx_detector(str(tmp_path / "wrong.onnx"), 3)
    ref = str(tmp_path / "ref.npz")
    save_ref(ref, np.zeros(2048), np.eye(2048))
    np.savez(tmp_path / "nostats.npz", x=np.zeros(2))
    mixed = str(tmp_path / "mixed")
    write_tree(mixed, make_images(2, res=16), subdirs=False)
    write_tree(mixed, make_images(1, res=8), names=["000005.png"])
    cases = [
        (["--images", data["tree"], "--ref", ref, "--detector", det], "24 images but 50000 were requested"),
        (["--images", mixed, "--ref", ref, "--num", "3", "--detector", det], "mixed image sizes"),
        (["--images", data["tree"], "--ref", str(tmp_path / "nostats.npz"), "--num", "24"], "needs 'mu' and 'sigma'"),
        (["--images", data["tree"], "--ref", ref, "--num", "24", "--detector", wrong], "returns features of size 3"),
    ]
    for args, pattern in cases:
        code, _, err = run_main(["fid", "calc", "--quiet", *args], capsys)
        assert_one_error(code, err, pattern)


@requires_onnx
def test_cli_min_of_three_seed_ranges(data, tmp_path, capsys):
    det = make_onnx_detector(str(tmp_path / "ok.onnx"), 2048)
    ref = str(tmp_path / "ref.npz")
    code, out, err = run_main(["fid", "ref", "--data", data["tree"], "--dest", ref, "--num", "20", "--seed", "1",
                               "--detector", det, "--quiet"], capsys)
    assert code == 0 and "from 20 images" in out, err
    code, out, err = run_main(["fid", "calc", "--images", data["npz"], "--ref", ref, "--num", "8", "--min-of", "3",
                               "--detector", det, "--quiet"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert [ln.split()[0:2] for ln in lines[:3]] == [["FID", "="]] * 3 and lines[3].startswith("FID (min of 3) = ")
    assert "(seed 0)" in lines[0] and "(seed 16)" in lines[2] and "(seed 23)" in lines[2]
    values = [float(ln.split()[2]) for ln in lines[:3]]
    assert float(lines[3].split()[-1]) == min(values)
    detector = load_detector(det)
    part = write_npz(str(tmp_path / "first.npz"), data["images"][:8])
    expected = calc_fid(part, ref, detector, num=8, progress=False)
    assert abs(values[0] - expected) <= 1e-5 * abs(expected)  # printed with 6 significant digits


@requires_onnx
def test_onnx_detector_accepts_float_input_graphs(tmp_path):
    x = make_images(3).transpose(0, 3, 1, 2).copy()
    as_uint8 = load_detector(make_onnx_detector(str(tmp_path / "u.onnx"), 2048))
    as_float = load_detector(make_onnx_detector(str(tmp_path / "f.onnx"), 2048, float_input=True))
    assert as_uint8.input_dtype == np.uint8 and as_float.input_dtype == np.float32
    np.testing.assert_array_equal(as_uint8(x), as_float(x))
    with pytest.raises(InputError, match="uint8"):
        as_float(x.astype(np.float32))


def make_onnx_detector(path, dim, float_input=False):
    """A torch-free ONNX 'detector': channel means times a fixed [3, dim] matrix (dim=3: wrong size)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((3, dim)).astype(np.float32)
    in_type = TensorProto.FLOAT if float_input else TensorProto.UINT8
    graph = helper.make_graph(
        [helper.make_node("Cast", ["images"], ["xf"], to=TensorProto.FLOAT),
         helper.make_node("GlobalAveragePool", ["xf"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "weight"], ["features"])],
        "standin", [helper.make_tensor_value_info("images", in_type, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", "D"])],
        initializer=[numpy_helper.from_array(weight, "weight")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_cli_help_has_examples(capsys):
    for args in (["fid"], ["fid", "calc"], ["fid", "ref"], ["fid", "export-detector"]):
        code, out, _ = run_main([*args, "--help"], capsys)
        assert code == 0 and "Example" in out, args
    code, out, _ = run_main(["fid", "--help"], capsys)
    assert "unverified" in out.replace("\n", " ") or "not been verified" in out.replace("\n", " ")


@requires_torch
@requires_onnx
def test_fid_runs_without_torch_on_the_onnx_detector(data, detectors, tmp_path):
    """Subprocess with torch blocked: ONNX detector -> ref stats equal torch's; FID of the same images ~ 0."""
    ref = str(tmp_path / "ref.npz")
    code = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, Block())
        from edm_deploy.runtime.core.errors import BackendUnavailableError
        from edm_deploy.runtime.fid.fid import calc_fid, load_detector, make_ref
        det = load_detector({detectors['onnx']!r})
        make_ref({data['tree']!r}, {ref!r}, det, progress=False)
        print(repr(calc_fid({data['npz']!r}, {ref!r}, det, num={N_IMAGES}, progress=False)))
        try:
            load_detector(None)
        except BackendUnavailableError as exc:
            print("default:", exc)
        assert "torch" not in sys.modules
    """)
    env = dict(os.environ, EDM_DEPLOY_FID_DETECTOR="")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    mu_o, s_o = load_ref(ref)
    assert abs(float(lines[0])) <= 1e-9 * np.trace(s_o)
    assert lines[1].startswith("default:") and "export-detector" in lines[1]
    mu_t, s_t = compute_stats(data["tree"], load_detector(detectors["pt"]), num=N_IMAGES, progress=False)
    assert np.abs(mu_t - mu_o).max() <= 1e-5 * np.abs(mu_t).max()
    assert np.abs(s_t - s_o).max() <= 1e-5 * np.abs(s_t).max()


def test_default_detector_error_is_raised_before_any_download(monkeypatch):
    import edm_deploy.runtime.fid.fid_detector as fd

    monkeypatch.delenv(fd.DETECTOR_ENV, raising=False)
    monkeypatch.setattr(fd, "_torch_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="export-detector"):
        load_detector(None)


# ---------------------------------------------------------------------------------------------
# Robustness: reference statistics must be a mean and a covariance; outputs never replace inputs


def _not_psd(dim, rng):
    """A symmetric matrix with positive diagonal but negative eigenvalues: not a covariance."""
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    w = rng.uniform(0.1, 2, dim)
    w[:3] = -1.0
    return (q * w) @ q.T


def test_a_reference_that_is_not_a_covariance_is_refused(tmp_path):
    from edm_deploy.runtime.fid.fid_stats import check_statistics

    rng = np.random.default_rng(0)
    dim = 64
    feats = rng.standard_normal((20, dim))
    mu, sigma = feats.mean(0), np.cov(feats.T)
    bad = _not_psd(dim, rng)
    # The plain formula gives a negative "distance" for a non-PSD reference; the library refuses it.
    assert frechet_distance(mu, sigma, np.zeros(dim), -2 * np.eye(dim)) < 0
    for what, matrix, match in (("not-psd", bad, "not positive semi-definite"),
                                ("asymmetric", sigma + np.triu(np.ones((dim, dim)), 1), "not symmetric"),
                                ("negative", -np.eye(dim), "not positive semi-definite")):
        path = str(tmp_path / f"{what}.npz")
        np.savez(path, mu=np.zeros(dim), sigma=matrix)
        with pytest.raises(InputError, match=match) as info:
            load_ref(path)
        assert str(info.value).startswith(path) and "\n" not in str(info.value)
        with pytest.raises(InputError, match=match):  # statistics given as arrays are checked too
            calc_fid(np.zeros((2, 3, 8, 8), np.uint8), (np.zeros(dim), matrix), tiny_detector(dim))
    # Rounding is not refused: a rank-deficient covariance (fewer images than features), stored in
    # float32, and an all-zero one.
    for ok in (sigma, sigma.astype(np.float32), np.zeros((dim, dim))):
        check_statistics(mu, ok, "ok")


def test_cli_calc_refuses_a_non_covariance_in_one_line(data, tmp_path, capsys):
    ref = str(tmp_path / "bad-ref.npz")
    np.savez(ref, mu=np.zeros(64), sigma=_not_psd(64, np.random.default_rng(1)))
    code, _, err = run_main(["fid", "calc", "--images", data["npz"], "--ref", ref, "--num", "24", "--quiet",
                             "--detector", str(tmp_path / "never-loaded.onnx")], capsys)
    assert_one_error(code, err, "not positive semi-definite")


def test_cli_ref_checks_its_destination_before_any_work(data, tmp_path, capsys):
    samples = str(tmp_path / "x.npz")
    with open(data["npz"], "rb") as f:
        original = f.read()
    with open(samples, "wb") as f:
        f.write(original)
    link = tmp_path / "link.npz"
    link.symlink_to(samples)
    missing_detector = str(tmp_path / "no-detector.onnx")  # never reached: the destination fails first
    for dest, pattern in ((samples, "--dest " + samples + " would overwrite --data"),
                          (str(link), "would overwrite --data"),
                          (str(tmp_path), "is a folder"),
                          (str(tmp_path / "no" / "ref.npz"), "output folder does not exist")):
        code, _, err = run_main(["fid", "ref", "--data", samples, "--dest", dest, "--detector", missing_detector,
                                 "--quiet"], capsys)
        assert_one_error(code, err, pattern)
        assert "detector:" not in err  # nothing was loaded
    with open(samples, "rb") as f:
        assert f.read() == original
    assert sorted(os.listdir(tmp_path)) == ["link.npz", "x.npz"]
    # The library checks the same before computing anything (the detector is never called).
    with pytest.raises(InputError, match="would overwrite data"):
        make_ref(samples, samples, lambda x: pytest.fail("the detector ran"))
    with pytest.raises(InputError, match="is a folder"):
        make_ref(samples, str(tmp_path), lambda x: pytest.fail("the detector ran"))


def test_cli_export_detector_never_overwrites_its_input(tmp_path, capsys):
    pt = tmp_path / "detector.pt"
    pt.write_bytes(b"not really a detector")
    code, _, err = run_main(["fid", "export-detector", str(pt), "--out", str(pt)], capsys)
    assert_one_error(code, err, "would overwrite DETECTOR")
    assert pt.read_bytes() == b"not really a detector"


@requires_torch
def test_unreadable_torchscript_detectors_say_what_is_wrong(tmp_path):
    import torch

    junk = tmp_path / "random.pt"
    junk.write_bytes(os.urandom(3000))
    state = tmp_path / "state.pt"
    torch.save({"w": torch.ones(2)}, str(state))
    for path, pattern in ((junk, "not a zip archive"), (state, "without TorchScript code")):
        with pytest.raises(InputError, match=pattern) as info:
            load_detector(str(path))
        message = str(info.value)
        assert message.startswith(f"{path}: not a TorchScript detector: ") and "miniz" not in message


@requires_onnx
def test_reference_statistics_of_another_feature_size_name_the_file_and_both_sizes(data, tmp_path, capsys):
    """64-feature statistics scored with a 2048-feature detector: before any image is scored."""
    det = make_onnx_detector(str(tmp_path / "det.onnx"), 2048)
    ref = str(tmp_path / "ref64.npz")
    save_ref(ref, np.zeros(64), np.eye(64))
    code, _, err = run_main(["fid", "calc", "--images", data["npz"], "--ref", ref, "--num", "24",
                             "--detector", det, "--quiet"], capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert f"--ref {ref}: statistics of 64-feature vectors, but the detector {det} gives 2048" in lines[0]
    # a plain callable states no size: its first batch is compared
    with pytest.raises(InputError, match="the reference statistics: statistics of 64-feature vectors, but the "
                                         "detector gives 2048"):
        calc_fid(data["npz"], (np.zeros(64), np.eye(64)), tiny_detector(2048), num=24, progress=False)
