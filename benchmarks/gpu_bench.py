"""GPU throughput: the reference-style fp32 path against this project's fastest path, one run.

* baseline ("reference-style"): the CIFAR-10 DDPM++ EDMPrecond network in fp32 eager PyTorch, and
  the sampler loop written the way the reference writes it — torch float64 state on the GPU, the
  network called with float64 x and a scalar sigma, Heun with a final Euler step (NFE 35).
* fastest available: TensorRT (fp16 engine, CUDA graphs) when `tensorrt` imports; otherwise the
  torch backend with fp16, channels-last, torch.compile and CUDA graphs ('reduce-overhead').
  Either way the sampler is edm_deploy's own `edm_sampler` with its state kept on the device.

Both paths use the same random weights (speed does not depend on training). Prints images/s per
batch size, the ratio, and the sampler overhead fraction (wall time outside the network).
`--device cpu --tiny` runs the same code on a CPU with a tiny network, for checking the script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edm_deploy.runtime import StackedRandomGenerator, edm_sampler  # noqa: E402
from edm_deploy.runtime.core.timing import TimedDenoiser  # noqa: E402

CIFAR_DDPMPP = dict(img_resolution=32, img_channels=3, label_dim=10, model_type="SongUNet", model_channels=128,
                    channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13)
TINY = dict(img_resolution=8, img_channels=1, label_dim=10, model_type="SongUNet", model_channels=16,
            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)


def build_net(config: dict, device: str):
    import torch

    from edm_deploy.training.precond import EDMPrecond

    torch.manual_seed(0)
    net = EDMPrecond(**config).eval().requires_grad_(False)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    return net.to(device)


def reference_style_sample(net, latents, labels, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Heun/EDM in torch float64 on the device, as the reference loop does it."""
    import torch

    step = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    t = (sigma_max ** (1 / rho) + step / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros_like(t[:1])])
    x = latents.to(torch.float64) * t[0]
    for i in range(num_steps):
        t_cur, t_next = t[i], t[i + 1]
        d = (x - net(x, t_cur, labels).to(torch.float64)) / t_cur
        x_next = x + (t_next - t_cur) * d
        if i < num_steps - 1:
            d2 = (x_next - net(x_next, t_next, labels).to(torch.float64)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_reference(net, batch: int, device: str, repeats: int) -> dict:
    import torch

    c, r = net.img_channels, net.img_resolution
    latents = torch.randn(batch, c, r, r, device=device)
    labels = torch.eye(net.label_dim, device=device)[torch.arange(batch, device=device) % net.label_dim]
    with torch.no_grad():
        reference_style_sample(net, latents, labels, num_steps=2)
        walls = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            reference_style_sample(net, latents, labels)
            sync(device)
            walls.append(time.perf_counter() - start)
    wall = float(np.median(walls))
    return {"img_per_s": batch / wall, "wall_s": wall}


def fast_denoiser(net, config: dict, device: str, workdir: str, max_batch: int, log):
    """TensorRT engine when TensorRT is importable, else the compiled fp16 torch backend."""
    from edm_deploy.training.checkpoint import network_manifest

    network = {"class_name": "EDMPrecond", "init_kwargs": config}
    try:
        import tensorrt  # noqa: F401

        have_trt = device.startswith("cuda")
    except ImportError:
        have_trt = False
    if have_trt:
        from edm_deploy.export.onnx_export import export_onnx
        from edm_deploy.export.tensorrt_build import build_engine
        from edm_deploy.runtime.backends.tensorrt import TensorRTDenoiser

        onnx_path = os.path.join(workdir, "ddpmpp-fp16.onnx")
        result = export_onnx(net.cpu(), network, onnx_path, fp16=True, max_batch=max_batch, opt_batch=256)
        net.to(device)
        start = time.perf_counter()
        build_engine(onnx_path, onnx_path[:-5] + ".plan", result.manifest, max_batch=max_batch, opt_batch=256)
        log(f"TensorRT engine built in {time.perf_counter() - start:.0f} s")
        return TensorRTDenoiser(onnx_path[:-5] + ".plan", cuda_graph=True), "tensorrt fp16 + CUDA graphs"
    from edm_deploy.runtime.backends.torch_backend import TorchDenoiser

    manifest = network_manifest(net, network)
    on_gpu = device.startswith("cuda")
    den = TorchDenoiser(net, manifest, device=device, fp16=on_gpu, compile=on_gpu, compile_mode="reduce-overhead" if on_gpu else None,
                        channels_last=on_gpu)
    return den, den.describe()


def time_fast(den, batch: int, repeats: int, device: str) -> dict:
    seeds = list(range(batch))
    rnd = StackedRandomGenerator(seeds)
    c, r = den.img_channels, den.img_resolution
    latents = den.to_device(rnd.randn((c, r, r)))
    labels = np.eye(den.label_dim, dtype=np.float32)[np.arange(batch) % den.label_dim]
    edm_sampler(den, latents, labels, num_steps=3)  # compile / capture for this batch size
    edm_sampler(den, latents, labels, num_steps=3)
    den = TimedDenoiser(den)
    walls, overheads = [], []
    for _ in range(repeats):
        den.reset()
        sync(device)
        start = time.perf_counter()
        edm_sampler(den, latents, labels, num_steps=18)
        sync(device)
        wall = time.perf_counter() - start
        walls.append(wall)
        overheads.append(max(0.0, 1 - den.eval_seconds / wall))
    wall = float(np.median(walls))
    return {"img_per_s": batch / wall, "wall_s": wall, "overhead_fraction": float(np.median(overheads))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="reference-style fp32 vs edm-deploy's fastest path (NFE 35)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default="64,256,512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny network (for checking the script on a CPU)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_bench.json")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    config = TINY if args.tiny else CIFAR_DDPMPP
    results = {"device": args.device, "config": config, "batches": {}}

    def log(msg):
        print(msg, flush=True)

    if args.device.startswith("cuda"):
        import torch

        torch.backends.cudnn.benchmark = True
        results["gpu"] = torch.cuda.get_device_name(0)
        log(f"GPU: {results['gpu']}, torch {torch.__version__}")
    out_json = os.path.join(args.out, "gpu_bench.json")
    net = build_net(config, args.device)
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        den, fast_name = fast_denoiser(build_net(config, args.device), config, args.device, workdir, max(batches), log)
        results["fast_path"] = fast_name
        results["fast_setup_s"] = time.perf_counter() - start
        log(f"fast path: {fast_name} (setup {results['fast_setup_s']:.0f} s)")
        for batch in batches:
            ref = time_reference(net, batch, args.device, args.repeats)
            fast = time_fast(den, batch, args.repeats, args.device)
            ratio = fast["img_per_s"] / ref["img_per_s"]
            results["batches"][batch] = {"reference_fp32": ref, "fast": fast, "ratio": ratio}
            log(f"batch {batch:4d}: reference-style fp32 {ref['img_per_s']:8.1f} img/s | {fast_name} "
                f"{fast['img_per_s']:8.1f} img/s | ratio {ratio:5.2f}x | sampler overhead {fast['overhead_fraction']:.1%}")
            with open(out_json, "w") as f:
                json.dump(results, f, indent=2)
    log(f"saved {out_json}")
    if not all(math.isfinite(v["ratio"]) for v in results["batches"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
