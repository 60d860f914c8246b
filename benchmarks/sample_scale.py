"""`edm-deploy sample` at scale: memory must not grow with n, overhead must stay small.

Runs the real CLI in fresh processes on a small exported network (random weights; 8x8x1 digits
shape, conditional) for n = 1,000 and n = 50,000 and reports, side by side:
* peak RSS of each run (target: the 50k run within 10 % of the 1k run);
* images/s of the whole command against the denoiser-only throughput measured inside the same
  run (target: within 5 %, i.e. sampler + PNG writing overhead <= 5 %).
Use --steps to trade run time for NFE (default 4 steps = NFE 7 so 50k images take minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import textwrap

from benchmarks.common import save, table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_model(path: str) -> str:
    import torch

    from edm_deploy.export.onnx_export import export_onnx
    from edm_deploy.training.checkpoint import build_network

    network = {"class_name": "EDMPrecond", "init_kwargs": dict(
        img_resolution=8, img_channels=1, label_dim=10, model_type="SongUNet", model_channels=16,
        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)}
    torch.manual_seed(0)
    net = build_network(network)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    export_onnx(net, network, path, max_batch=1024)
    return path


def run_sample(model: str, n: int, outdir: str, batch: int, steps: int) -> dict:
    code = textwrap.dedent(f"""
        import resource, sys
        from edm_deploy.cli import main
        try:
            main(["sample", {model!r}, "-n", "{n}", "--outdir", {outdir!r}, "--subdirs", "--batch", "{batch}",
                  "--steps", "{steps}", "--device", "cpu", "--profile"])
        finally:
            print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
    """)
    env = dict(os.environ, PYTHONPATH=REPO, TQDM_DISABLE="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    done = re.search(r"done: (\d+) images, \S+ NFE (\d+)/image, ([\d.]+) s, ([\d.]+) img/s; denoiser ([\d.]+) s, sampler\+I/O overhead ([\d.]+)%", res.stdout)
    rss = re.search(r"PEAK_RSS_KB (\d+)", res.stdout)
    images, nfe, wall, ips, den_s, overhead = done.groups()
    return {"n": int(images), "nfe": int(nfe), "wall_s": float(wall), "img_per_s": float(ips),
            "denoiser_s": float(den_s), "denoiser_only_img_per_s": int(images) / float(den_s),
            "overhead_fraction": float(overhead) / 100, "peak_rss_mb": int(rss.group(1)) / 1024}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=50000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = small_model(os.path.join(tmp, "small.onnx"))
        runs = [run_sample(model, n, os.path.join(tmp, f"out{n}"), args.batch, args.steps) for n in (args.small, args.large)]
    rows = [[r["n"], r["nfe"], r["wall_s"], r["img_per_s"], r["denoiser_only_img_per_s"], r["overhead_fraction"], r["peak_rss_mb"]] for r in runs]
    print(table(rows, ["n", "NFE", "wall s", "img/s", "denoiser-only img/s", "overhead", "peak RSS MB"]))
    small, large = runs
    rss_ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    tput_ratio = large["img_per_s"] / large["denoiser_only_img_per_s"]
    print(f"peak RSS 50k / 1k = {rss_ratio:.3f} (target <= 1.10); "
          f"throughput / denoiser-only at {large['n']} = {tput_ratio:.3f} (target >= 0.95)")
    payload = {"runs": runs, "rss_ratio": rss_ratio, "throughput_ratio": tput_ratio}
    print(f"saved {save('sample_scale', payload)}")
    return payload


if __name__ == "__main__":
    main()
