"""`edm-deploy info`: print the manifest of a checkpoint, ONNX file or TensorRT engine."""

from __future__ import annotations

import json
import os

import click

from edm_deploy.errors import InputError


def read_manifest(path: str) -> dict:
    """The manifest of any model file, reading as little as possible (no torch for .onnx/.plan)."""
    from edm_deploy.loading import model_kind
    from edm_deploy.manifest import read_onnx_manifest, read_sidecar

    kind = model_kind(path)
    if not os.path.exists(path):
        raise InputError(f"file not found: {path}")
    if kind == "plan":
        return read_sidecar(path + ".json")
    if kind == "onnx":
        return read_onnx_manifest(path)
    from edm_deploy.training.checkpoint import load_checkpoint, load_network, network_manifest

    ckpt = load_checkpoint(path)
    manifest = network_manifest(load_network(ckpt), ckpt["network"], source_path=path)
    manifest["checkpoint"] = {k: v for k, v in ckpt.get("meta", {}).items() if isinstance(v, (str, int, float, bool))}
    manifest["checkpoint"]["resume_point"] = ckpt.get("training_state") is not None
    return manifest


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the full manifest as JSON.")
def info(path: str, as_json: bool) -> None:
    """Print what a model file is: shape, classes, sigma range, precision, producers.

    \b
    Examples:
      edm-deploy info model.onnx
      edm-deploy info model.plan --json
      edm-deploy info runs/digits/ckpt.pt
    """
    from edm_deploy.manifest import dumps, summary_lines

    manifest = read_manifest(path)
    if as_json:
        click.echo(dumps(manifest))
        return
    click.echo(path)
    for line in summary_lines(manifest):
        click.echo("  " + line)
    if "checkpoint" in manifest:
        click.echo("  checkpoint  : " + json.dumps(manifest["checkpoint"], sort_keys=True))
