"""FID that reproduces the reference `fid.py` protocol, runnable without torch.

Pipeline: image source (PNG tree / dataset ZIP / `sample` .npz, see `fid_images`) -> batches of
uint8 NCHW RGB at native resolution -> Inception-v3 detector (ONNX on onnxruntime, or TorchScript
on torch, see `fid_detector`) -> float64 running sums -> mu, unbiased sigma -> Fréchet distance
against reference statistics (see `fid_stats`). Defaults follow the reference: 50,000 images,
seeded subset with seed 0 when a source holds more, batch 64, and an error when it holds fewer.
The paper reports the minimum over three seed ranges (0-49999, 50000-99999, 100000-149999):
`fid_min_of` scores K sets and returns every FID and the minimum.

How to run with the real detector (the Inception weights cannot be downloaded in our CI):

    # 1. once, on any machine with torch: fetch the TorchScript detector and convert it to ONNX
    #    (the .pt is downloaded into ~/.cache/edm-deploy/downloads, or $EDM_DEPLOY_CACHE)
    edm-deploy fid export-detector \\
        https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt \\
        --out inception-2015-12-05.onnx
    # 2. 150,000 images = the paper's three seed ranges
    edm-deploy sample model.onnx --seeds 0-149999 --subdirs --outdir out
    # 3. FID against the official reference statistics, min over the three ranges (no torch needed)
    edm-deploy fid calc --images out \\
        --ref https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz \\
        --detector inception-2015-12-05.onnx --min-of 3
    # or build reference statistics for your own dataset ZIP (all of its images)
    edm-deploy fid ref --data cifar10-32x32.zip --dest cifar10-32x32.npz --detector inception-2015-12-05.onnx

Without `--detector`, the TorchScript `.pt` above is downloaded and run with torch (set
`$EDM_DEPLOY_FID_DETECTOR` to make a local ONNX file the default). The reference scripts use
`inception-2015-12-05.pkl`, a pickle of the same TF graph that needs code execution to load; we
refuse pickles, and numeric identity of the `.pt` with the `.pkl` is unverified. The Inception
network costs about 5.7 GFLOP per image (at 299x299, whatever the input size), so 50,000 images
take roughly an hour on a few CPU cores; with onnxruntime-gpu (CUDA provider, used automatically
when installed) or torch on a GPU it takes a minute or two. The Fréchet distance itself takes a
few seconds on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np

from ..core.errors import InputError
from ..core.fileio import refuse_overwriting_inputs, write_target
from .fid_detector import (
    DEFAULT_DETECTOR_URL,
    FEATURE_DIM,
    Detector,
    OnnxDetector,
    TorchScriptDetector,
    load_detector,
)
from .fid_images import ImageSource, open_images, select_indices, split_blocks
from .fid_stats import (
    FeatureStats,
    check_statistics,
    frechet_distance,
    load_ref,
    save_ref,
    trace_sqrt_product,
)

DEFAULT_NUM = 50000
DEFAULT_BATCH = 64

DetectorFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class FidResult:
    """One scored image set: where it came from, how many images, and its FID."""

    label: str
    num: int
    fid: float


def _as_source(images: Union[str, ImageSource]) -> ImageSource:
    return images if isinstance(images, ImageSource) else open_images(images)


def compute_stats(
    images: Union[str, ImageSource],
    detector: DetectorFn,
    num: Optional[int] = DEFAULT_NUM,
    seed: int = 0,
    batch: int = DEFAULT_BATCH,
    indices: Optional[Sequence[int]] = None,
    progress: bool = True,
    desc: str = "FID features",
    feature_dim: Optional[int] = None,
    ref_label: str = "the reference statistics",
) -> tuple[np.ndarray, np.ndarray]:
    """Return (mu, sigma) of detector features over `num` images of `images` (None = all).

    `indices` overrides the selection (used to split one source into seed ranges). Images are
    streamed batch by batch, so memory is bounded by `batch` whatever the image count.
    `feature_dim` None takes the size of the first batch's features (a `Detector` checks 2048);
    given (the reference's size, named `ref_label` in messages), a detector of another size is
    one error after its first batch.
    """
    source = _as_source(images)
    if indices is None:
        indices = select_indices(len(source), num, seed, source=source.path)
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) < 2:
        raise InputError(f"FID needs at least 2 images, {source.path} gives {len(indices)}")
    from tqdm import tqdm

    stats: Optional[FeatureStats] = None
    with tqdm(total=len(indices), unit="img", desc=desc, disable=not progress, leave=False) as bar:
        for x in source.iter_batches(indices, batch):
            features = np.asarray(detector(x))
            if stats is None:
                if feature_dim and features.ndim == 2 and features.shape[1] != feature_dim:
                    raise InputError(feature_mismatch(ref_label, feature_dim, features.shape[1],
                                                      getattr(detector, "path", None)))
                stats = FeatureStats(feature_dim or (features.shape[-1] if features.ndim == 2 else FEATURE_DIM))
            stats.update(features)
            bar.update(x.shape[0])
    assert stats is not None  # at least 2 indices, so at least one batch
    return stats.mean_cov()


def feature_mismatch(ref_label: str, ref_dim: int, detector_dim: int, detector_path: Optional[str]) -> str:
    """The message for reference statistics and a detector of different feature sizes."""
    detector = f"the detector {detector_path}" if detector_path else "the detector"
    return (f"{ref_label}: statistics of {ref_dim}-feature vectors, but {detector} gives {detector_dim} "
            f"features; a reference must be computed with the detector that scores against it "
            f"(`edm-deploy fid ref --detector ...`)")


def check_reference_fits(mu_ref: np.ndarray, detector: DetectorFn, ref_label: str) -> None:
    """Reference statistics and a detector must agree on the feature size, checked before any image
    is scored (for detectors that state their size, as every `Detector` does)."""
    dim = getattr(detector, "feature_dim", None)
    if dim is not None and int(dim) != mu_ref.shape[0]:
        raise InputError(feature_mismatch(ref_label, mu_ref.shape[0], int(dim), getattr(detector, "path", None)))


def _ref_label(ref: Union[str, tuple], ref_label: Optional[str]) -> str:
    return ref_label or (f"the reference {ref}" if isinstance(ref, str) else "the reference statistics")


def _reference(ref: Union[str, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Reference statistics from a path/URL or a (mu, sigma) pair, checked to be a mean and a covariance."""
    if isinstance(ref, str):
        return load_ref(ref)
    mu, sigma = (np.asarray(a, dtype=np.float64) for a in ref)
    check_statistics(mu, sigma, "ref")
    return mu, sigma


def calc_fid(
    images: Union[str, ImageSource],
    ref: Union[str, tuple[np.ndarray, np.ndarray]],
    detector: DetectorFn,
    num: Optional[int] = DEFAULT_NUM,
    seed: int = 0,
    batch: int = DEFAULT_BATCH,
    progress: bool = True,
    ref_label: Optional[str] = None,
) -> float:
    """FID of `num` images against reference statistics (a path/URL to an .npz, or (mu, sigma);
    `ref_label` names them in messages)."""
    mu_r, sigma_r = _reference(ref)
    label = _ref_label(ref, ref_label)
    check_reference_fits(mu_r, detector, label)
    mu, sigma = compute_stats(images, detector, num=num, seed=seed, batch=batch, progress=progress,
                              feature_dim=mu_r.shape[0], ref_label=label)
    return frechet_distance(mu, sigma, mu_r, sigma_r)


def plan_sets(
    images: Sequence[str], min_of: Optional[int], num: int, seed: int = 0
) -> list[tuple[str, ImageSource, np.ndarray]]:
    """Decide which images form each scored set: (label, source, indices) per set.

    * one source per set (`len(images) == K`): each uses `num` images (seeded subset if more);
    * one source and `min_of` K > 1: K consecutive blocks of `num` images in sorted order, i.e. the
      seed ranges 0..num-1, num..2num-1, ... when files are named by seed as `sample` writes them.
    """
    if not images:
        raise InputError("no images given")
    k = min_of if min_of is not None else len(images)
    if k < 1:
        raise InputError(f"min_of must be at least 1, got {k}", param="min_of")
    if len(images) == k:
        sets = []
        for path in images:
            source = open_images(path)
            sets.append((path, source, select_indices(len(source), num, seed, source=path)))
        return sets
    if len(images) == 1:
        source = open_images(images[0])
        blocks = split_blocks(len(source), k, num, source=images[0])
        return [
            (f"{images[0]} [{source.describe(int(b[0]))} .. {source.describe(int(b[-1]))}]", source, b)
            for b in blocks
        ]
    raise InputError(f"min_of {k} needs either {k} image sources or one source to split, got {len(images)}", param="min_of")


def fid_min_of(
    images: Sequence[str],
    ref: Union[str, tuple[np.ndarray, np.ndarray]],
    detector: DetectorFn,
    min_of: Optional[int] = None,
    num: int = DEFAULT_NUM,
    seed: int = 0,
    batch: int = DEFAULT_BATCH,
    progress: bool = True,
    on_result: Optional[Callable[[FidResult], None]] = None,
    sets: Optional[list[tuple[str, ImageSource, np.ndarray]]] = None,
    ref_label: Optional[str] = None,
) -> tuple[list[FidResult], float]:
    """Score each image set (see `plan_sets`) against `ref`; return all results and the minimum FID.

    `sets` passes an already computed `plan_sets(...)` (then `images`, `min_of`, `num`, `seed`
    are not used), so a caller can check the input before loading the detector; `ref_label`
    names the reference in messages (a loaded (mu, sigma) pair has no name of its own).
    """
    mu_r, sigma_r = _reference(ref)
    label = _ref_label(ref, ref_label)
    check_reference_fits(mu_r, detector, label)
    if sets is None:
        sets = plan_sets(images, min_of, num, seed)  # opened and checked before any detector work
    results = []
    for i, (label, source, indices) in enumerate(sets):
        mu, sigma = compute_stats(source, detector, indices=indices, batch=batch, progress=progress,
                                  desc=f"FID set {i + 1}/{len(sets)}", feature_dim=mu_r.shape[0], ref_label=label)
        result = FidResult(label=label, num=len(indices), fid=frechet_distance(mu, sigma, mu_r, sigma_r))
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results, min(r.fid for r in results)


def check_output_file(path: str, label: str) -> None:
    """An output file path must name a file in an existing folder; checked before the work, so a
    mistake costs nothing (and never surfaces as an error about a temporary file)."""
    import os

    if os.path.isdir(path):
        raise InputError(f"{label} {path} is a folder; name the file to write")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"output folder does not exist: {folder}")


