"""The one way this project reads JSON it did not just write itself: bounded before it is parsed.

JSON reaches the runtime from files a user (or an attacker) hands over: schedule files, the
manifest inside an ONNX file or a ``.plan.json`` sidecar, a dataset's ``dataset.json``, a run
record. Python's `json` parser recurses once per nesting level, so ``[[[[...]]]]`` nested a few
thousand deep is a `RecursionError` traceback, and whatever comes out nested a few hundred deep
makes every later walk over it (comparing records, printing a manifest) recurse as deep. So every
such read goes through `loads_bounded` / `read_json_file`, which refuse, in one `InputError`
line and before the parser runs:

* more than `max_bytes` of text (each caller states what its kind of file can reasonably hold),
  checked on the file's size before it is read;
* nesting deeper than `MAX_JSON_DEPTH`, measured without recursion;
* the non-standard constants ``NaN``, ``Infinity`` and ``-Infinity`` (JSON has none; Python's
  parser accepts them by default and they would pass as numbers);
* numbers no edm-deploy file holds: integers of more than `MAX_INT_DIGITS` digits and floats
  beyond the range of a float, told as valid JSON holding such a value (not as invalid JSON).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Optional

import numpy as np

from .errors import InputError
from .fileio import check_regular_file

# Every legitimate file nests a handful of levels (a manifest: manifest -> network -> init_kwargs
# -> channel_mult, 4); 64 leaves room for any hand-written extra and stays far below the depth at
# which Python's parser or a recursive walk over the result runs out of stack (~1000).
MAX_JSON_DEPTH = 64

# What each kind of file may hold at most, in bytes (a file beyond it is refused unread).
MAX_MANIFEST_BYTES = 16 << 20    # an iDDPM manifest with its 1000-level table is ~30 KB
MAX_SCHEDULE_BYTES = 16 << 20    # MAX_STEPS time points as text are ~2.5 MB
MAX_RECORD_BYTES = 64 << 20      # a run record holds the sampler settings and time points
MAX_DATASET_JSON_BYTES = 512 << 20  # labels of 10 M images as [name, label] pairs are ~400 MB

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def nesting_depth(text: str) -> int:
    """The deepest bracket nesting of JSON text, string contents ignored; no recursion.

    An upper bound for malformed text (the parser then rejects it anyway); exact for valid JSON.
    """
    bare = _STRING.sub("", text)
    codes = np.frombuffer(bare.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    opens = (codes == ord("[")) | (codes == ord("{"))
    brackets = np.flatnonzero(opens | (codes == ord("]")) | (codes == ord("}")))
    if not brackets.size:
        return 0
    return int(np.cumsum(np.where(opens[brackets], 1, -1), dtype=np.int64).max())


# The most digits an integer in any file this project reads may have: every count, size and seed
# fits in 64 bits (20 digits). Python refuses integers beyond 4300 digits with a ValueError that
# would read as invalid JSON, and spends quadratic time converting shorter ones.
MAX_INT_DIGITS = 20


class _BeyondRange(ValueError):
    """A valid JSON number that is no value to compute with (too large for a float, too many digits)."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: a number too large for a float, not a value to compute with
        raise _BeyondRange(f"{text[:40]} is beyond the range of a float")
    return value


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _BeyondRange(f"its integer {text[:12]}... has {digits:,} digits; at most {MAX_INT_DIGITS:,} are read")
    return int(text)


def loads_bounded(text: Any, source: str, max_bytes: int = MAX_MANIFEST_BYTES, what: str = "JSON",
                  param: Optional[str] = None, allow_constants: bool = False) -> Any:
    """Parse JSON `text` (str or bytes) from `source`, bounded in size and depth (see the module doc).

    Every failure is one InputError naming `source` and, via `param`, the API parameter that
    gave it; `what` names the kind of content in messages (e.g. ``"schedule"``).
    `allow_constants` lets NaN/Infinity through, for files this project wrote with Python's
    default `json.dumps` (run records), which writes them.
    """
    if isinstance(text, (bytes, bytearray)):
        if len(text) > max_bytes:
            raise InputError(f"{source}: {len(text):,} bytes is more than a {what} file holds "
                             f"({max_bytes:,} at most)", param=param)
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{source} is not UTF-8 text, so not {what} ({exc.reason} at byte {exc.start})",
                             param=param) from None
    text = str(text)
    if len(text) > max_bytes:
        raise InputError(f"{source}: {len(text):,} characters is more than a {what} file holds "
                         f"({max_bytes:,} at most)", param=param)
    depth = nesting_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise InputError(f"{source}: {what} nested {depth} levels deep; at most {MAX_JSON_DEPTH} are read "
                         "(no edm-deploy file nests more than a few)", param=param)
    try:
        return json.loads(text, parse_int=_bounded_int,
                          **({} if allow_constants else {"parse_constant": _refuse_constant,
                                                         "parse_float": _finite_float}))
    except _BeyondRange as exc:
        kind = "" if what == "JSON" else f": it is no {what}"
        raise InputError(f"{source} is valid JSON, but {exc}{kind}", param=param) from None
    except RecursionError:
        raise InputError(f"{source}: {what} nested too deeply to read", param=param) from None
    except ValueError as exc:  # JSONDecodeError, a refused constant
        raise InputError(f"{source} is not valid {what} ({exc})", param=param) from None


def read_json_file(path: str, source: Optional[str] = None, max_bytes: int = MAX_MANIFEST_BYTES,
                   what: str = "JSON", param: Optional[str] = None, allow_constants: bool = False) -> Any:
    """`loads_bounded` of a file: its size is checked before a byte of it is read."""
    source = source or path
    check_regular_file(path, what)
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise InputError(f"{source}: {size:,} bytes is more than a {what} file holds ({max_bytes:,} at most)",
                             param=param)
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(f"cannot read {source}: {exc.strerror or exc}", param=param) from None
    return loads_bounded(data, source, max_bytes=max_bytes, what=what, param=param, allow_constants=allow_constants)


def has_format(path: str, formats: tuple[str, ...], max_bytes: int = MAX_RECORD_BYTES) -> bool:
    """Whether `path` is a JSON object whose ``format`` tag is one of `formats` (an edm-deploy file
    of that kind); anything unreadable, foreign or oversized is not."""
    try:
        data = read_json_file(path, max_bytes=max_bytes, allow_constants=True)
    except InputError:
        return False
    return isinstance(data, dict) and data.get("format") in formats
