"""`edm-deploy verify`: measured fidelity of an exported artifact against its checkpoint."""

from __future__ import annotations

from typing import Optional

import click

from edm_deploy.export.verify import VERIFY_BATCH_LIMIT, tolerance_summary
from edm_deploy.loading import DEVICES
from edm_deploy.runtime.core.errors import InputError
from edm_deploy.runtime.sampling.seeds import is_number_text


def _parse_batches(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if not all(is_number_text(p) for p in parts) or not parts:
        raise InputError(f"--batches must be comma-separated positive integers such as 1,5,8, got {text!r}")
    return [int(p) for p in parts]


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, help=f"""\
Compare an .onnx or .plan (or a .pt run with --bf16/--fp16) with the fp32 torch model over
batch sizes and noise levels.

Prints, per sigma band, the derivative error ||D - D_ref|| / ||x - D_ref|| (the fraction by
which the artifact changes each sampler step), max abs and relative L2 error of D, the
polygraphy comparator's verdict and a NaN/Inf check; exits 1 when a row exceeds the
tolerance of the artifact's precision ({tolerance_summary()}).

\b
Examples:
  edm-deploy verify model.onnx --against ckpt.pt
  edm-deploy verify model.plan --against ckpt.pt --batches 1,7,256
  edm-deploy verify ckpt.pt --bf16                  # the torch backend's bf16 path
""")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--against", "ckpt", default=None, type=click.Path(dir_okay=False), help="The .pt checkpoint it came from [default: MODEL itself when it is a .pt].")
@click.option("--bf16", is_flag=True, help="MODEL .pt: verify the torch backend's bfloat16 autocast path.")
@click.option("--fp16", is_flag=True, help="MODEL .pt: verify the torch backend's fp16 path.")
@click.option("--batches", default=None, help="Comma-separated batch sizes, each at most the artifact's max batch "
                                              f"[default: 1, an odd size, min(max, {VERIFY_BATCH_LIMIT}): the inputs "
                                              "the export gate measured].")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="Where the artifact runs.")
@click.option("--seed", default="0", show_default=True, help="Seed of the test inputs (a non-negative integer).")
@click.option("--other-checkpoint", is_flag=True,
              help="Measure even when --against is not the checkpoint MODEL's manifest says it was exported from.")
def verify(model: str, ckpt: Optional[str], bf16: bool, fp16: bool, batches: Optional[str], device: str, seed: str,
           other_checkpoint: bool) -> None:
    from edm_deploy.export.verify import source_mismatch, verify_artifact
    from edm_deploy.loading import MODEL_KINDS, load, model_kind, read_manifest
    from edm_deploy.training.checkpoint import load_checkpoint, load_network

    if not is_number_text(seed.strip()):
        raise InputError(f"--seed must be a non-negative integer, got {seed!r}")
    batch_list = _parse_batches(batches)
    if ckpt is not None and model_kind(ckpt) != "pt":
        raise InputError(f"--against {ckpt} is an exported {MODEL_KINDS[model_kind(ckpt)].name} model, not a checkpoint: "
                         "--against takes the .pt checkpoint MODEL was exported from (the fp32 torch reference)")
    if model_kind(model) == "pt":
        if not (bf16 or fp16):
            raise InputError("a .pt MODEL is the fp32 reference itself: verify its --bf16 or --fp16 path, "
                             "or pass an exported .onnx/.plan")
        ckpt = ckpt or model
    elif ckpt is None:
        raise InputError("--against CKPT is required: the .pt checkpoint the artifact came from")
    else:
        mismatch = source_mismatch(read_manifest(model), ckpt)
        if mismatch and not other_checkpoint:
            raise InputError(f"{mismatch}; pass the checkpoint it came from, or --other-checkpoint to measure anyway")
        if mismatch:
            click.echo(f"warning: {mismatch}; measuring anyway (--other-checkpoint)", err=True)
    net = load_network(load_checkpoint(ckpt))
    with load(model, device=device, bf16=bf16, fp16=fp16) as den:
        report = verify_artifact(model, net, den, den.precision, batches=batch_list, seed=int(seed))
    precision = report.precision
    click.echo(report.table())
    if not report.passed:
        raise InputError(f"{model} does not match {ckpt} within the {precision} tolerance")