def make_ref(
    data: Union[str, ImageSource],
    dest: str,
    detector: DetectorFn,
    num: Optional[int] = None,
    seed: int = 0,
    batch: int = DEFAULT_BATCH,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Compute reference statistics of a dataset (all images by default, as the reference) and save them.

    `dest` is checked before any work: its folder must exist, it must not be a folder, and it may
    not be the image source or the detector file.
    """
    check_output_file(dest, "dest")
    dest = write_target(dest)  # a symlinked dest: its target gets the statistics, the link stays
    refuse_overwriting_inputs({"data": data if isinstance(data, str) else getattr(data, "path", None),
                               "detector": getattr(detector, "path", None)}, {"dest": dest})
    mu, sigma = compute_stats(data, detector, num=num, seed=seed, batch=batch, progress=progress,
                              desc="FID reference")
    save_ref(dest, mu, sigma)
    return mu, sigma


__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_DETECTOR_URL",
    "DEFAULT_NUM",
    "FEATURE_DIM",
    "Detector",
    "FeatureStats",
    "FidResult",
    "OnnxDetector",
    "TorchScriptDetector",
    "calc_fid",
    "check_output_file",
    "check_reference_fits",
    "check_statistics",
    "compute_stats",
    "fid_min_of",
    "frechet_distance",
    "load_detector",
    "load_ref",
    "make_ref",
    "open_images",
    "plan_sets",
    "save_ref",
    "select_indices",
    "trace_sqrt_product",
]
