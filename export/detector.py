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
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import onnx
import torch

from edm_deploy.runtime.errors import EdmDeployError, InputError, first_line
from edm_deploy.runtime.fid_detector import FEATURE_DIM

DEFAULT_OPSET = 17
FALLBACK_OPSET = 20
METADATA_KEY = "edm_deploy_fid_detector"


@dataclass
class DetectorExportReport:
    """What was exported and how closely onnxruntime reproduces torch."""

    out: str
    opset: int
    feature_dim: int
    checks: list[dict] = field(default_factory=list)  # per resolution: batch, max_abs_err, max_abs, rel_err

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


def _wrap(detector):
    """Script the wrapper: tracing cannot enter a loaded ScriptModule, scripting can."""
    try:
        return torch.jit.script(FeatureDetector(detector))
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
    from edm_deploy.runtime.download import fetch
    from edm_deploy.runtime.fileio import sha256_file

    if src.lower().split("?")[0].endswith(".pkl"):
        raise InputError(f"{src}: pickled detectors are refused (loading one executes code); use the TorchScript .pt")
    path = fetch(src, sha256=sha256)
    try:
        net = torch.jit.load(path, map_location="cpu").eval()
    except Exception as exc:
        raise InputError(f"{src}: not a TorchScript detector ({first_line(exc)})") from exc
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
        used = opset or DEFAULT_OPSET
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
            "source": os.path.basename(path), "sha256": sha256_file(path), "feature_dim": feature_dim,
            "call": "detector(images_uint8_nchw, return_features=True)",
        })
        onnx.save(model, tmp)

        report = DetectorExportReport(out=out, opset=used, feature_dim=feature_dim)
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
