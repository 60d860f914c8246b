"""The output formats as `runtime.output.writers` declares them: ``{kind: path}`` in, one batch's bytes out."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from edm_deploy.runtime.core.errors import InputError
from edm_deploy.runtime.output.writers import (
    OUTPUT_KINDS,
    GridWriter,
    NpzWriter,
    check_output,
    encode_output,
    outputs_for_shard,
    written_paths,
)

IMAGES = np.arange(4 * 3 * 2 * 1, dtype=np.uint8).reshape(4, 3, 2, 1) * 9


def test_a_batch_encodes_as_the_format_s_files_hold_it(tmp_path):
    grid = tmp_path / "g.png"
    writer = GridWriter(str(grid), 4, columns=2, scale=3, image_shape=(3, 2, 1))
    writer.submit(IMAGES, [0, 1, 2, 3])
    writer.close()
    assert encode_output("grid", IMAGES, [0, 1, 2, 3], grid_columns=2, grid_scale=3) == (grid.read_bytes(), "image/png")

    npz = NpzWriter(str(tmp_path / "a.npz"), [5, 6, 7, 8])
    npz.submit(IMAGES, [5, 6, 7, 8], np.array([1, 2, 3, 4]))
    (part,) = set(npz.done.values())
    body, media = encode_output("npz", IMAGES, [5, 6, 7, 8], np.array([1, 2, 3, 4]))
    assert media == "application/octet-stream" and body == open(part, "rb").read()
    with np.load(io.BytesIO(encode_output("npz", IMAGES, [5, 6, 7, 8])[0])) as data:
        assert np.array_equal(data["images"], IMAGES) and data["seeds"].tolist() == [5, 6, 7, 8]
        assert data["labels"].tolist() == [-1] * 4  # unconditional, as the .npz file says it

    body, media = encode_output("png", IMAGES[2:3], [2])
    assert media == "image/png" and np.array_equal(np.asarray(Image.open(io.BytesIO(body)))[:, :, None], IMAGES[2])
    with pytest.raises(InputError, match="a PNG holds one image, got 4"):
        encode_output("png", IMAGES, [0, 1, 2, 3])
    with pytest.raises(InputError, match="unknown output kind 'tiff'; choose one of png, npz, grid"):
        encode_output("tiff", IMAGES, [0, 1, 2, 3])


def test_outputs_are_given_as_kind_and_path(tmp_path):
    out = str(tmp_path / "a.npz")
    assert outputs_for_shard({"png": None, "npz": out, "grid": None}) == {"npz": out}
    sharded = outputs_for_shard({"npz": out}, (1, 4))
    assert sharded == {"npz": str(tmp_path / "a.shard1of4.npz")}
    assert outputs_for_shard({"png": str(tmp_path)}, (1, 4)) == {"png": str(tmp_path)}  # one folder for all shards
    assert written_paths(sharded) == {"--npz": sharded["npz"], "--npz (its parts folder)": sharded["npz"] + ".parts"}
    check_output(3, {"npz": out})
    with pytest.raises(InputError, match="give exactly one output: --outdir DIR, --npz FILE, --grid FILE") as info:
        check_output(3, {"npz": out, "grid": str(tmp_path / "g.png")})
    assert info.value.param == tuple(kind.param for kind in OUTPUT_KINDS.values())
    with pytest.raises(InputError, match="a grid cannot be sharded"):
        check_output(3, {"grid": str(tmp_path / "g.png")}, shard=(0, 2))
