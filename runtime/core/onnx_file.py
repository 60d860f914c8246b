"""An ONNX file's own bytes, read without the onnx package: its metadata and its content digest.

An ONNX file is one protobuf `ModelProto`; its manifest rides in ``metadata_props`` (field 14),
so the file cannot carry a hash of itself, but it can carry one of everything else. The
**content digest** is the sha256 of every top-level field but the metadata, in file order (the
graph with its weights, the opsets, the producer), bound to the precision the manifest claims:
an export records it in the manifest (``content_sha256``), and every load recomputes it, so a
flipped bit in the weights, or a manifest edited to claim another precision, is one clear error
instead of silently different images. Reading it costs one pass over the file (hashing runs at
about 1 GB/s); the answer is kept per process for an unchanged file (path, size, mtime, inode).
It is not cached across processes: a bit that rots on disk leaves the mtime as it was.

Weights stored outside the file (``.onnx.data``, exports over 2 GB) are not covered; such
exports record no digest.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import BinaryIO, Iterator, Optional

from .errors import InputError
from .manifest import DIGEST_KEY, ONNX_METADATA_KEY

METADATA_FIELD = 14      # ModelProto.metadata_props
_ENTRY_KEY, _ENTRY_VALUE = 1, 2  # StringStringEntryProto
MAX_METADATA_BYTES = 16 << 20    # the manifest's own bound (`jsonio.MAX_MANIFEST_BYTES`) and some room


class _Malformed(Exception):
    """Not a protobuf message: the caller says what that means for its file."""


def _varint(f: BinaryIO) -> Optional[int]:
    """The next base-128 varint, or None at the end of the data."""
    result = shift = 0
    while True:
        byte = f.read(1)
        if not byte:
            if shift:
                raise _Malformed("the data ends inside a number")
            return None
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise _Malformed("a number runs longer than 10 bytes")


def _fields(f: BinaryIO, size: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, start of its tag, start of its payload, end) of each top-level field."""
    while True:
        start = f.tell()
        tag = _varint(f)
        if tag is None:
            return
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            if _varint(f) is None:
                raise _Malformed("the data ends inside a number")
            payload = f.tell()
        elif wire == 2:
            length = _varint(f)
            payload = f.tell()
            if length is None or payload + length > size:
                raise _Malformed("a field runs past the end of the file")
            f.seek(payload + length)
        elif wire in (1, 5):
            payload = f.tell()
            f.seek(payload + (8 if wire == 1 else 4))
        else:
            raise _Malformed(f"wire type {wire} is not used by ONNX")
        if number == 0 or f.tell() > size:
            raise _Malformed("a field runs past the end of the file")
        yield number, start, payload, f.tell()


def _hash_range(f: BinaryIO, digest, start: int, end: int, chunk: int = 1 << 20) -> None:
    f.seek(start)
    left = end - start
    while left > 0:
        block = f.read(min(chunk, left))
        if not block:
            raise _Malformed("the file ends early")
        digest.update(block)
        left -= len(block)


def _digest_of(f: BinaryIO, size: int, precision: str) -> str:
    digest = hashlib.sha256(f"edm-deploy content digest, precision {precision}\n".encode())
    ranges = [(start, end) for number, start, _, end in _fields(f, size) if number != METADATA_FIELD]
    for start, end in ranges:
        _hash_range(f, digest, start, end)
    return digest.hexdigest()


def digest_of_bytes(data: bytes, precision: str) -> str:
    """The content digest of a serialized model (an export computes it before adding its metadata)."""
    return _digest_of(io.BytesIO(data), len(data), precision)


_DIGESTS: dict[tuple, str] = {}


def content_digest(path: str, precision: str) -> str:
    """The content digest of the ONNX file at `path` (see the module doc); InputError if unreadable."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino, precision)
    if key not in _DIGESTS:
        try:
            with open(path, "rb") as f:
                _DIGESTS[key] = _digest_of(f, st.st_size, precision)
        except _Malformed as exc:
            raise InputError(f"{path} is not an ONNX file ({exc})") from None
    return _DIGESTS[key]


def check_content_digest(path: str, manifest: dict) -> None:
    """Refuse a file whose content no longer has the digest its manifest recorded (none: not checked)."""
    recorded = manifest.get(DIGEST_KEY)
    if recorded is None:
        return
    if content_digest(path, str(manifest.get("precision", "fp32"))) != recorded:
        raise InputError(f"{path} is damaged or was altered: its content does not match the sha256 its manifest "
                         "recorded at export (a flipped bit in the weights, or an edited precision); export it again "
                         "or restore the file")


def metadata(path: str) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, reading only the file's top-level framing and them.

    Empty for a file that is no protobuf message or holds more metadata than a manifest can be.
    """
    entries: dict[str, str] = {}
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            for number, _, payload, end in _fields(f, size):
                if number != METADATA_FIELD:
                    continue
                if end - payload > MAX_METADATA_BYTES:
                    return {}
                f.seek(payload)
                entry = io.BytesIO(f.read(end - payload))
                f.seek(end)
                values = {n: entry.getvalue()[p:e] for n, _, p, e in _fields(entry, end - payload)}
                entries[values.get(_ENTRY_KEY, b"").decode("utf-8", "replace")] = \
                    values.get(_ENTRY_VALUE, b"").decode("utf-8", "replace")
    except (OSError, _Malformed):
        return {}
    return entries


def has_manifest(path: str) -> bool:
    """Whether `path` is an ONNX file carrying an edm-deploy manifest (an export); never raises."""
    return ONNX_METADATA_KEY in metadata(path)
