"""`edm-deploy verify`: measured fidelity of an exported artifact against its checkpoint."""

from __future__ import annotations

from typing import Optional

import click

from edm_deploy.runtime.errors import InputError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--against", "ckpt", required=True, type=click.Path(dir_okay=False), help="The .pt checkpoint it came from.")
@click.option("--batches", default=None, help="Comma-separated batch sizes [default: 1, an odd size, max].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto", show_default=True, help="Where the artifact runs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the test inputs.")
def verify(model: str, ckpt: str, batches: Optional[str], device: str, seed: int) -> None:
    """Compare an .onnx or .plan with the fp32 torch model over batch sizes and noise levels.

    Prints max abs and relative L2 error per sigma band, the polygraphy comparator's verdict and
    a NaN/Inf check; exits 1 when a tolerance (fp32: rel L2 1e-5 and abs 1e-4; fp16: rel L2 1e-2)
    is exceeded.

    \b
    Examples:
      edm-deploy verify model.onnx --against ckpt.pt
      edm-deploy verify model.plan --against ckpt.pt --batches 1,7,256
    """
    from edm_deploy.export.verify import verify_artifact
    from edm_deploy.loading import load, model_kind
    from edm_deploy.training.checkpoint import load_checkpoint, load_network

    if model_kind(model) == "pt":
        raise InputError("MODEL must be an exported .onnx or .plan; --against takes the checkpoint")
    batch_list = None
    if batches:
        try:
            batch_list = [int(b) for b in batches.split(",") if b.strip()]
        except ValueError as exc:
            raise InputError(f"bad --batches {batches!r}: use e.g. 1,5,8") from exc
        if not batch_list or min(batch_list) < 1:
            raise InputError("--batches must be positive integers")
    net = load_network(load_checkpoint(ckpt))
    den = load(model, device=device)
    precision = den.manifest.get("precision", "fp32")
    report = verify_artifact(model, net, den, precision, batches=batch_list, seed=seed)
    click.echo(report.table())
    if not report.passed:
        raise InputError(f"{model} does not match {ckpt} within the {precision} tolerances")
