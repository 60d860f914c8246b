"""Searched time steps (GITS, Chen et al., ICML 2024): the path over a fine grid a solver follows best.

Sampling trajectories of one model have nearly the same shape whatever they generate, so time
points fitted to a few hundred of them suit all, training-free: a teacher integrates them on a
fine grid (`run_teacher_search_data`), every candidate step is costed with the solver's own
update on the teacher's points (`StepCosts`, from the solver's `SearchRule`), dynamic
programming picks the path with the NFE's steps (`dp_path`), a polish lowers the solver's real
end-point error (`refine_path`), and a check compares it with EDM rho = 7 at the same NFE
(`search_schedule`). NumPy only; any denoiser of the contract.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..core import schedules as sch
from ..core.contract import as_denoiser
from ..core.errors import InputError, NumericalError, check_int
from ..core.xp import all_finite_rows, to_float64, to_host
from . import solvers as slv
from .noise import StackedRandomGenerator, draw_latents_and_labels
from .planner import sampling_sigmas

# The widest range of step weights coeff^k a path's cost may span (in decades): far beyond it, the
# weighted sum overflows a float (or all but one step's cost vanish under it).
MAX_WEIGHT_DECADES = 100

# gits-main's defaults (sample.py / launch.sh): 256 warm-up latents, iPNDM teacher on 61 points, coeff 1.15.
DEFAULT_LATENTS = 256
DEFAULT_TEACHER = "ipndm"
DEFAULT_FINE_POINTS = 61
DEFAULT_COEFF = 1.15
DEFAULT_METRIC = "l2"
FINE_RHO = 7.0
MAX_FINE_POINTS = 201
# What the teacher's data may hold in memory: its trajectories per batch (x and D at every fine
# point, float64) and the end points of all latents; a larger --latents or --batch is refused up front.
MAX_TEACHER_BYTES = 2 << 30
# A second stage evaluated off the trajectory (Heun's) is costed per pair of fine points (n (n - 1) / 2
# batches): on this many latents.
HEUN_COST_LATENTS = 32
# The polish on the solver's real error: latents it uses, and runs of the solver per step of the path.
DEFAULT_REFINE_LATENTS = 64
REFINE_EVALUATIONS_PER_STEP = 20
METRICS = ("l2", "dev")
# What the registry's entries say (`SolverSpec.search`): the solvers whose steps the search can cost,
# those that can integrate the teacher, the highest order each multistep solver takes.
SEARCHABLE_SOLVERS = tuple(name for name, spec in slv.SOLVER_REGISTRY.items() if spec.search is not None)
TEACHER_SOLVERS = tuple(name for name in SEARCHABLE_SOLVERS if slv.SOLVER_REGISTRY[name].search.teacher)
MAX_ORDERS = {name: spec.max_order for name, spec in slv.SOLVER_REGISTRY.items() if spec.max_order is not None}
STEP_MODELS = ("solver", "euler")

Progress = Optional[Callable[[str, int, int], None]]


# --------------------------------------------------------------------------------------------
# Teacher trajectories and their moments


@dataclass
class Trajectories:
    """Teacher trajectories on a fine grid: states and data predictions at every fine point.

    ``sigmas`` [n] descending and positive; ``x`` and ``denoised`` [n, B, C, H, W] float64 host
    arrays, ``denoised[m] = D(x[m]; sigmas[m])``.
    """

    sigmas: np.ndarray
    x: np.ndarray
    denoised: np.ndarray


def run_teacher(
    den: Any, latents: np.ndarray, class_labels: Optional[np.ndarray], sigmas: Sequence[float],
    teacher: str = DEFAULT_TEACHER, progress: Optional[Callable[[int], None]] = None,
) -> Trajectories:
    """Integrate one batch with ``teacher`` on ``sigmas``, recording x and D at every point.

    D at the points comes from the solver's own evaluations (its callback), so the teacher costs
    its NFE plus one evaluation at the last point. ``progress(1)`` after every step.
    """
    if teacher not in TEACHER_SOLVERS:
        raise InputError(f"teacher must be one of {', '.join(TEACHER_SOLVERS)}, got {teacher!r}", param="teacher")
    den = as_denoiser(den)
    t = np.asarray(sigmas, dtype=np.float64)
    n = t.size
    xs: list = [None] * n
    ds: list = [None] * n

    def record(info: slv.StepInfo) -> None:
        ds[info.i] = to_host(info.denoised)
        xs[info.i + 1] = to_host(info.x)
        if progress is not None:
            progress(1)

    x0 = to_float64(den.to_device(np.asarray(latents))) * float(t[0])
    xs[0] = to_host(x0)
    x_end = slv.get_solver(teacher).fn(den, x0, t, class_labels, callback=record)
    ds[n - 1] = to_host(to_float64(den(x_end, np.full(x_end.shape[0], t[-1]), class_labels)))
    if progress is not None:
        progress(1)
    traj = Trajectories(t, np.stack(xs).astype(np.float64, copy=False), np.stack(ds).astype(np.float64, copy=False))
    bad = ~(np.isfinite(traj.x).reshape(n, len(latents), -1).all(axis=(0, 2))
            & np.isfinite(traj.denoised).reshape(n, len(latents), -1).all(axis=(0, 2)))
    if bad.any():
        raise NumericalError(f"the teacher trajectories of {int(bad.sum())} latent(s) hold NaN/Inf; check the model")
    return traj


class TrajectoryMoments:
    """Batch-mean second moments of the 2n teacher vectors, accumulated batch by batch.

    Every step cost is a quadratic form in them, so the search needs no per-latent work after
    the teacher has run, whatever the image size, and its memory does not grow with the latents.

    Vector index a: x_m is a = m, D_m is a = n + m. ``gram[a, b]`` is the mean over latents of
    <V_a, V_b>; ``perpendicular[a, b]`` subtracts the mean of (V_a . u)(V_b . u), u the unit
    vector along each trajectory's chord x_0 - x_last: the Gram matrix of the components
    perpendicular to the chord (gits-main's deviation).
    """

    def __init__(self, sigmas: Sequence[float]):
        self.sigmas = np.asarray(sigmas, dtype=np.float64)
        n = self.sigmas.size
        self._gram = np.zeros((2 * n, 2 * n))
        self._chord = np.zeros((2 * n, 2 * n))
        self.count = 0

    @property
    def n(self) -> int:
        return int(self.sigmas.size)

    def add(self, traj: Trajectories, chunk: int = 16) -> None:
        if traj.x.shape[0] != self.n or not np.array_equal(traj.sigmas, self.sigmas):
            raise InputError("trajectories on another fine grid cannot be added to these moments")
        batch = traj.x.shape[1]
        for start in range(0, batch, chunk):
            v = np.concatenate([traj.x[:, start:start + chunk], traj.denoised[:, start:start + chunk]])
            v = v.reshape(2 * self.n, v.shape[1], -1).transpose(1, 0, 2)  # [b, 2n, dim]
            self._gram += np.einsum("bad,bcd->ac", v, v)
            chord = v[:, 0] - v[:, self.n - 1]
            norm = np.linalg.norm(chord, axis=1, keepdims=True)
            u = chord / np.where(norm > 0, norm, 1.0)
            p = np.einsum("bad,bd->ba", v, u)
            self._chord += p.T @ p
        self.count += batch

    @property
    def gram(self) -> np.ndarray:
        return self._gram / max(self.count, 1)

    @property
    def perpendicular(self) -> np.ndarray:
        return (self._gram - self._chord) / max(self.count, 1)


# --------------------------------------------------------------------------------------------
# A student step as a linear combination of teacher vectors, for many transitions at once


class _Lin:
    """sum_t coef_t * V[index_t], elementwise over T transitions (index and coef are [T] arrays)."""

    __slots__ = ("terms",)
    __array_ufunc__ = None  # numpy array * _Lin defers to _Lin.__rmul__

    def __init__(self, terms):
        self.terms = terms

    def __add__(self, other: _Lin) -> _Lin:
        return _Lin(self.terms + other.terms)

    def __sub__(self, other: _Lin) -> _Lin:
        return self + other * -1.0

    def __mul__(self, c) -> _Lin:
        return _Lin([(i, a * c) for i, a in self.terms])

    __rmul__ = __mul__

    def __truediv__(self, c) -> _Lin:
        return self * (1.0 / c)

    def quadratic(self, matrix: np.ndarray) -> np.ndarray:
        """sum_ab c_a c_b M[i_a, i_b] per transition, terms on the same index array merged first."""
        merged: dict[int, list] = {}
        for idx, coef in self.terms:
            entry = merged.setdefault(id(idx), [idx, 0.0])
            entry[1] = entry[1] + coef
        items = list(merged.values())
        out = 0.0
        for a, (ia, ca) in enumerate(items):
            out = out + ca * ca * matrix[ia, ia]
            for ib, cb in items[a + 1:]:
                out = out + 2.0 * ca * cb * matrix[ia, ib]
        return np.asarray(out, dtype=np.float64)


@dataclass
class _Nodes:
    """Fine-grid indices of one batch of transitions: from i to j, history h, g, f (newest first)."""

    i: np.ndarray
    j: np.ndarray
    h: Optional[np.ndarray] = None
    g: Optional[np.ndarray] = None
    f: Optional[np.ndarray] = None


class _StepBuilder:
    """The student's x_j for a batch of transitions, written like the solvers in `solvers.py`."""

    def __init__(self, sigmas: np.ndarray, afs: bool):
        self.s = sigmas
        self.n = sigmas.size
        self.afs = afs
        s0 = float(sigmas[0])
        self.afs_slope = 1.0 / math.sqrt(1 + s0 * s0)  # AFS: d = x / sqrt(1 + sigma^2) at the first point
        self._index: dict = {}

    def _ix(self, nodes: np.ndarray, offset: int) -> np.ndarray:
        key = (id(nodes), offset)
        if key not in self._index:
            self._index[key] = (nodes, nodes + offset)  # keep nodes alive so the id stays unique
        return self._index[key][1]

    def X(self, m: np.ndarray) -> _Lin:
        return _Lin([(self._ix(m, 0), np.ones(m.shape))])

    def d(self, m: np.ndarray) -> _Lin:
        """The slope at fine point m: (x_m - D_m) / sigma_m, or AFS's at point 0."""
        inv = 1.0 / self.s[m]
        if self.afs:
            first = m == 0
            return _Lin([(self._ix(m, 0), np.where(first, self.afs_slope, inv)),
                         (self._ix(m, self.n), np.where(first, 0.0, -inv))])
        return _Lin([(self._ix(m, 0), inv), (self._ix(m, self.n), -inv)])

    def D(self, m: np.ndarray) -> _Lin:
        """The data prediction at fine point m, or AFS's x - sigma d at point 0."""
        if self.afs:
            first = m == 0
            s0 = float(self.s[0])
            return _Lin([(self._ix(m, 0), np.where(first, 1.0 - s0 * self.afs_slope, 0.0)),
                         (self._ix(m, self.n), np.where(first, 0.0, 1.0))])
        return _Lin([(self._ix(m, self.n), np.ones(m.shape))])

    def view(self, nd: _Nodes) -> _StepView:
        return _StepView(self, nd)


class _StepView:
    """`solvers.StepView` of a batch of transitions: the path's points as linear forms of teacher vectors."""

    def __init__(self, builder: _StepBuilder, nd: _Nodes):
        self._builder, self._points, self._j = builder, (nd.i, nd.h, nd.g, nd.f), nd.j
        self.x = builder.X(nd.i)
        self.sigma_next = builder.s[nd.j]

    @property
    def denoised_next(self) -> _Lin:
        return self._builder.D(self._j)

    def sigma(self, k: int) -> np.ndarray:
        return self._builder.s[self._points[k]]

    def slope(self, k: int) -> _Lin:
        return self._builder.d(self._points[k])

    def denoised(self, k: int) -> _Lin:
        return self._builder.D(self._points[k])


# --------------------------------------------------------------------------------------------
# Step costs and the dynamic programme


_EULER_STEP = slv.get_solver("euler").search.step


class StepCosts:
    """cost(k, nodes): the deviation of step k (of num_steps) for a batch of transitions.

    A student step from fine point i to j starts on the teacher's trajectory, x_i, with the
    history a multistep solver carries taken from the teacher at the path's earlier points (what
    it would hold had it been exact so far) and the order its rules give step k; its cost is the
    deviation from the teacher's x_j, the solver's local error on that path. Built from teacher
    moments with the solver's own update (`SolverSpec.search`), for every solver but one whose
    second stage is evaluated (Heun): its pair costs come from the network
    (`second_stage_pair_costs`) as an [n, n] matrix ``pair_costs``. ``step`` "solver" costs the
    solver's own update (and AFS at the first point when ``afs``), "euler" one Euler step along
    the teacher's slope, as gits-main costs every solver.

    ``metric`` "l2": the root mean square over latents of ||x_j^student - x_j||; "dev"
    (gits-main's default): the deviation of the point from the chord joining each trajectory's
    ends, minus the teacher's at j, root mean squares where gits-main averages norms (so costs
    are quadratic forms in `TrajectoryMoments`). ``unipc_corrector``: cost UniPC's corrected step
    with the teacher's D_j as its corrector's evaluation. Off by default: with it the corrected
    step is nearly exact however long it is and the search picks absurd first steps (80 -> 55 ->
    0.26 on a digits model), while the predictor's error is what every later step sees.
    """

    def __init__(self, moments: TrajectoryMoments, solver: str, num_steps: int, *, metric: str = DEFAULT_METRIC,
                 step: str = "solver", afs: bool = False, max_order: Optional[int] = None,
                 pair_costs: Optional[np.ndarray] = None, unipc_corrector: bool = False):
        self.moments, self.solver, self.num_steps = moments, solver, int(num_steps)
        self.metric, self.step_model, self.afs = metric, step, bool(afs) and step == "solver"
        self.rule = slv.get_solver(solver).search
        if self.rule is None:
            raise InputError(f"the {solver} solver's steps cannot be costed (it integrates no ODE)", param="solver")
        if step == "solver" and self.rule.step is None and pair_costs is None:
            raise InputError(f"the {solver} solver's step is not costed from the teacher alone: give its pair costs",
                             param="solver")
        self.max_order = MAX_ORDERS.get(solver, 1) if max_order is None else int(max_order)
        self.pair_costs = pair_costs
        self.unipc_corrector = bool(unipc_corrector)
        n = moments.n
        self.n = n
        self.gram = moments.gram
        self.perp = moments.perpendicular
        if metric == "dev":
            m = np.arange(n)
            lin = _Lin([(m, np.ones(n)), (np.full(n, n - 1), -np.ones(n))])
            self.teacher_dev = np.sqrt(np.maximum(lin.quadratic(self.perp), 0.0))
            self.teacher_dev[n - 1] = 0.0

    def __call__(self, k: int, nd: _Nodes) -> np.ndarray:
        if self.pair_costs is not None:
            return self.pair_costs[nd.i, nd.j]
        builder = _StepBuilder(self.moments.sigmas, self.afs)
        if self.step_model == "euler":
            student = _EULER_STEP(builder.view(nd), 1, False)
        else:
            order, corrector = self.rule.orders(k, self.num_steps, self.max_order)
            student = self.rule.step(builder.view(nd), order, corrector and self.unipc_corrector)
        if self.metric == "l2":
            return np.sqrt(np.maximum((student - builder.X(nd.j)).quadratic(self.gram), 0.0))
        end = np.full(nd.j.shape, self.n - 1)
        dev = np.sqrt(np.maximum((student - builder.X(end)).quadratic(self.perp), 0.0))
        return dev - self.teacher_dev[nd.j]


def second_stage_pair_costs(den: Any, traj: Trajectories, class_labels: Optional[np.ndarray],
                            second_stage: Callable[..., slv.Program], metric: str = DEFAULT_METRIC,
                            batch_size: int = 256, progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """[n, n] sums over this batch of squared deviations of one step i -> j (i < j), evaluated.

    ``second_stage(x_i, h, d_i, sigma_j)`` (`SearchRule.second_stage`, Heun's) evaluates D off
    the teacher's trajectory, e.g. at x_i + (sigma_j - sigma_i) d_i, so each pair costs its
    evaluations per latent. Entry [i, j] holds the sum over latents of ||x_hat - x_j||^2 (metric
    l2) or of the squared chord deviation of x_hat (metric dev); the caller divides by the number
    of latents and takes the root. ``progress(1)`` per target j.
    """
    den = as_denoiser(den)
    t = traj.sigmas
    n, batch = t.size, traj.x.shape[1]
    out = np.zeros((n, n))
    flat = lambda a: a.reshape(a.shape[0], -1)  # noqa: E731
    chord = flat(traj.x[0]) - flat(traj.x[n - 1])
    u = chord / np.maximum(np.linalg.norm(chord, axis=1, keepdims=True), 1e-300)
    for j in range(1, n):
        rows = [(i, r) for i in range(j) for r in range(batch)]
        for start in range(0, len(rows), batch_size):
            part = rows[start:start + batch_size]
            ii = np.array([i for i, _ in part])
            rr = np.array([r for _, r in part])
            x_i = traj.x[ii, rr]
            d_i = (x_i - traj.denoised[ii, rr]) / t[ii].reshape(-1, *([1] * (x_i.ndim - 1)))
            h = (t[j] - t[ii]).reshape(-1, *([1] * (x_i.ndim - 1)))
            labels = None if class_labels is None else class_labels[rr]
            x_hat = _run_on_host(den, second_stage(x_i, h, d_i, t[j]), labels)
            if metric == "l2":
                sq = np.square(flat(x_hat - traj.x[j, rr])).sum(axis=1)
            else:
                e = flat(x_hat) - flat(traj.x[n - 1, rr])
                sq = np.square(e).sum(axis=1) - np.square((e * u[rr]).sum(axis=1))
            np.add.at(out, (ii, np.full(len(part), j)), sq)
        if progress is not None:
            progress(1)
    return out


def _run_on_host(den: Any, program: slv.Program, class_labels: Optional[np.ndarray]) -> np.ndarray:
    """`solvers.run_program` for host states: each evaluation moved to the model's device and back."""
    try:
        x, sigma = next(program)
        while True:
            d = den(den.to_device(x), np.full(x.shape[0], sigma), class_labels)
            x, sigma = program.send(to_host(to_float64(d)))
    except StopIteration as finished:
        return finished.value


def _heun_cost_matrix(sums: np.ndarray, count: int, moments: TrajectoryMoments, metric: str) -> np.ndarray:
    costs = np.sqrt(np.maximum(sums / max(count, 1), 0.0))
    if metric == "dev":
        n = moments.n
        m = np.arange(n)
        lin = _Lin([(m, np.ones(n)), (np.full(n, n - 1), -np.ones(n))])
        costs = costs - np.sqrt(np.maximum(lin.quadratic(moments.perpendicular), 0.0))[None, :]
    return costs


def dp_path(n: int, num_steps: int, cost: Callable[[int, _Nodes], np.ndarray], coeff: float = DEFAULT_COEFF
            ) -> tuple[list[int], float]:
    """The path 0 = p_0 < ... < p_K = n - 1 (K = num_steps) minimising sum_k coeff^k cost(k, step k).

    ``coeff`` > 1 (gits-main's 1.15) weighs later, low-noise steps more: their errors are the
    ones left in the image. A step of order q needs the path's last q points, so the states are
    pairs (p_{k-1}, p_k): the newest history entry (all of order 2) is exact, older ones (orders
    3, 4) are read from each state's cheapest path, the usual way of carrying a longer history
    through a Viterbi-style programme (an exact state of four points would be C(61, 4) = 521k
    states against 1830 pairs). The cost reported is still exact for the path returned, whose
    history is the one its steps were costed with. Returns (path, its weighted cost). Ties go to
    the smaller previous point.
    """
    K, last = int(num_steps), n - 1
    if not 1 <= K <= last:
        raise InputError(f"a path of {K} steps over {n} fine points is impossible (1 <= steps <= {last})",
                         param="nfe")
    if K == 1:
        c = cost(0, _Nodes(i=np.zeros(1, dtype=np.int64), j=np.array([last])))
        return [0, last], float(c[0])
    js = np.arange(1, n - K + 1)
    V = np.full((n, n), np.inf)
    V[0, js] = cost(0, _Nodes(i=np.zeros(js.size, dtype=np.int64), j=js))
    back: list = [None, None]  # back[k][p_{k-1}, p_k] = p_{k-2}
    for k in range(1, K):
        h, i = np.nonzero(np.isfinite(V))
        if k == K - 1:
            j = np.full(i.size, last)
        else:
            counts = np.maximum(n - K + k - i, 0)
            h, i = np.repeat(h, counts), np.repeat(i, counts)
            offsets = np.arange(i.size) - np.repeat(np.cumsum(counts) - counts, counts)
            j = i + 1 + offsets
        g = back[k][h, i] if k >= 2 else None
        f = back[k - 1][g, h] if k >= 3 else None
        c = cost(k, _Nodes(i=i, j=j, h=h, g=g, f=f))
        total = V[h, i] + coeff**k * c
        order = np.lexsort((h, total, j, i))
        i_s, j_s, h_s, t_s = i[order], j[order], h[order], total[order]
        first = np.ones(i_s.size, dtype=bool)
        first[1:] = (i_s[1:] != i_s[:-1]) | (j_s[1:] != j_s[:-1])
        V = np.full((n, n), np.inf)
        V[i_s[first], j_s[first]] = t_s[first]
        bp = np.full((n, n), -1, dtype=np.int64)
        bp[i_s[first], j_s[first]] = h_s[first]
        back.append(bp)
    column = V[:, last]
    if not np.isfinite(column).any():
        raise NumericalError("every path's cost is NaN/Inf; check the teacher trajectories")
    p = int(np.nanargmin(np.where(np.isfinite(column), column, np.inf)))
    path = [last, p]
    for k in range(K, 1, -1):
        path.append(int(back[k][path[-1], path[-2]]))
    return path[::-1], float(column[p])


def path_costs(cost: Callable[[int, _Nodes], np.ndarray], path: Sequence[int]) -> list[float]:
    """The cost of every step of ``path`` (fine indices), each with the path's own history."""
    p = [int(v) for v in path]
    out = []
    for k in range(len(p) - 1):
        h, g, f = (np.array([p[k - back]]) if k - back >= 0 else None for back in (1, 2, 3))
        out.append(float(cost(k, _Nodes(i=np.array([p[k]]), j=np.array([p[k + 1]]), h=h, g=g, f=f))[0]))
    return out


# --------------------------------------------------------------------------------------------
# The search


@dataclass
class ScheduleSearch:
    """What `search_schedule` found and how."""

    sigmas: np.ndarray               # the time points the solver visits (a final 0 where it ends at 0)
    solver: str
    nfe: int
    path: list[int]                  # indices into fine_sigmas
    fine_sigmas: np.ndarray
    cost: float                      # sum_k coeff^k cost_k of the path
    step_costs: list[float]
    settings: dict[str, Any]
    check: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        """The schedule file's fields besides the sigmas (`schedule_file.write_schedule`)."""
        return {
            "solver": self.solver,
            "nfe": self.nfe,
            "afs": self.settings["afs"],
            "denoise_to_zero": self.settings["denoise_to_zero"],
            "max_order": self.settings["max_order"],
            "search": {
                "method": "GITS (Chen et al., ICML 2024): teacher trajectories on a fine grid, step costs, dynamic programming",
                **{k: v for k, v in self.settings.items() if k not in ("afs", "denoise_to_zero", "max_order")},
                "fine_sigma_max": float(self.fine_sigmas[0]),
                "fine_sigma_min": float(self.fine_sigmas[-1]),
                "path": self.path,
                "cost": self.cost,
                "step_costs": self.step_costs,
                "check": self.check,
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
            },
        }


def plan_search(solver: str, nfe: int, *, afs: bool = False, denoise_to_zero: bool = False,
                max_order: Optional[int] = None, fine_points: int = DEFAULT_FINE_POINTS, teacher: str = DEFAULT_TEACHER,
                coeff: float = DEFAULT_COEFF, metric: str = DEFAULT_METRIC, step: str = "solver") -> dict[str, Any]:
    """Check every search setting (no model needed); returns them with the derived N and K."""
    spec = slv.check_solver_options(solver, {"max_order": max_order} if max_order is not None else None,
                                    afs=afs, denoise_to_zero=denoise_to_zero)
    if solver not in SEARCHABLE_SOLVERS:
        raise InputError(f"the {solver} solver's schedule cannot be searched (it integrates no ODE); choose one of "
                         f"{', '.join(SEARCHABLE_SOLVERS)}", param="solver")
    if max_order is not None:
        max_order = check_int(max_order, "max_order", 1, MAX_ORDERS[solver])
    fine_points = check_int(fine_points, "fine_points", 3, MAX_FINE_POINTS)
    num_points = slv.steps_for_nfe(solver, nfe, afs=afs, denoise_to_zero=denoise_to_zero)
    num_steps = num_points - 1
    if num_steps < 1:
        raise InputError(f"nfe {nfe} of the {solver} solver is a single time point: nothing to search "
                         f"(its NFE is {spec.nfe_formula} for N time points; the search needs N >= 2)", param="nfe")
    if num_steps > fine_points - 1:
        advice = (f"use a smaller NFE or more than {num_steps} fine points" if num_steps < MAX_FINE_POINTS else
                  f"the fine grid has at most {MAX_FINE_POINTS} points, so a searched schedule has at most "
                  f"{MAX_FINE_POINTS - 1} steps: use a smaller NFE (a schedule this long gains nothing from a search)")
        raise InputError(f"nfe {nfe} of the {solver} solver takes {num_steps} steps, more than the {fine_points - 1} "
                         f"intervals of the {fine_points}-point fine grid: {advice}", param="nfe")
    if teacher not in TEACHER_SOLVERS:
        raise InputError(f"teacher must be one of {', '.join(TEACHER_SOLVERS)}, got {teacher!r}", param="teacher")
    if isinstance(coeff, bool) or not isinstance(coeff, (int, float, np.floating)) or not (math.isfinite(coeff) and coeff > 0):
        raise InputError(f"coeff must be a finite number > 0, got {coeff!r}", param="coeff")
    decades = (num_steps - 1) * abs(math.log10(coeff))  # the path's weights run from 1 to coeff^(K-1)
    if decades > MAX_WEIGHT_DECADES:
        most = 10 ** (MAX_WEIGHT_DECADES / (num_steps - 1))
        raise InputError(f"coeff {coeff:g}: the step weights coeff^k of {num_steps} steps span a factor 1e{decades:.0f}, "
                         f"beyond the 1e{MAX_WEIGHT_DECADES} a path's cost can hold; use a coeff from {1 / most:.3g} "
                         f"to {most:.3g} (GITS: {DEFAULT_COEFF})", param="coeff")
    if metric not in METRICS:
        raise InputError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}", param="metric")
    if step not in STEP_MODELS:
        raise InputError(f"step must be one of {', '.join(STEP_MODELS)}, got {step!r}", param="step")
    return dict(solver=solver, nfe=int(nfe), afs=bool(afs), denoise_to_zero=bool(denoise_to_zero),
                max_order=max_order if max_order is not None else MAX_ORDERS.get(solver),
                fine_points=fine_points, teacher=teacher, coeff=float(coeff), metric=metric, step=step,
                num_points=num_points, num_steps=num_steps, appends_zero=spec.appends_zero)


def model_warnings(den: Any) -> list[str]:
    """Why a search on this model gives a poor schedule: a consistency-tuned model no longer
    predicts the denoiser whose ODE the teacher integrates and the searched solver steps."""
    if not getattr(den, "consistency_tuned", False):
        return []
    return ["this model is consistency-tuned: it no longer predicts the denoiser an ODE solver integrates, so the "
            "teacher's trajectories and a schedule searched on them are poor; sample it with `sample --solver "
            "consistency --nfe 1` (or 2), or choose its time points with `schedule --solver consistency --ref REF`"]


def fine_grid(den: Any, fine_points: int = DEFAULT_FINE_POINTS, sigma_min: Optional[float] = None,
              sigma_max: Optional[float] = None) -> np.ndarray:
    """The teacher's grid: EDM rho = 7 over [sigma_min, sigma_max] (the model's range), rounded by the model."""
    return sampling_sigmas(den, "ipndm", num_steps=fine_points, schedule="edm", sigma_min=sigma_min,
                           sigma_max=sigma_max, rho=FINE_RHO)


def _end_error(den, spec, latents, labels, sigmas, x_end, options, batch_size) -> float:
    """RMS over latents of ||solver(sigmas) - teacher end|| at sigma_min."""
    total, count = 0.0, 0
    for start in range(0, len(latents), batch_size):
        lat = latents[start:start + batch_size]
        lab = None if labels is None else labels[start:start + batch_size]
        x0 = to_float64(den.to_device(lat)) * float(sigmas[0])
        out = to_host(spec.fn(den, x0, sigmas, lab, **options))
        if not all_finite_rows(out).all():
            return math.inf
        total += float(np.square(out - x_end[start:start + batch_size]).reshape(len(lat), -1).sum())
        count += len(lat)
    return math.sqrt(total / count)


def refine_path(
    error: Callable[[list[int]], float], path: Sequence[int], max_evaluations: int = 200,
    progress: Optional[Callable[[int, int], None]] = None,
) -> tuple[list[int], float, float, int]:
    """Coordinate descent on a path's true error: move one inner point by one fine index while that helps.

    The programme minimises a sum of local errors, a proxy; this polishes the path on what
    matters, the error the solver's run ends with.

    ``error(path)`` is the solver's end-point error run on that path. Sweeps over the inner points
    (each tried one index down and one up, a move kept as soon as it lowers the error) until a
    sweep changes nothing or ``max_evaluations`` runs are spent. Returns (path, its error, the
    starting path's error, evaluations).
    """
    path = [int(v) for v in path]
    start = best = error(path)
    evaluations = 1
    improved = True
    while improved and evaluations < max_evaluations:
        improved = False
        for k in range(1, len(path) - 1):
            for delta in (-1, 1):
                candidate = list(path)
                candidate[k] += delta
                if not candidate[k - 1] < candidate[k] < candidate[k + 1] or evaluations >= max_evaluations:
                    continue
                value = error(candidate)
                evaluations += 1
                if progress is not None:
                    progress(evaluations, max_evaluations)
                if value < best:
                    best, path, improved = value, candidate, True
    return path, best, start, evaluations


@dataclass
class TeacherRun:
    """The teacher's work, reusable by several searches (other solvers, other NFEs) of one model.

    ``moments`` of all latents' trajectories; the latents, labels and end states for the check;
    the full trajectories of the first `HEUN_COST_LATENTS` latents, which Heun's evaluated
    pair costs need.
    """

    fine_sigmas: np.ndarray
    moments: TrajectoryMoments
    latents: np.ndarray
    labels: Optional[np.ndarray]
    ends: np.ndarray
    head: Trajectories
    teacher: str
    seeds: list[int]
    class_idx: Optional[int]
    seconds: float
    nfe_per_latent: int


def run_teacher_search_data(
    den: Any,
    *,
    seeds: Optional[Sequence[int]] = None,
    num_latents: int = DEFAULT_LATENTS,
    class_idx: Optional[int] = None,
    teacher: str = DEFAULT_TEACHER,
    fine_points: int = DEFAULT_FINE_POINTS,
    sigma_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
    batch_size: int = 256,
    progress: Progress = None,
) -> TeacherRun:
    """Step 1 of the search: the teacher integrates the latents of ``seeds`` on the fine grid.

    Latents (and labels of a class-conditional model; ``class_idx`` fixes them) are drawn per
    seed as `sample` draws them; ``seeds`` defaults to 0 .. num_latents - 1.
    """
    if teacher not in TEACHER_SOLVERS:
        raise InputError(f"teacher must be one of {', '.join(TEACHER_SOLVERS)}, got {teacher!r}", param="teacher")
    fine_points = check_int(fine_points, "fine_points", 3, MAX_FINE_POINTS)
    batch_size = check_int(batch_size, "batch_size", lo=1)
    den = as_denoiser(den)
    if seeds is None:
        seeds = list(range(check_int(num_latents, "num_latents", lo=1)))
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise InputError("no seeds given", param="seeds")
    fine = fine_grid(den, fine_points, sigma_min, sigma_max)
    n = fine.size
    _check_teacher_memory(len(seeds), batch_size, n, den.img_channels * den.img_resolution**2)
    report = progress or (lambda stage, done, total: None)
    start = time.perf_counter()
    moments = TrajectoryMoments(fine)
    img_shape = (den.img_channels, den.img_resolution, den.img_resolution)
    latents_all, labels_all, ends, heads = [], [], [], []
    batches = [seeds[b:b + batch_size] for b in range(0, len(seeds), batch_size)]
    done, total = 0, len(batches) * n
    report("teacher", 0, total)

    def tick(k: int) -> None:
        nonlocal done
        done += k
        report("teacher", done, total)

    kept = 0
    for batch in batches:
        latents, labels = draw_latents_and_labels(StackedRandomGenerator(batch), img_shape, int(den.label_dim), class_idx)
        traj = run_teacher(den, latents, labels, fine, teacher, progress=tick)
        moments.add(traj)
        latents_all.append(latents)
        labels_all.append(labels)
        ends.append(traj.x[-1])
        if kept < HEUN_COST_LATENTS:
            take = min(HEUN_COST_LATENTS - kept, len(batch))
            heads.append((traj.x[:, :take].copy(), traj.denoised[:, :take].copy()))
            kept += take
        del traj
    head = Trajectories(fine, np.concatenate([h[0] for h in heads], axis=1), np.concatenate([h[1] for h in heads], axis=1))
    return TeacherRun(
        fine_sigmas=fine, moments=moments, latents=np.concatenate(latents_all),
        labels=None if labels_all[0] is None else np.concatenate(labels_all), ends=np.concatenate(ends), head=head,
        teacher=teacher, seeds=seeds, class_idx=class_idx, seconds=time.perf_counter() - start,
        nfe_per_latent=slv.get_solver(teacher).nfe_for_sigmas(fine) + 1)


def _check_teacher_memory(num_latents: int, batch_size: int, fine_points: int, pixels: int) -> None:
    """The teacher's arrays, sized before anything is drawn: one batch's trajectories, every latent's end."""
    row = 8 * pixels  # one float64 image
    per_batch = 2 * fine_points * min(batch_size, num_latents) * row
    ends = num_latents * (row + 4 * pixels)  # end states and float32 latents
    if per_batch + ends > MAX_TEACHER_BYTES:
        fit_batch = max(1, (MAX_TEACHER_BYTES - ends) // (2 * fine_points * row))
        fit_latents = MAX_TEACHER_BYTES // (2 * fine_points * row + 12 * pixels)
        what = (f"batch_size {batch_size} (at most {fit_batch} fit)" if ends < MAX_TEACHER_BYTES // 2
                else f"num_latents {num_latents} (at most {fit_latents} fit)")
        raise InputError(f"the teacher would hold {(per_batch + ends) / 2**30:.1f} GiB of trajectories, more than "
                         f"{MAX_TEACHER_BYTES / 2**30:.0f} GiB: lower {what}",
                         param="batch_size" if ends < MAX_TEACHER_BYTES // 2 else "num_latents")


def search_schedule(
    den: Any,
    solver: str = "ipndm",
    nfe: int = 5,
    *,
    teacher_run: Optional[TeacherRun] = None,
    seeds: Optional[Sequence[int]] = None,
    num_latents: int = DEFAULT_LATENTS,
    class_idx: Optional[int] = None,
    afs: bool = False,
    denoise_to_zero: bool = False,
    max_order: Optional[int] = None,
    teacher: str = DEFAULT_TEACHER,
    fine_points: int = DEFAULT_FINE_POINTS,
    coeff: float = DEFAULT_COEFF,
    metric: str = DEFAULT_METRIC,
    step: str = "solver",
    sigma_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
    batch_size: int = 256,
    refine_latents: int = DEFAULT_REFINE_LATENTS,
    check: bool = True,
    progress: Progress = None,
) -> ScheduleSearch:
    """GITS-style search of the time points for ``solver`` at exactly ``nfe`` network evaluations.

    Latents (and, for a class-conditional model, labels; ``class_idx`` fixes them) come from
    ``seeds`` (default 0 .. num_latents - 1) as `sample` draws them. ``teacher`` integrates
    them on ``fine_points`` EDM rho = 7 points over [sigma_min, sigma_max] (default the model's
    range clamped to EDM's 0.002 .. 80); the student's steps are costed with ``metric`` (l2 or
    dev) using the solver's own update (``step="solver"``) or, as gits-main does, an Euler step
    (``step="euler"``); the path of the NFE's steps minimising sum_k coeff^k cost_k is chosen by
    dynamic programming. ``afs``, ``denoise_to_zero`` and ``max_order`` are the solver's options
    the schedule is meant to be sampled with. ``refine_latents`` (at most half the latents; 0:
    off) polishes the path by `refine_path` on the solver's real end-point error against the
    teacher on that many latents. ``check`` runs the solver on the result and on the EDM
    rho = 7 schedule of the same NFE against the teacher's end points, on the latents the
    refinement did not use.

    ``teacher_run`` (from `run_teacher_search_data`) reuses a teacher for several searches; the
    teacher settings (seeds, num_latents, class_idx, teacher, fine_points, sigma_min,
    sigma_max) must then be left unset. ``progress(stage, done, total)`` is called as work
    advances (stages 'teacher', 'heun costs', 'search', 'refine', 'check'). Every setting is checked
    before any network call.
    """
    if teacher_run is not None:
        _check_reuse(teacher_run, seeds, class_idx, sigma_min, sigma_max, num_latents, teacher, fine_points)
        teacher, fine_points = teacher_run.teacher, int(teacher_run.fine_sigmas.size)
    settings = plan_search(solver, nfe, afs=afs, denoise_to_zero=denoise_to_zero, max_order=max_order,
                           fine_points=fine_points, teacher=teacher, coeff=coeff, metric=metric, step=step)
    batch_size = check_int(batch_size, "batch_size", lo=1)
    refine_latents = check_int(refine_latents, "refine_latents", lo=0)
    den = as_denoiser(den)
    if teacher_run is None:  # 1. the teacher's trajectories on the fine grid
        teacher_run = run_teacher_search_data(
            den, seeds=seeds, num_latents=num_latents, class_idx=class_idx, teacher=teacher, fine_points=fine_points,
            sigma_min=sigma_min, sigma_max=sigma_max, batch_size=batch_size, progress=progress)
    fine = teacher_run.fine_sigmas
    if settings["num_steps"] > fine.size - 1:
        raise InputError(f"nfe {nfe} of the {solver} solver takes {settings['num_steps']} steps, more than the "
                         f"{fine.size - 1} intervals of the teacher's {fine.size}-point fine grid", param="nfe")
    spec = slv.get_solver(solver)
    options = _solver_options(spec, settings)
    report = progress or (lambda stage, done, total: None)
    seconds: dict[str, float] = {"teacher": teacher_run.seconds}

    start = time.perf_counter()  # 2. step costs and the dynamic programme
    cost = _step_costs(den, teacher_run, settings, batch_size, report)
    report("search", 0, 1)
    path, total_cost = dp_path(fine.size, settings["num_steps"], cost, settings["coeff"])
    report("search", 1, 1)
    seconds["search"] = time.perf_counter() - start

    start = time.perf_counter()  # 3. the polish on the solver's real end-point error
    path, refined, held_out = _polish(den, spec, teacher_run, path, options, refine_latents, settings["num_steps"],
                                      batch_size, report)
    if refined:
        seconds["refine"] = time.perf_counter() - start
    step_costs = path_costs(cost, path)
    if refined:
        total_cost = float(sum(settings["coeff"] ** k * c for k, c in enumerate(step_costs)))
    levels = fine[path]
    sigmas = np.append(levels, 0.0) if (settings["appends_zero"] or denoise_to_zero) else levels.copy()
    if spec.nfe_for_sigmas(sigmas, afs=afs) != settings["nfe"]:  # pragma: no cover - a bug if it happens
        raise AssertionError(f"searched schedule spends {spec.nfe_for_sigmas(sigmas, afs=afs)} NFE, not {nfe}")

    result_check: dict[str, Any] = {}
    if check:  # 4. what it bought: the solver on the searched and on the EDM schedule, against the teacher
        start = time.perf_counter()
        result_check = _check_against_edm(den, spec, teacher_run, levels, settings, options, held_out, bool(refined),
                                          batch_size, report)
        seconds["check"] = time.perf_counter() - start
    return ScheduleSearch(sigmas=sigmas, solver=solver, nfe=settings["nfe"], path=path, fine_sigmas=fine,
                          cost=total_cost, step_costs=step_costs,
                          settings=_settings_record(teacher_run, settings, spec, metric, step, refined),
                          check=result_check, seconds=seconds)


def _check_reuse(teacher_run: TeacherRun, seeds, class_idx, sigma_min, sigma_max, num_latents, teacher,
                 fine_points) -> None:
    """With a teacher that has run, the teacher's own settings must be left unset."""
    conflicts = [name for name, value in (("seeds", seeds), ("class_idx", class_idx), ("sigma_min", sigma_min),
                                          ("sigma_max", sigma_max)) if value is not None]
    conflicts += [name for name, value, default in (("num_latents", num_latents, DEFAULT_LATENTS),
                                                    ("teacher", teacher, DEFAULT_TEACHER),
                                                    ("fine_points", fine_points, DEFAULT_FINE_POINTS))
                  if value != default]
    if conflicts:
        raise InputError(f"{conflicts[0]} does not apply with teacher_run (the teacher has run already)",
                         param=conflicts[0])


def _solver_options(spec: slv.SolverSpec, settings: dict) -> dict[str, Any]:
    """The options the solver runs with in the polish and the check."""
    options: dict[str, Any] = {}
    if settings["max_order"] is not None and "max_order" in spec.options:
        options["max_order"] = settings["max_order"]
    if settings["afs"]:
        options["afs"] = True
    return options


def _step_costs(den: Any, teacher_run: TeacherRun, settings: dict, batch_size: int, report) -> StepCosts:
    """Every step's cost: linear forms of the teacher's moments, Heun's second stage evaluated."""
    solver, step, metric = settings["solver"], settings["step"], settings["metric"]
    second_stage = slv.get_solver(solver).search.second_stage
    pair = None
    if second_stage is not None and step == "solver":
        head = teacher_run.head
        count = head.x.shape[1]
        n = teacher_run.fine_sigmas.size
        report("heun costs", 0, n - 1)
        done = [0]

        def heun_tick(k: int) -> None:
            done[0] += k
            report("heun costs", done[0], n - 1)

        labels = None if teacher_run.labels is None else teacher_run.labels[:count]
        sums = second_stage_pair_costs(den, head, labels, second_stage, metric, batch_size, progress=heun_tick)
        pair = _heun_cost_matrix(sums, count, teacher_run.moments, metric)
    return StepCosts(teacher_run.moments, solver, settings["num_steps"], metric=metric, step=step, afs=settings["afs"],
                     max_order=settings["max_order"], pair_costs=pair)


def _polish(den: Any, spec: slv.SolverSpec, teacher_run: TeacherRun, path: list, options: dict, refine_latents: int,
            num_steps: int, batch_size: int, report) -> tuple[list, dict, slice]:
    """`refine_path` on the first latents (at most half); returns the path, what the polish did, the held-out part."""
    used = min(refine_latents, len(teacher_run.seeds) // 2)
    if not used or num_steps <= 1:
        return path, {}, slice(0, None)
    part = slice(0, used)
    labels = None if teacher_run.labels is None else teacher_run.labels[part]
    fine = teacher_run.fine_sigmas

    def error(p: list[int]) -> float:
        return _end_error(den, spec, teacher_run.latents[part], labels, fine[p], teacher_run.ends[part], options,
                          batch_size)

    budget = REFINE_EVALUATIONS_PER_STEP * num_steps
    dp_result = list(path)
    path, best, first, evaluations = refine_path(error, path, budget,
                                                 progress=lambda done, total: report("refine", done, total))
    report("refine", budget, budget)
    refined = {"latents": used, "evaluations": evaluations, "dp_path": dp_result, "dp_end_rms": first, "end_rms": best}
    return path, refined, slice(used, None)


def _check_against_edm(den: Any, spec: slv.SolverSpec, teacher_run: TeacherRun, levels: np.ndarray, settings: dict,
                       options: dict, held_out: slice, refined: bool, batch_size: int, report) -> dict[str, Any]:
    """End-point errors of the solver on the searched and on the EDM rho = 7 schedule, on the held-out latents."""
    fine = teacher_run.fine_sigmas
    report("check", 0, 2)
    edm = np.asarray(den.round_sigma(sch.schedule_sigmas("edm", settings["num_points"], float(fine[-1]),
                                                         float(fine[0]), rho=FINE_RHO)), dtype=np.float64)
    args = (teacher_run.latents[held_out], None if teacher_run.labels is None else teacher_run.labels[held_out])
    ends = teacher_run.ends[held_out]
    searched_err = _end_error(den, spec, *args, levels, ends, options, batch_size)
    report("check", 1, 2)
    edm_err = _end_error(den, spec, *args, edm, ends, options, batch_size)
    report("check", 2, 2)
    return {
        "what": f"RMS over {len(ends)} latents{' (those the polish did not use)' if refined else ''} of "
                f"||x - teacher's x|| at sigma {float(fine[-1]):g}, the {spec.name} solver run on each schedule",
        "latents": int(len(ends)),
        "searched_rms": searched_err, "edm_rho7_rms": edm_err,
        "edm_rho7_sigmas": [float(v) for v in edm],
    }


def _settings_record(teacher_run: TeacherRun, settings: dict, spec: slv.SolverSpec, metric: str, step: str,
                     refined: dict) -> dict[str, Any]:
    """How the schedule was found, as the schedule file records it."""
    out = {
        "teacher": teacher_run.teacher, "fine_points": int(teacher_run.fine_sigmas.size), "fine_rho": FINE_RHO,
        "coeff": settings["coeff"], "metric": metric, "step": step, "num_latents": len(teacher_run.seeds),
        "seeds": _seed_text(teacher_run.seeds), "class_idx": teacher_run.class_idx, "afs": settings["afs"],
        "denoise_to_zero": settings["denoise_to_zero"],
        "max_order": settings["max_order"] if "max_order" in spec.options else None,
        "teacher_nfe_per_latent": teacher_run.nfe_per_latent, "refine": refined or None,
    }
    if spec.search.second_stage is not None and step == "solver":
        out["heun_cost_latents"] = int(teacher_run.head.x.shape[1])
    return out


def _seed_text(seeds: Sequence[int]) -> str:
    """Seeds as the CLI writes them: ranges, e.g. '0-255'."""
    parts, run_start, prev = [], None, None
    for s in seeds:
        if run_start is None:
            run_start = prev = s
        elif s == prev + 1:
            prev = s
        else:
            parts.append(f"{run_start}-{prev}" if prev != run_start else str(run_start))
            run_start = prev = s
    if run_start is not None:
        parts.append(f"{run_start}-{prev}" if prev != run_start else str(run_start))
    return ",".join(parts)
