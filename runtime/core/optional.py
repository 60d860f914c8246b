"""Optional libraries, imported only when a feature needs them, with one clear message if absent.

The runtime core needs NumPy only; torch, onnxruntime, onnx, TensorRT and CuPy each serve one
backend or tool. `require` imports one and, when it is missing, raises a
`BackendUnavailableError` that says what needed it and how to install it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import BackendUnavailableError

# module -> what to install for it (the extras are defined in pyproject.toml)
INSTALL_HINTS = {
    "torch": "pip install 'edm-deploy[train]' (CPU build: pip install torch --index-url https://download.pytorch.org/whl/cpu)",
    "onnx": "pip install 'edm-deploy[export]'",
    "onnxruntime": "pip install onnxruntime (CPU) or onnxruntime-gpu",
    "tensorrt": "pip install tensorrt (and a CUDA GPU)",
    "cupy": "pip install cupy-cuda12x",
    "polygraphy": "pip install polygraphy",
    "sklearn": "pip install scikit-learn",
    "scipy": "pip install scipy",
    "fastapi": "pip install 'edm-deploy[serve]'",
    "uvicorn": "pip install 'edm-deploy[serve]'",
    "prometheus_client": "pip install 'edm-deploy[serve]'",
    "fastapi_offline": "pip install 'edm-deploy[serve]'",
}


def install_hint(module: str) -> str:
    top = module.split(".")[0]
    return INSTALL_HINTS.get(top, f"pip install {top}")


def require(module: str, purpose: str) -> ModuleType:
    """Import `module`, or explain in one line that `purpose` needs it and how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailableError(f"{purpose} needs {module}: {install_hint(module)}") from exc
