"""`edm-deploy demo`: the digits main job (train -> export -> sample -> report)."""

from __future__ import annotations

from typing import Optional

import click

from edm_deploy.commands.common import POSITIVE
from edm_deploy.demo import GRID_NAME, PRECISIONS, PROFILES, REPORT_NAME, default_outdir


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, help=f"""\
Train a class-conditional EDM on the built-in digits (or on Fashion-MNIST, --data fashion-mnist),
export it to ONNX ({', '.join(PRECISIONS)},
each verified against the torch model), sample a class grid with the NumPy runtime and
onnxruntime, consistency-tune a copy for one- and two-evaluation sampling, and write a report
with classifier accuracy, Fréchet distance, NFE and images/s, for the paper's Heun and the fast
settings. Resumable: rerun after a stop.

\b
Example:
  edm-deploy demo                # about 4.5 minutes on a 2-core CPU -> demo/{GRID_NAME}, demo/{REPORT_NAME}
  edm-deploy demo --data fashion-mnist   # real images, about 2 hours on a 2-core CPU -> demo-fashion/
""")
@click.option("--data", type=click.Choice(sorted(PROFILES)), default="digits", show_default=True,
              help="The dataset: the built-in 8x8 digits (the quick story), or Fashion-MNIST (real 28x28 images padded "
                   "to 32x32; needs the Debian package dataset-fashion-mnist).")
@click.option("--outdir", default=None, type=click.Path(file_okay=False),
              help="Where everything goes [default: demo, or demo-fashion with --data fashion-mnist].")
@click.option("--kimg", "duration_kimg", type=POSITIVE, default=None, help="Training length in thousands of images [default: the dataset preset's].")
@click.option("--per-class", type=click.IntRange(min=1), default=100, show_default=True, help="Samples per class for the report.")
@click.option("--seed", type=int, default=0, show_default=True, help="Training seed.")
@click.option("--tune-kimg", type=POSITIVE, default=None, help="Consistency tuning length in thousands of images [default: the consistency preset's].")
def demo(data: str, outdir: str, duration_kimg: Optional[float], per_class: int, seed: int,
         tune_kimg: Optional[float]) -> None:
    from edm_deploy.demo import run_demo

    run_demo(outdir=outdir or default_outdir(data), duration_kimg=duration_kimg, per_class=per_class, seed=seed, echo=click.echo,
             tune_kimg=tune_kimg, data=data)
