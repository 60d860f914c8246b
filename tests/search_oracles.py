"""Checks for the schedule search that only tests need: moments of one batch, and every path by brute force."""

from __future__ import annotations

import math
from itertools import combinations

from edm_deploy.runtime.sampling import schedule_search as ss


def trajectory_moments(traj: ss.Trajectories) -> ss.TrajectoryMoments:
    """The moments of one batch of teacher trajectories."""
    moments = ss.TrajectoryMoments(traj.sigmas)
    moments.add(traj)
    return moments


def brute_force_path(n: int, num_steps: int, cost, coeff: float = ss.DEFAULT_COEFF) -> tuple[list[int], float]:
    """Every path over n fine points with num_steps steps, for checking `ss.dp_path` on small grids."""
    best: tuple[list[int], float] = ([], math.inf)
    for inner in combinations(range(1, n - 1), num_steps - 1):
        path = [0, *inner, n - 1]
        total = sum(coeff**k * c for k, c in enumerate(ss.path_costs(cost, path)))
        if total < best[1]:
            best = (path, total)
    return best
