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
from typing import Any

import numpy as np

from edm_deploy.runtime.errors import InputError
from edm_deploy.runtime.fileio import atomic_write_bytes
from edm_deploy.runtime.schedules import check_sigma_list

SCHEDULE_FORMAT = "edm-deploy-schedule"


def parse_sigmas(text: str) -> tuple[np.ndarray, dict[str, Any]]:
    """`'80,10,1,0.002'` or a path to a schedule file -> (validated sigmas, the file's other fields)."""
    text = str(text).strip()
    if text.lower().endswith(".json") or os.path.isfile(text):
        return read_schedule(text)
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"sigmas {text!r} must be comma-separated numbers or a .json schedule file",
                         param="sigmas") from None
    return check_sigma_list(values), {}


def read_schedule(path: str) -> tuple[np.ndarray, dict[str, Any]]:
    if not os.path.isfile(path):
        raise InputError(f"schedule file not found: {path}", param="sigmas")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable JSON schedule ({exc})", param="sigmas") from None
    meta: dict[str, Any] = {}
    if isinstance(data, dict):
        if "sigmas" not in data:
            raise InputError(f"{path} has no 'sigmas' list", param="sigmas")
        meta = {k: v for k, v in data.items() if k != "sigmas"}
        data = data["sigmas"]
    if not isinstance(data, list):
        raise InputError(f"{path}: 'sigmas' must be a list of numbers", param="sigmas")
    return check_sigma_list(data), meta


def write_schedule(path: str, sigmas: Any, **meta: Any) -> None:
    """Write a schedule file atomically: the sigmas plus what they were made for."""
    values = [float(v) for v in check_sigma_list(sigmas)]
    payload = {"format": SCHEDULE_FORMAT, "sigmas": values, **meta}
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def mismatch_warnings(meta: dict[str, Any], model_sha256: str, solver: str) -> list[str]:
    """What a schedule file says it was made for, where that differs from this run."""
    notes = []
    if meta.get("model_sha256") and meta["model_sha256"] != model_sha256:
        notes.append("the schedule was searched for another model (its model_sha256 differs); "
                     "it may not suit this one")
    if meta.get("solver") and meta["solver"] != solver:
        notes.append(f"the schedule was searched for the {meta['solver']} solver, not {solver}")
    return notes
