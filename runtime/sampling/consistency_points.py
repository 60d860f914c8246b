"""The time points of a consistency-tuned model's few-step sampler, chosen per model.

Why a search of its own: ECT's 2-step mid point (0.821) was tuned on CIFAR-10, and the best one
moves with the model (the digits prefer 2 to 4). The GITS search of `schedule_search` cannot
choose it: it matches each latent's end point to an ODE teacher, and a consistency sampler
re-noises with fresh noise at every point after the first, so no per-latent target exists; a
smaller mid point always lands closer to the one-step image and would always win. The choice
is made on the distribution instead: every candidate on a grid samples the same held-out
seeds, and the one whose feature statistics lie closest (Fréchet distance) to a reference set's
wins. The features are the caller's: Inception's for `edm-deploy schedule --solver
consistency`, an independent classifier's in the benchmarks.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..core.errors import InputError
from .solvers import CONSISTENCY_MID_SIGMA

# Candidate points below sigma_max: ECT's 0.821 and a log-spaced spread around it.
MID_GRID = (0.2, 0.4, CONSISTENCY_MID_SIGMA, 1.5, 3.0, 6.0)
MAX_NFE = 4  # C(6, 3) = 20 candidates at NFE 4 already; beyond it a grid is the wrong tool
DEFAULT_SEEDS = range(300_000, 301_000)  # held out from the seeds a run usually scores


@dataclass
class PointsChoice:
    """The chosen time points and what every candidate scored."""

    sigmas: list[float]
    nfe: int
    tried: list[dict[str, Any]] = field(default_factory=list)  # {"sigmas": [...], "fd": float}
    num_seeds: int = 0
    seconds: float = 0.0

    def metadata(self) -> dict[str, Any]:
        """What a schedule file records about the choice (`schedule_file.write_schedule`)."""
        return {"solver": "consistency", "nfe": self.nfe,
                "search": {"method": "grid, Frechet distance of features to a reference", "seeds": self.num_seeds,
                           "tried": self.tried, "seconds": round(self.seconds, 1)}}


def candidates(nfe: int, sigma_max: float, grid: Sequence[float] = MID_GRID) -> list[list[float]]:
    """Every decreasing choice of nfe - 1 grid points below sigma_max, after sigma_max itself."""
    if not 1 <= nfe <= MAX_NFE:
        raise InputError(f"consistency time points are chosen for NFE 1 to {MAX_NFE}, got {nfe}", param="nfe")
    below = sorted((float(v) for v in grid if 0 < v < sigma_max), reverse=True)
    return [[float(sigma_max), *mids] for mids in itertools.combinations(below, nfe - 1)]


def choose_consistency_points(
    den: Any,
    nfe: int,
    features: Callable[[np.ndarray], np.ndarray],
    reference: tuple[np.ndarray, np.ndarray],
    *,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    sigma_max: float = 80.0,
    grid: Sequence[float] = MID_GRID,
    batch_size: int = 250,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> PointsChoice:
    """The candidate time points whose samples' features are closest to `reference` (mu, sigma).

    `features` maps uint8 NCHW images to [N, D] features (3-channel Inception input is the
    caller's business). A class-conditional model asks for class seed mod label_dim, so every
    class is sampled alike.
    """
    from ..fid.fid_stats import FeatureStats, frechet_distance
    from .generate import generate

    start = time.perf_counter()
    sigma_max = min(float(sigma_max), float(den.sigma_max))
    options = candidates(nfe, sigma_max, grid)
    seeds = list(seeds)
    label_dim = int(getattr(den, "label_dim", 0) or 0)
    classes = [s % label_dim for s in seeds] if label_dim else None
    tried = []
    for i, sigmas in enumerate(options):
        images = generate(den, seeds, class_idx=classes, batch_size=batch_size, solver="consistency", sigmas=sigmas)
        stats = FeatureStats(int(reference[0].shape[0]))
        for b in range(0, len(images), batch_size):
            stats.update(features(np.ascontiguousarray(images[b:b + batch_size].transpose(0, 3, 1, 2))))
        tried.append({"sigmas": sigmas, "fd": float(frechet_distance(*stats.mean_cov(), *reference))})
        progress(i + 1, len(options))
    best = min(tried, key=lambda r: r["fd"])
    return PointsChoice(best["sigmas"], nfe, tried, len(seeds), time.perf_counter() - start)
