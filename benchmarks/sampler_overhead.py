"""Sampler overhead: wall time outside the denoiser, per evaluation and as a fraction.

The denoiser is the analytic Gaussian oracle, so its own (tiny) cost is measured and excluded;
what remains is the sampler's host-side work per network evaluation (float64 state updates,
casts, noise draws when churning). The output states the comparison the issue asks for: that
per-evaluation overhead against the time a real network call takes — the CIFAR-10 DDPM++ figure
measured on an H200 (35 ms per evaluation at batch 256, i.e. ~8.8 ms at batch 64, see DESIGN.md)
and, when torch is installed, the measured CPU time of the same network at the same batch here.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import measure, save, table
from edm_deploy.runtime import GaussianDenoiser, StackedRandomGenerator, edm_sampler

H200_CIFAR_MS_PER_EVAL_B64 = 35.0 * 64 / 256  # compiled DDPM++ at batch 256 scaled to 64 (DESIGN.md)


class Timed:
    """Wrap a denoiser and add up the wall time spent inside it."""

    def __init__(self, den):
        self.den, self.seconds, self.calls = den, 0.0, 0
        for attr in ("sigma_min", "sigma_max", "round_sigma", "img_channels", "img_resolution", "label_dim", "max_batch"):
            setattr(self, attr, getattr(den, attr))

    def __call__(self, x, sigma, class_labels=None):
        start = time.perf_counter()
        out = self.den(x, sigma, class_labels)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def overhead_case(channels: int, resolution: int, batch: int, churn: float, repeats: int) -> dict:
    den = Timed(GaussianDenoiser(channels, resolution, mu=0.0, std=0.5))
    seeds = range(batch)
    latents = StackedRandomGenerator(seeds).randn((channels, resolution, resolution))

    def run():
        rnd = StackedRandomGenerator(seeds)
        edm_sampler(den, latents, randn_like=rnd.randn_like, num_steps=18, S_churn=churn)

    den.seconds, den.calls = 0.0, 0
    timing = measure(run, repeats=repeats)
    calls_per_run = den.calls / (repeats + 1)
    inside_per_run = den.seconds / (repeats + 1)
    overhead_s = max(timing["median_s"] - inside_per_run, 0.0)
    per_eval_ms = overhead_s / calls_per_run * 1e3
    return {
        "shape": f"{batch}x{channels}x{resolution}x{resolution}", "S_churn": churn, "nfe": calls_per_run,
        "wall_ms": timing["median_s"] * 1e3, "spread": timing["spread"], "denoiser_ms": inside_per_run * 1e3,
        "overhead_ms_per_eval": per_eval_ms,
        "vs_h200_cifar_call": per_eval_ms / H200_CIFAR_MS_PER_EVAL_B64,
    }


def cpu_network_ms(batch: int = 64) -> float | None:
    """Measured CPU time of one CIFAR-10 DDPM++ evaluation at `batch` (random weights), if torch is here."""
    try:
        import torch

        from edm_deploy.training.precond import EDMPrecond
    except ImportError:
        return None
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=32, img_channels=3, label_dim=10, model_type="SongUNet", model_channels=128,
                     channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13).eval()
    x = torch.randn(batch, 3, 32, 32)
    s = torch.full((batch,), 1.0)
    labels = torch.zeros(batch, 10)
    with torch.no_grad():
        timing = measure(lambda: net(x, s, labels), repeats=2, warmup=1)
    return timing["median_s"] * 1e3


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-network", action="store_true", help="do not time the CPU network")
    args = parser.parse_args(argv)
    cases = [overhead_case(c, r, 64, churn, args.repeats) for c, r in ((1, 8), (3, 32)) for churn in (0.0, 40.0)]
    net_ms = None if args.skip_network else cpu_network_ms(64)
    rows = []
    for case in cases:
        row = [case["shape"], case["S_churn"], case["overhead_ms_per_eval"], case["vs_h200_cifar_call"]]
        if net_ms:
            row.append(case["overhead_ms_per_eval"] / net_ms)
        rows.append(row)
    header = ["batch x image", "S_churn", "overhead ms/eval", "/ H200 DDPM++ call (8.75 ms)"]
    if net_ms:
        header.append(f"/ CPU DDPM++ call ({net_ms:.0f} ms)")
    print("Sampler overhead per network evaluation (analytic denoiser, 18 steps, NFE 35; medians)")
    print(table(rows, header))
    print("target: overhead <= 2 % of a real network call at the same batch")
    path = save("sampler_overhead", {"cases": cases, "cpu_ddpmpp_ms_b64": net_ms,
                                     "h200_ddpmpp_ms_b64": H200_CIFAR_MS_PER_EVAL_B64})
    print(f"saved {path}")
    return {"cases": cases, "cpu_ddpmpp_ms_b64": net_ms}


if __name__ == "__main__":
    main()
