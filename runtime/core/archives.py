"""Reading images and ZIP archives someone else made: every read bounded before it happens.

Datasets (`training.dataset`) and FID image sources (`runtime.fid.fid_images`) read image files from
folders and ZIP archives a user hands over. A 14 MB ZIP whose one entry inflates to 3 GB, or a
100 KB PNG whose header promises 100 M pixels, would otherwise be read or decoded whole before
anything looked at it. The rules, in one place:

* an archive is refused from its central directory alone, before anything is inflated, when an
  entry declares more than its kind of file holds (`check_zip_sizes`, `MAX_IMAGE_FILE_BYTES`),
  or when the whole inflates to more than `MAX_ZIP_RATIO` times its compressed size;
* every read streams in chunks and stops at the limit (`read_bounded`), whatever a (forged)
  header declared, and a member's CRC is checked as it streams (`first_bad_member`);
* an image is opened for its header only, and refused above `MAX_IMAGE_PIXELS` before it is
  decoded (`open_image`, `check_pixel_count`).
"""

from __future__ import annotations

import warnings
import zipfile
import zlib
from typing import BinaryIO, Callable, Optional, Sequence, Union

from .errors import InputError

# One image file may hold at most this many bytes (in a folder or, inflated, in a ZIP): far above
# any image worth a dataset (a 1024x1024 16-bit RGB PNG, uncompressed, is 6 MB; a 100-megapixel
# photo as JPEG ~50 MB), and a bound on what reading one costs.
MAX_IMAGE_FILE_BYTES = 256 << 20
# The most pixels one image may decode to (PIL's own decompression-bomb limit, as an error here).
MAX_IMAGE_PIXELS = 89_478_485
# A ZIP may inflate to at most this many times its compressed size (PNGs barely compress; a
# folder of BMPs of digits ~10x); beyond it the archive is a ZIP bomb, refused before inflating.
MAX_ZIP_RATIO = 200
ZIP_RATIO_SLACK = 64 << 20  # bytes a small archive may inflate to whatever its ratio
READ_CHUNK = 1 << 20
# What zipfile raises for an archive it cannot read (RuntimeError: an encrypted member; zlib.error:
# a corrupt deflate stream).
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError,
              RuntimeError, zlib.error)

MemberLimit = Callable[[str], int]  # member name -> the most bytes it may hold


def _image_limit(name: str) -> int:
    return MAX_IMAGE_FILE_BYTES


def read_bounded(f: BinaryIO, limit: int, where: str) -> bytes:
    """Read `f` to its end in chunks, refusing (one InputError) as soon as it passes `limit` bytes."""
    parts, size = [], 0
    while True:
        block = f.read(READ_CHUNK)
        if not block:
            return b"".join(parts)
        size += len(block)
        if size > limit:
            raise InputError(f"{where} holds more than {limit:,} bytes (at most {limit:,} are read for one file "
                             "of images); it is not an image file, or it is a ZIP bomb")
        parts.append(block)


def check_zip_sizes(zf: zipfile.ZipFile, path: str, limit_for: MemberLimit = _image_limit) -> None:
    """Refuse a ZIP bomb from its directory alone, before anything is inflated: an entry that
    declares more than `limit_for(name)`, or an archive inflating beyond `MAX_ZIP_RATIO`."""
    declared = compressed = 0
    for info in zf.infolist():
        limit = limit_for(info.filename)
        if info.file_size > limit:
            raise InputError(f"{path}: member {info.filename} inflates to {info.file_size:,} bytes; a file of "
                             f"images holds at most {limit:,} (a ZIP bomb?)")
        declared += info.file_size
        compressed += info.compress_size
    if declared > MAX_ZIP_RATIO * compressed + ZIP_RATIO_SLACK:
        raise InputError(f"{path}: {compressed:,} compressed bytes inflate to {declared:,} (more than "
                         f"{MAX_ZIP_RATIO}x); image archives do not compress like that (a ZIP bomb?)")


def first_bad_member(zf: zipfile.ZipFile, path: str, limit_for: MemberLimit = _image_limit) -> Optional[str]:
    """`ZipFile.testzip`, bounded: every member inflated in chunks and dropped, its CRC checked
    (zipfile compares it at the end of the member), none read past its limit. Returns the first
    member whose CRC fails, or None."""
    for info in zf.infolist():
        try:
            with zf.open(info) as f:
                size, limit = 0, limit_for(info.filename)
                while True:
                    block = f.read(READ_CHUNK)
                    if not block:
                        break
                    size += len(block)
                    if size > limit:  # CPython stops at the declared size; another zipfile might not
                        raise InputError(f"{path}: member {info.filename} inflates past {limit:,} bytes although "
                                         f"it declares {info.file_size:,} (a forged ZIP bomb)")
        except (zipfile.BadZipFile, zlib.error):
            return info.filename
    return None


def check_pixel_count(size: Sequence[int], where: str) -> None:
    """An image's header may not promise more than `MAX_IMAGE_PIXELS` pixels (a decompression bomb)."""
    w, h = int(size[0]), int(size[1])
    if w * h > MAX_IMAGE_PIXELS:
        raise InputError(f"{where} is {w}x{h} = {w * h:,} pixels; at most {MAX_IMAGE_PIXELS:,} are decoded "
                         "(a decompression bomb, or a photo far larger than any dataset needs)")


def open_image(f: Union[BinaryIO, str], where: str):
    """PIL's Image.open of a file object or path (header only), refused above `MAX_IMAGE_PIXELS`
    before any decoding.

    PIL's own decompression-bomb warning is silenced (this check is the rule, as an error) and
    its bomb error becomes one InputError.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(f)
        except Image.DecompressionBombError as exc:
            raise InputError(f"{where}: {exc}; at most {MAX_IMAGE_PIXELS:,} pixels are decoded") from None
    check_pixel_count(img.size, where)
    return img
