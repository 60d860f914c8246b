"""`edm-deploy convert`: official EDM network pickle -> edm-deploy checkpoint, without running its code.

The heavy import (torch, via `edm_deploy.export.official`) happens inside the command, so
`edm-deploy convert --help` stays fast.
"""

from __future__ import annotations

from typing import Optional

import click


@click.command("convert")
@click.argument("network", metavar="NETWORK")
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None,
              help="Output checkpoint (default: NETWORK's base name with .pt, in the current folder).")
@click.option("--key", default="ema", show_default=True,
              help="Top-level entry of a snapshot dict that holds the network.")
@click.option("--sha256", default=None, metavar="HEX", help="Expected sha256 of the pickle; refuse on mismatch.")
def convert(network: str, out: Optional[str], key: str, sha256: Optional[str]) -> None:
    """Convert an official EDM network pickle (.pkl) into an edm-deploy checkpoint (.pt).

    NETWORK is a local file or an http(s) URL (downloaded once into the cache). Official pickles
    (edm-*.pkl, baseline-*.pkl) and training snapshots (network-snapshot-*.pkl) are read with a
    restricted unpickler: the Python source embedded in the file is hashed, never executed, and a
    file that asks for anything beyond tensors, dicts and network records is refused.

    \b
    Example:
      edm-deploy convert https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl
      edm-deploy convert network-snapshot-200000.pkl --out ckpt.pt
      edm-deploy sample ckpt.pt -n 16
    """
    import os

    from edm_deploy.export.official import convert_official, default_output
    from edm_deploy.runtime.core.download import is_url
    from edm_deploy.runtime.core.errors import InputError
    from edm_deploy.runtime.core.fileio import refuse_overwriting_inputs

    target = out or default_output(network)
    if os.path.isdir(target):
        raise InputError(f"--out {target} is a folder; name the checkpoint file to write")
    if not is_url(network):
        refuse_overwriting_inputs({"NETWORK": network}, {"--out": target})
    result = convert_official(network, out=target, key=key, sha256=sha256, progress=True)
    for line in result.official.summary_lines():
        click.echo(line)
    click.echo(f"source sha256: {result.source_sha256}")
    click.echo(f"wrote {result.out}")
