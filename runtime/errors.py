"""One exception type for every problem a user can fix.

The CLI turns an `EdmDeployError` into a single ``error: ...`` line and a non-zero exit code, so
everything the library raises for bad input, missing files or unsupported setups derives from it.
Anything else that escapes is a bug and is shown as such.
"""

from __future__ import annotations


class EdmDeployError(Exception):
    """A user-facing error: the message alone must tell the user what is wrong and what to do."""


class InputError(EdmDeployError, ValueError):
    """Bad arguments or bad input data (wrong shape, out-of-range value, malformed file)."""


class BackendUnavailableError(EdmDeployError):
    """A requested backend or library (TensorRT, CUDA, onnxruntime, torch) is not usable here."""


class NumericalError(EdmDeployError):
    """A denoiser produced NaN or Inf; the message names the affected seeds when known."""


class BackendRuntimeError(EdmDeployError):
    """A backend that loaded fine failed while running (out of memory, a driver or kernel error)."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's text (library messages run on for pages), cut to `limit`."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
