"""Which GPU is this? Name and compute capability, from whichever CUDA binding is installed.

TensorRT engines are tied to the GPU architecture, so both the builder (to write the manifest)
and the runtime (to refuse a foreign engine) need this without depending on torch.
"""

from __future__ import annotations

import subprocess
from typing import Optional

from .device import device_array_library


def detect_gpu(device_id: int = 0) -> Optional[tuple[str, str]]:
    """(name, 'major.minor') of a CUDA device, or None when no GPU is visible."""
    lib = device_array_library(device_id)
    if lib == "cupy":
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(device_id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        return name, f"{props['major']}.{props['minor']}"
    if lib == "torch":
        import torch

        major, minor = torch.cuda.get_device_capability(device_id)
        return torch.cuda.get_device_name(device_id), f"{major}.{minor}"
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
        err, props = cudart.cudaGetDeviceProperties(device_id)
        if int(err) == 0:
            name = props.name.decode().rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
            return name, f"{props.major}.{props.minor}"
    except Exception:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={device_id}", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )
        if out.returncode == 0 and out.stdout.strip():
            name, cc = [p.strip() for p in out.stdout.strip().splitlines()[0].split(",")]
            return name, cc
    except Exception:
        pass
    return None
