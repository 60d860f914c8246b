"""Timing helpers shared by the benchmarks: warm-up, repeats, median and spread, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Any, Callable

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def measure(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Run fn warmup + repeats times; median, min, max and relative spread of the repeats (s)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    med = statistics.median(times)
    return {"median_s": med, "min_s": min(times), "max_s": max(times),
            "spread": (max(times) - min(times)) / med if med else 0.0, "repeats": repeats}


def machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def save(name: str, payload: dict[str, Any]) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    payload = {"benchmark": name, "machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    from edm_deploy.runtime.core.fileio import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(payload, indent=2, default=float).encode("utf-8"))
    return path


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


RESULTS_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def replace_section(text: str, begin: str, end: str, path: str = RESULTS_MD) -> None:
    """Replace a benchmark's section of RESULTS.md (between its markers, which `text` carries), or append it."""
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Recorded benchmark results\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + text.rstrip("\n") + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    from edm_deploy.runtime.core.fileio import atomic_write_bytes

    atomic_write_bytes(path, new.encode("utf-8"))  # a stop mid-write leaves the old file whole


FD_TICKS = (0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5, 10, 20, 50)


def fd_vs_nfe_axes(ax, nfes) -> None:
    """Log-log axes for a quality-against-NFE plot: the NFEs and round FD values as tick labels."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(nfes)
    ax.set_xticklabels([str(n) for n in nfes])
    ax.minorticks_off()
    lo, hi = ax.get_ylim()
    ticks = [t for t in FD_TICKS if lo <= t <= hi]
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{t:g}" for t in ticks])
    ax.set_xlabel("NFE (network evaluations per image)")
    ax.set_ylabel("pixel Fréchet distance to the test split")


def save_figure(fig, path: str) -> None:
    """Lay out, write (creating the folder) and release a matplotlib figure."""
    import matplotlib.pyplot as plt

    from edm_deploy.runtime.core.fileio import atomic_path

    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=os.path.splitext(path)[1].lstrip(".") or "png")
    plt.close(fig)
