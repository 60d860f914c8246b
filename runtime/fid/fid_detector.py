"""The FID feature detector: Inception-v3 pool features (2048-d) from uint8 NCHW RGB images.

Two kinds, one call: `detector(images_uint8_nchw) -> float features [N, 2048]`.

* **ONNX** (`*.onnx`), run with onnxruntime - no torch needed. Make one once with
  `edm-deploy fid export-detector inception-2015-12-05.pt --out inception.onnx`. Its single input
  may be uint8 or float (the image values 0..255 are passed unchanged either way).
* **TorchScript** (`*.pt`), loaded with `torch.jit.load` and called as the reference calls its
  detector, `detector(images, return_features=True)`. Only usable where torch is installed.

Images go in at native resolution: resizing to 299x299 happens inside the detector, as in the
reference. The reference's own detector URL is a Python pickle (`inception-2015-12-05.pkl`) that
can only be loaded by executing code stored in it, which edm-deploy refuses to do. The default is
therefore the StyleGAN2-ADA TorchScript translation of the same TF graph,
`inception-2015-12-05.pt`, which the StyleGAN2-ADA/StyleGAN3 metrics and clean-fid use; numeric
identity of its features with the `.pkl` has NOT been verified by us.
"""

from __future__ import annotations

import os
import zipfile
from typing import Optional

import numpy as np

from ..core.errors import BackendUnavailableError, InputError, first_line
from .fid_stats import FEATURE_DIM

DEFAULT_DETECTOR_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)
DETECTOR_ENV = "EDM_DEPLOY_FID_DETECTOR"


def _torch_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


class Detector:
    """Base: validates every output so a wrong network is one clear error, not a bogus FID."""

    kind = "?"

    def __init__(self, path: str, feature_dim: int = FEATURE_DIM) -> None:
        self.path = path
        self.feature_dim = int(feature_dim)

    def _run(self, images: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, 3, H, W] -> float [N, feature_dim]."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"detector input must be uint8 [N, 3, H, W], got {images.dtype} {list(images.shape)}")
        feats = np.asarray(self._run(images))
        if feats.ndim != 2 or feats.shape[0] != images.shape[0] or feats.shape[1] != self.feature_dim:
            found = feats.shape[1] if feats.ndim == 2 else list(feats.shape)
            raise InputError(
                f"detector {self.path} returns features of size {found} (output shape {list(feats.shape)}), "
                f"but FID needs {self.feature_dim}-d Inception-v3 pool features [N, {self.feature_dim}]; "
                f"use inception-2015-12-05.pt or its ONNX export"
            )
        return feats


class OnnxDetector(Detector):
    """An exported detector run with onnxruntime (CUDA provider when available, else CPU)."""

    kind = "onnx"

    def __init__(self, path: str, feature_dim: int = FEATURE_DIM, providers: Optional[list[str]] = None) -> None:
        super().__init__(path, feature_dim)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError(
                "an .onnx detector needs onnxruntime; install it with `pip install edm-deploy[ort]`"
            ) from exc
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(path, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InputError(f"{path}: cannot load the ONNX detector ({first_line(exc)})") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise InputError(f"{path}: a detector must have one input (images), found {len(inputs)}")
        self.input_name = inputs[0].name
        types = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32, "tensor(float16)": np.float16}
        if inputs[0].type not in types:
            raise InputError(f"{path}: detector input type {inputs[0].type} is not uint8 or float")
        self.input_dtype = types[inputs[0].type]
        out_shape = self.session.get_outputs()[0].shape
        if len(out_shape) == 2 and isinstance(out_shape[1], int) and out_shape[1] != self.feature_dim:
            raise InputError(
                f"detector {path} returns features of size {out_shape[1]}, but FID needs "
                f"{self.feature_dim}-d Inception-v3 pool features"
            )
        self.providers = self.session.get_providers()

    def _run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: images.astype(self.input_dtype, copy=False)})[0]


def _torchscript_problem(path: str) -> str:
    """Why torch.jit.load refused `path`, from the file itself (torch's text runs on for a paragraph)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return "the file is not a zip archive (TorchScript files are), or it is truncated"
    if not any(n.endswith("/constants.pkl") for n in names):
        return "a zip archive without TorchScript code (a torch.save checkpoint?); save the detector with torch.jit.save"
    return "a TorchScript archive that is damaged or needs a newer torch"


class TorchScriptDetector(Detector):
    """A TorchScript detector called as in the reference: `net(images, return_features=True)`."""

    kind = "torchscript"

    def __init__(self, path: str, feature_dim: int = FEATURE_DIM, device: Optional[str] = None) -> None:
        super().__init__(path, feature_dim)
        try:
            import torch
        except ImportError as exc:
            raise BackendUnavailableError(
                f"{path} is a TorchScript detector and needs torch; without torch, convert it once where "
                f"torch is installed (`edm-deploy fid export-detector {os.path.basename(path)} --out "
                f"inception.onnx`) and pass --detector inception.onnx"
            ) from exc
        self._torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.net = torch.jit.load(path, map_location=self.device).eval()
        except Exception as exc:  # torch raises RuntimeError/ValueError subtypes here
            raise InputError(f"{path}: not a TorchScript detector: {_torchscript_problem(path)}") from exc

    def _run(self, images: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
            try:
                out = self.net(x, return_features=True)
            except RuntimeError as exc:
                raise InputError(
                    f"detector {self.path} failed on a batch of shape {list(images.shape)}: "
                    f"{str(exc).strip().splitlines()[-1]}"
                ) from exc
        return out.detach().to(torch.float64).cpu().numpy()


def _detector_kind(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".onnx":
        return "onnx"
    if ext == ".pkl":
        return "pickle"
    if ext in (".pt", ".pth") or zipfile.is_zipfile(path):  # TorchScript archives are ZIP files
        return "torchscript"
    return "onnx"  # ONNX files are bare protobuf; onnxruntime gives a clear error if not


def load_detector(
    path_or_url: Optional[str] = None,
    sha256: Optional[str] = None,
    feature_dim: int = FEATURE_DIM,
    device: Optional[str] = None,
) -> Detector:
    """Load the FID detector from a path or URL (default: $EDM_DEPLOY_FID_DETECTOR, else the .pt URL).

    URLs are downloaded once into the edm-deploy cache, checked against `sha256` when given.
    """
    from ..core.download import fetch, is_url

    source = path_or_url or os.environ.get(DETECTOR_ENV) or DEFAULT_DETECTOR_URL
    lower = source.lower().split("?")[0]
    if lower.endswith(".pkl"):
        raise InputError(
            f"{source}: pickled detectors (such as the reference's inception-2015-12-05.pkl) can only be "
            f"loaded by executing code stored in them, which edm-deploy refuses; use the TorchScript "
            f"{DEFAULT_DETECTOR_URL} or its ONNX export"
        )
    if is_url(source) and not lower.endswith(".onnx") and not _torch_available():
        raise BackendUnavailableError(
            f"the detector {source} is TorchScript and needs torch, which is not installed; on a machine "
            f"with torch run `edm-deploy fid export-detector {source} --out inception.onnx`, then pass "
            f"--detector inception.onnx (or set ${DETECTOR_ENV})"
        )
    path = fetch(source, sha256=sha256)
    kind = _detector_kind(path)
    if kind == "pickle":  # a local file with another name that is a pickle; refuse as above
        raise InputError(f"{source}: pickled detectors are refused (they execute code); use TorchScript or ONNX")
    if kind == "torchscript":
        return TorchScriptDetector(path, feature_dim, device=device)
    return OnnxDetector(path, feature_dim)
