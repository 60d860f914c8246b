"""`edm-deploy dataset`: build a training ZIP in the reference EDM format.

The output is what the reference `dataset_tool.py` writes and what `edm-deploy train --data`
reads fastest: an uncompressed ZIP of PNGs named ``00000/img00000000.png`` ... plus
``dataset.json`` = ``{"labels": [[name, class], ...]}`` (or ``null`` without labels). It is
written to a temporary file beside the destination and renamed only when complete, so an error
or Ctrl-C never leaves a half-written ZIP and never touches an existing file of that name until
the new one is whole.
"""

from __future__ import annotations

from typing import Optional

import click


@click.command("dataset", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--source", required=True, metavar="FOLDER|ZIP|IDX|digits|fashion-mnist",
              help="Image folder (recursive; labels from dataset.json or sub-folder names), a dataset "
                   "ZIP, an IDX images file of the MNIST family (...-images-idx3-ubyte[.gz]; its labels file "
                   "beside it is used when present), `digits` (scikit-learn's 8x8 handwritten digits, train "
                   "split) or `fashion-mnist` / `fashion-mnist-test` (the Debian package "
                   "dataset-fashion-mnist, padded to 32x32).")
@click.option("--dest", required=True, metavar="OUT.zip", help="The ZIP to write.")
@click.option("--resolution", type=int, default=None, metavar="N",
              help="Centre-crop to a square and resize every image to NxN (Lanczos). N must be a power of two "
                   "from 4 to 1024.")
@click.option("--pad-to", "pad", type=int, default=None, metavar="N",
              help="Centre every image on a black NxN square first (28x28 MNIST-family images -> 32x32, as "
                   "papers train them; their backgrounds are black, so the border continues the image).")
@click.option("--max-images", type=int, default=None, metavar="N", help="Keep only the first N images (sorted order).")
def dataset(source: str, dest: str, resolution: Optional[int], pad: Optional[int], max_images: Optional[int]) -> None:
    """Build a dataset ZIP (reference EDM format) from an image folder or the built-in digits.

    \b
    Example:
      edm-deploy dataset --source digits --dest digits.zip
      edm-deploy dataset --source ~/photos --dest photos64.zip --resolution 64 --max-images 10000
      edm-deploy dataset --source train-images-idx3-ubyte.gz --dest mnist32.zip --pad-to 32
      edm-deploy dataset --source fashion-mnist --dest fashion-mnist-32.zip
    """
    from tqdm import tqdm

    from edm_deploy.training.dataset import check_zip_arguments, write_dataset_zip

    check_zip_arguments(source, dest, resolution, labels=("--source", "--dest", "--resolution", "--pad-to"), pad=pad)

    bar = tqdm(unit="img", desc="dataset", leave=False, disable=None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        info = write_dataset_zip(source, dest, resolution=resolution, max_images=max_images, progress=progress, pad=pad)
    finally:
        bar.close()
    c, r, _ = info["shape"]
    click.echo(
        f"wrote {info['dest']}: {info['images']} images, {c}x{r}x{r}, "
        f"{'with labels' if info['labels'] else 'no labels'}"
    )
