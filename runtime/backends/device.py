"""Which array library keeps sampler state on a GPU: CuPy first (torch-free), then torch.

The onnxruntime and TensorRT backends bind device buffers from whichever is present, and the GPU
identification uses the same order; this is the one place that order is decided.
"""

from __future__ import annotations

from typing import Optional


def device_array_library(device_id: int = 0) -> Optional[str]:
    """'cupy' or 'torch' when that library can reach CUDA device `device_id`, else None.

    A CuPy that imports but cannot reach a GPU (no driver, a wrong CUDA build) is skipped.
    """
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > device_id:
            return "cupy"
    except Exception:
        pass
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > device_id:
            return "torch"
    except Exception:
        pass
    return None
