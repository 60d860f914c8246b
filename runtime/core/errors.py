"""The error classes: what a user can fix, told apart from what is a bug.

The CLI turns an `EdmDeployError` into a single ``error: ...`` line and a non-zero exit code, so
everything the library raises for bad input, missing files, unsupported setups or a backend
failing at run time derives from it, in one class per cause:

* `InputError`: bad arguments or bad input data;
* `BackendUnavailableError`: a library, device or provider that is not usable here;
* `BackendRuntimeError`: a backend that loaded but failed while running (out of memory, a driver);
* `NumericalError`: NaN/Inf out of a denoiser.

Anything else that escapes is a bug and the CLI shows it as one (with its traceback).

Library messages name the API parameter (``max_batch must be >= 1``), never a command-line flag;
an error about one parameter carries it in `param`, and the CLI rewrites the message to name the
flag that set it.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union


class EdmDeployError(Exception):
    """A user-facing error: the message alone must tell the user what is wrong and what to do."""

    def __init__(self, message: str = "", param: Union[str, Sequence[str], None] = None):
        super().__init__(message)
        self.param = param


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


def param_error(param: str, message: str) -> InputError:
    """An InputError about one API parameter, tagged with it (``.param``) so a front end can name its own flag."""
    return InputError(message, param=param)


def shown(value: object) -> str:
    """A value for an error line: short however large (a 400-digit int, a long string)."""
    import reprlib

    try:
        return reprlib.repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return f"an integer of about {int(value).bit_length() * 0.30103:.0f} digits"  # type: ignore[call-overload]


def check_number(value: object, name: str, allow_inf: bool = False) -> float:
    """``value`` as a float when it is given as a number (not a bool or a string); NaN refused, and
    infinity unless ``allow_inf`` (an int too large for a float counts as infinite)."""
    import math

    import numpy as np

    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{name} must be a number, got {shown(value)}", param=name)
    try:
        out = float(value)
    except OverflowError:
        out = math.inf if value > 0 else -math.inf  # type: ignore[operator]
    if math.isnan(out) or (math.isinf(out) and not allow_inf):
        raise InputError(f"{name} must be a finite number, got {shown(value)}", param=name)
    return out


def check_int(value: object, name: str, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """``value`` as an int within [lo, hi]; a bool, float, string or out-of-range value is one InputError naming ``name``.

    The one integer check of the library: counts, sizes and orders are never silently truncated.
    """
    import numpy as np

    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer, got {shown(value)}", param=name)
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bound = (f"an integer from {lo} to {hi}" if lo is not None and hi is not None else
                 "a positive integer" if lo == 1 else f"an integer >= {lo}" if lo is not None else f"an integer <= {hi}")
        raise InputError(f"{name} must be {bound}, got {shown(value)}", param=name)
    return value
