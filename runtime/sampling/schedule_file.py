"""Time points as data: an explicit sigma list on the command line, or a schedule file.

A schedule file is JSON, written by `edm-deploy schedule` (a searched schedule) or by hand:
``{"sigmas": [80, 10.98, ..., 0.002], "solver": "ipndm", "nfe": 5, "model_sha256": "..."}``; a
bare JSON list of numbers works too. The sigmas are used exactly as given (validated by
`schedules.check_sigma_list`); the other fields say what the list was made for, so a sampler
can warn when it is used with another model or solver.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np

from ..core.errors import InputError
from ..core.fileio import atomic_write_bytes
from ..core.jsonio import MAX_SCHEDULE_BYTES, has_format, read_json_file
from ..core.schedules import MAX_STEPS, check_sigma_list

SCHEDULE_FORMAT = "edm-deploy-schedule"


def parse_sigmas(text: str) -> tuple[np.ndarray, dict[str, Any]]:
    """`'80,10,1,0.002'` or a path to a schedule file -> (validated sigmas, the file's other fields).

    A list on the command line is bounded before it is split (at most `MAX_STEPS` entries, as
    for num_steps) and every entry must be a number: an empty one (``80,,1``) is an error, not
    skipped, since a typo would otherwise sample on another schedule without a word.
    """
    text = str(text).strip()
    if text.lower().endswith(".json") or os.path.isfile(text):
        return read_schedule(text)
    if len(text) > MAX_SCHEDULE_BYTES or text.count(",") > MAX_STEPS:
        raise InputError(f"sigmas holds {text.count(',') + 1:,} entries; at most {MAX_STEPS:,} time points "
                         "(plus a final 0) are allowed, as for num_steps", param="sigmas")
    entries = [v.strip() for v in text.split(",")]
    for i, entry in enumerate(entries):
        if not entry:
            raise InputError(f"sigmas {text!r} has an empty entry (number {i + 1}); give comma-separated "
                             "numbers such as 80,10,1,0.002", param="sigmas")
    try:
        values = [float(v) for v in entries]
    except ValueError:
        raise InputError(f"sigmas {text[:80]!r} must be comma-separated numbers or a .json schedule file",
                         param="sigmas") from None
    return check_sigma_list(values), {}


def read_schedule(path: str) -> tuple[np.ndarray, dict[str, Any]]:
    """A schedule file -> (validated sigmas, its other fields); bounded in size and depth."""
    if not os.path.isfile(path):
        raise InputError(f"sigmas file not found: {path}", param="sigmas")
    data = read_json_file(path, f"sigmas file {path}", max_bytes=MAX_SCHEDULE_BYTES, what="JSON schedule",
                          param="sigmas")
    meta: dict[str, Any] = {}
    if isinstance(data, dict):
        if "sigmas" not in data:
            raise InputError(f"sigmas file {path} has no 'sigmas' list", param="sigmas")
        meta = {k: v for k, v in data.items() if k != "sigmas"}
        data = data["sigmas"]
    if not isinstance(data, list):
        raise InputError(f"sigmas file {path}: its 'sigmas' must be a list of numbers", param="sigmas")
    try:
        return check_sigma_list(data), meta
    except InputError as exc:
        raise InputError(f"{exc} (in the file {path})", param="sigmas") from None


def is_schedule_file(path: str) -> bool:
    """Whether `path` is a schedule file edm-deploy wrote (the one kind `schedule --out` replaces)."""
    return has_format(path, (SCHEDULE_FORMAT,))


def write_schedule(path: str, sigmas: Any, **meta: Any) -> None:
    """Write a schedule file atomically: the sigmas plus what they were made for.

    `meta` should say everything that changes how the list is spent: the solver, its NFE,
    ``afs``, ``denoise_to_zero`` and ``max_order`` (`schedule_search.ScheduleSearch.metadata`
    gives them), so `mismatch_warnings` can tell a run that spends it differently.
    """
    values = [float(v) for v in check_sigma_list(sigmas)]
    payload = {"format": SCHEDULE_FORMAT, "sigmas": values, **meta}
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def mismatch_warnings(meta: dict[str, Any], model_sha256: str, solver: str, *, afs: Optional[bool] = None,
                      max_order: Optional[int] = None, denoise_to_zero: Optional[bool] = None,
                      nfe: Optional[int] = None) -> list[str]:
    """What a schedule file says it was made for, where that differs from this run.

    Pass the values this run actually uses (the effective `max_order`, not None for "the
    solver's default"); an argument left at None, or a field the file does not record, is not
    compared. The same time points spent with or without the analytical first step, a final
    denoising step or another order give another NFE or another trajectory than the one searched.
    """
    notes = []
    if meta.get("model_sha256") and meta["model_sha256"] != model_sha256:
        notes.append("the schedule was searched for another model (its model_sha256 differs); "
                     "it may not suit this one")
    if meta.get("solver") and meta["solver"] != solver:
        notes.append(f"the schedule was searched for the {meta['solver']} solver, not {solver}")

    def differs(key: str, value: Any) -> bool:
        return value is not None and meta.get(key) is not None and meta[key] != value

    if differs("afs", afs):
        notes.append(f"the schedule was searched {'with' if meta['afs'] else 'without'} afs (the analytical "
                     f"first step); this run samples {'with' if afs else 'without'} it")
    if differs("denoise_to_zero", denoise_to_zero):
        notes.append(f"the schedule was searched {'with' if meta['denoise_to_zero'] else 'without'} "
                     f"denoise_to_zero; this run samples {'with' if denoise_to_zero else 'without'} it")
    if differs("max_order", max_order):
        notes.append(f"the schedule was searched at max_order {meta['max_order']}; this run uses {max_order}")
    if differs("nfe", nfe):
        notes.append(f"the schedule was searched for NFE {meta['nfe']}; this run spends {nfe} network evaluations")
    return notes
