"""CPU backends side by side: onnxruntime vs torch eager vs torch.compile on the same weights.

Two networks (random weights; speed does not depend on training): the digits `tiny` preset
network (8x8x1, 10 classes) and the paper's CIFAR-10 DDPM++ (32x32x3, 55.7 M parameters).
Reports image-evaluations/s per backend (medians over repeats, with spread), the ratio to torch
eager, and images/s + sampler overhead for full sampling at the paper's NFE 35 (digits only; at
CIFAR size on 2 cores one full sample batch takes minutes).
"""

from __future__ import annotations

import argparse
import os
import tempfile

from benchmarks.common import save
from edm_deploy import benchmarking as bm


def digits_network() -> dict:
    from edm_deploy.training.presets import ARCHS

    kwargs = dict(ARCHS["ddpmpp"], model_channels=32, channel_mult=[1, 2], num_blocks=2, attn_resolutions=[4],
                  dropout=0.0, img_resolution=8, img_channels=1, label_dim=10)
    return {"class_name": "EDMPrecond", "init_kwargs": kwargs}


def cifar_network() -> dict:
    from edm_deploy.training.presets import ARCHS

    kwargs = dict(ARCHS["ddpmpp"], dropout=0.13, augment_dim=9, img_resolution=32, img_channels=3, label_dim=10)
    return {"class_name": "EDMPrecond", "init_kwargs": kwargs}


def random_checkpoint(network: dict, path: str) -> str:
    import torch

    from edm_deploy.training.checkpoint import build_network, save_checkpoint

    torch.manual_seed(0)
    net = build_network(network)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    save_checkpoint(path, network, net.state_dict(), meta={"note": "random weights for benchmarking"})
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--digits-batch", type=int, default=128)
    parser.add_argument("--cifar-batch", type=int, default=16)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile)")
    parser.add_argument("--skip-cifar", action="store_true")
    args = parser.parse_args(argv)
    backends = ["torch", "onnxruntime"] + ([] if args.no_compile else ["torch-compile"])
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("digits-tiny", digits_network(), args.digits_batch, 18)]
        if not args.skip_cifar:
            cases.append(("cifar10-ddpmpp", cifar_network(), args.cifar_batch, None))
        for name, network, batch, steps in cases:
            ckpt = random_checkpoint(network, os.path.join(tmp, f"{name}.pt"))
            factories, extra = bm.backend_factories(ckpt, backends, device="cpu", workdir=tmp)
            results = [bm.bench_backend(b, make, batch, args.repeats, steps) for b, make in factories]
            print(f"\n{name}: batch {batch}, CPU ({os.cpu_count()} cores); ONNX export took {extra.get('export_s', 0):.1f} s")
            print(bm.results_table(results))
            torch_eager = next(r for r in results if r.backend.startswith("torch ["))
            ort = next(r for r in results if r.backend.startswith("onnxruntime"))
            ratio = ort.image_evals_per_s / torch_eager.image_evals_per_s
            print(f"onnxruntime / torch eager per evaluation: {ratio:.2f}x (target >= 1.0)")
            out[name] = {"batch": batch, "results": bm.as_dicts(results), "ort_vs_torch": ratio, **extra}
    print(f"peak RSS {bm.peak_rss_mb():.0f} MB")
    print(f"saved {save('backends_cpu', out)}")
    return out


if __name__ == "__main__":
    main()
