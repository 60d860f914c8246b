"""`edm-deploy info`: print the manifest of a checkpoint, ONNX file or TensorRT engine."""

from __future__ import annotations

import json
from typing import Any

import click


def summary_lines(manifest: dict[str, Any]) -> list[str]:
    """Human-readable lines for `edm-deploy info`."""
    def limit(v):
        return "unbounded" if v is None else f"{v:g}"

    lines = [
        f"model       : {manifest.get('network', {}).get('class_name', '?')} / "
        f"{manifest.get('network', {}).get('init_kwargs', {}).get('model_type', '?')} ({manifest['precond']} preconditioning)",
        f"data        : {manifest['img_channels']}x{manifest['img_resolution']}x{manifest['img_resolution']}, "
        f"{'unconditional' if not manifest['label_dim'] else str(manifest['label_dim']) + ' classes'}",
        f"sigma range : [{limit(manifest['sigma_min'])}, {limit(manifest['sigma_max'])}]"
        + (f", sigma_data {manifest['sigma_data']:g}" if manifest.get("sigma_data") is not None else ""),
        f"rounding    : {manifest['sigma_rounding'].get('kind')}"
        + (f" ({len(manifest['sigma_rounding']['values'])} levels)" if manifest['sigma_rounding'].get('kind') == 'table' else ""),
        f"precision   : {manifest.get('precision', '?')}",
    ]
    dropout = ((manifest.get("network") or {}).get("init_kwargs") or {}).get("label_dropout")
    if manifest["label_dim"]:
        lines.append(f"guidance    : classifier-free possible (trained with label dropout {dropout:g})" if dropout
                     else "guidance    : autoguidance only (trained without label dropout; --cond-drop enables CFG)")
    tuned = manifest.get("consistency")
    if tuned:
        kimg = tuned.get("from_kimg")
        lines.append(f"consistency : {tuned['method']}-tuned from {tuned.get('from_checkpoint', '?')}"
                     + (f" ({kimg:g} kimg)" if isinstance(kimg, (int, float)) else "")
                     + f", sha256 {tuned['from_sha256'][:16]}...; sample it in 1-2 steps with the consistency "
                       f"sampler (ODE solvers give poor images)")
    for key, sigmas in (manifest.get("schedules") or {}).items():
        lines.append(f"schedule    : {key} at {', '.join(f'{v:.4g}' for v in sigmas)} (the default of sample --solver "
                     f"{key.split('@')[0]} --nfe {key.split('@')[1]})")
    quant = manifest.get("quantization")
    if quant:
        cal = quant.get("calibration", {})
        lo, hi = (cal.get("sigma_range") or [float("nan")] * 2)
        lines.append(f"quantized   : {quant.get('quantized_nodes')} {'/'.join(quant.get('quantized_op_types', []))} nodes "
                     f"int8 ({quant.get('weights')}); float: {', '.join(quant.get('kept_float', []))}")
        lines.append(f"calibrated  : {cal.get('method')} on {cal.get('num_images')} {cal.get('source')} "
                     f"(seed {cal.get('seed')}, {cal.get('rows')} rows, sigma {lo:.3g}..{hi:.3g})")
    batch = manifest.get("batch")
    if batch:
        lines.append(f"batch       : min {batch.get('min')}, opt {batch.get('opt')}, max {batch.get('max')}")
    if manifest.get("tensorrt"):
        trt = manifest["tensorrt"]
        lines.append(f"tensorrt    : {trt.get('version')} on {trt.get('gpu')} (sm {trt.get('compute_capability')})")
    prod = manifest.get("producer", {})
    if prod:
        lines.append("producer    : " + ", ".join(f"{k} {v}" for k, v in sorted(prod.items())))
    src = manifest.get("source", {})
    if src:
        lines.append(f"source      : {src.get('checkpoint', '?')} (sha256 {str(src.get('sha256', '?'))[:16]}...)")
    return lines


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
    from edm_deploy.loading import read_manifest
    from edm_deploy.runtime.core.manifest import dumps

    manifest = read_manifest(path)
    if as_json:
        click.echo(dumps(manifest))
        return
    click.echo(path)
    for line in summary_lines(manifest):
        click.echo("  " + line)
    if "checkpoint" in manifest:
        click.echo("  checkpoint  : " + json.dumps(manifest["checkpoint"], sort_keys=True))
