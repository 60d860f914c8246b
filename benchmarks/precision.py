"""Low precision on the CPU: int8 (onnxruntime, static QDQ) and bf16 (torch autocast) against fp32.

Speed, per network evaluation, on the paper's CIFAR-10 DDPM++ (55.7 M parameters, random
weights: speed does not depend on training) at batch 8 and 32: onnxruntime fp32 vs the int8 file
`export/quantize.py` writes, torch fp32 vs torch with the inner UNet under
``torch.autocast("cpu", dtype=torch.bfloat16)``. All four run interleaved in one process (one
call each per round, so a noisy neighbour hits them alike); medians over the rounds and the
ratios int8/fp32 and bf16/fp32 are reported. The int8 CIFAR file is calibrated on 2 short
trajectories (4 steps) only: its weights are random, so only its speed means anything.

Quality, on a trained digits model (the demo's `tiny` preset; trained here in ~2.5 min unless a
checkpoint is given or the demo's exists): the fp32 and int8 ONNX files each sample
`per_class` images per digit with deterministic Heun, 18 steps (35 NFE), scored with the demo's
independent classifier and pixel Fréchet distance; plus the export gate's verification of the
int8 file against the torch model.

The CPU model and its VNNI / BF16 / AMX flags (from /proc/cpuinfo) are recorded next to the
figures: int8 and bf16 speed depend on them. Targets (issue 17): int8 >= 2.2x fp32 onnxruntime
per evaluation on a VNNI CPU; digits FD within 10 % of fp32 and accuracy >= 98 %.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import tempfile
import time
from typing import Any, Callable

import numpy as np

from benchmarks.common import RESULTS_DIR, save, table

CPU_FLAGS = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_info(path: str = "/proc/cpuinfo") -> dict[str, Any]:
    """Model name, logical CPUs and the int8/bf16-relevant ISA flags of this machine."""
    info: dict[str, Any] = {"model": None, "logical_cpus": os.cpu_count(), "flags": {}}
    try:
        text = open(path).read()
    except OSError:
        return info
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and info["model"] is None:
            info["model"] = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    info["flags"] = {f: f in flags for f in CPU_FLAGS}
    info["vnni"] = info["flags"]["avx512_vnni"] or info["flags"]["avx_vnni"]
    return info


def interleaved(fns: list[tuple[str, Callable[[], Any]]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Per name: median seconds and spread over `repeats` rounds, each round calling every fn once."""
    for _ in range(warmup):
        for _, fn in fns:
            fn()
    times: dict[str, list[float]] = {name: [] for name, _ in fns}
    for _ in range(repeats):
        for name, fn in fns:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"median_s": med, "spread": (max(ts) - min(ts)) / med if med else 0.0, "times_s": ts}
    return out


def bf16_copy(net):
    """A copy of the preconditioner whose inner UNet runs under bf16 autocast: the torch
    backend's own `--bf16` path (`set_bf16_autocast`; c_in/c_skip/c_out and the skip mix stay fp32,
    the rule the int8 file follows too)."""
    return copy.deepcopy(net).set_bf16_autocast(True).eval()


def speed_case(workdir: str, batches: list[int], repeats: int, echo) -> dict[str, Any]:
    from benchmarks.backends_cpu import cifar_network, random_checkpoint
    from edm_deploy.export.onnx_export import export_onnx
    from edm_deploy.export.quantize import quantize_int8
    from edm_deploy.loading import load
    from edm_deploy.training.checkpoint import load_checkpoint, load_network

    ckpt = load_checkpoint(random_checkpoint(cifar_network(), os.path.join(workdir, "cifar.pt")))
    net = load_network(ckpt).eval().requires_grad_(False)
    fp32_path, int8_path = os.path.join(workdir, "cifar.onnx"), os.path.join(workdir, "cifar-int8.onnx")
    start = time.perf_counter()
    export_onnx(net, ckpt["network"], fp32_path, max_batch=max(batches))
    export_s = time.perf_counter() - start
    quant = quantize_int8(fp32_path, int8_path, num_images=2, seed=0, steps=4)
    echo(f"CIFAR-10 DDPM++: export {export_s:.0f} s, int8 quantisation {quant.seconds:.0f} s "
         f"({len(quant.quantized_nodes)} int8 nodes, {os.path.getsize(fp32_path) / 1e6:.0f} -> "
         f"{quant.size_bytes / 1e6:.0f} MB; self-check vs fp32 {quant.self_check_max_rel_l2:.1%})")
    ort32, ort8 = load(fp32_path, device="cpu"), load(int8_path, device="cpu")
    net_bf16 = bf16_copy(net)
    rows, cases = [], {}
    for batch in batches:
        fns = _calls(batch, ort32, ort8, net, net_bf16)
        timing = interleaved(fns, repeats=repeats, warmup=1)
        ratio_int8 = timing["onnxruntime fp32"]["median_s"] / timing["onnxruntime int8"]["median_s"]
        ratio_bf16 = timing["torch fp32"]["median_s"] / timing["torch bf16 autocast"]["median_s"]
        for name, t in timing.items():
            base = "onnxruntime fp32" if name.startswith("onnxruntime") else "torch fp32"
            rows.append([name, batch, t["median_s"], batch / t["median_s"], t["spread"],
                         timing[base]["median_s"] / t["median_s"]])
        cases[str(batch)] = {"timing": timing, "int8_speedup": ratio_int8, "bf16_speedup": ratio_bf16}
        echo(f"  batch {batch}: int8 / fp32 onnxruntime {ratio_int8:.2f}x, bf16 / fp32 torch {ratio_bf16:.2f}x")
    for den in (ort32, ort8):
        den.close()
    print(table(rows, ["backend", "batch", "s/eval", "img-evals/s", "spread", "vs fp32 same runtime"]))
    return {"network": "cifar10-ddpmpp (random weights)", "export_s": export_s, "quantize_s": quant.seconds,
            "fp32_bytes": os.path.getsize(fp32_path), "int8_bytes": quant.size_bytes,
            "int8_nodes": len(quant.quantized_nodes), "repeats": repeats, "batches": cases}


def _calls(batch: int, ort32, ort8, net, net_bf16) -> list[tuple[str, Callable[[], Any]]]:
    """One evaluation of each backend on the same inputs (per-row sigma over [0.002, 80])."""
    import torch

    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
    sigma = np.exp(rng.uniform(np.log(0.002), np.log(80), batch)).astype(np.float32)
    labels = np.eye(10, dtype=np.float32)[np.arange(batch) % 10]
    xt, st, lt = torch.from_numpy(x), torch.from_numpy(sigma), torch.from_numpy(labels)

    def torch_call(module):
        def call():
            with torch.inference_mode():
                return module(xt, st, lt)
        return call

    return [("onnxruntime fp32", lambda: ort32(x, sigma, labels)), ("onnxruntime int8", lambda: ort8(x, sigma, labels)),
            ("torch fp32", torch_call(net)), ("torch bf16 autocast", torch_call(net_bf16))]


def digits_checkpoint(given: str | None, echo) -> str:
    """A trained digits checkpoint: the one given, the demo's if complete, else train one (cached)."""
    from edm_deploy.demo import train_step
    from edm_deploy.training.checkpoint import load_checkpoint
    from edm_deploy.training.training_loop import options_from_preset

    if given:
        return given
    demo = os.path.join("demo", "train", "ckpt.pt")
    if os.path.exists(demo):
        state = load_checkpoint(demo).get("training_state") or {}
        if float(state.get("cur_nimg", 0)) / 1000 >= options_from_preset("tiny").duration_kimg:
            return demo
    outdir = os.path.join(RESULTS_DIR, "precision-digits")
    os.makedirs(outdir, exist_ok=True)
    return train_step(outdir, None, 0, echo)


def quality_case(ckpt_path: str, workdir: str, per_class: int, num_images: int, echo) -> dict[str, Any]:
    from edm_deploy.export.onnx_export import export_onnx
    from edm_deploy.export.quantize import quantize_int8
    from edm_deploy.export.verify import TOLERANCES, verify_artifact
    from edm_deploy.loading import load
    from edm_deploy.runtime.sampling.reference import nfe
    from edm_deploy.training.checkpoint import load_checkpoint, load_network
    from edm_deploy.training.dataset import load_digits_split
    from edm_deploy.training.digits_eval import frechet_pixels, sample_digits, score_samples, train_classifier

    ckpt = load_checkpoint(ckpt_path)
    net = load_network(ckpt).eval()
    fp32_path, int8_path = os.path.join(workdir, "digits.onnx"), os.path.join(workdir, "digits-int8.onnx")
    export_onnx(net, ckpt["network"], fp32_path, max_batch=500, opt_batch=100, source_path=ckpt_path)
    quant = quantize_int8(fp32_path, int8_path, num_images=num_images, seed=0, steps=18)
    echo(f"digits: {ckpt_path}; int8 calibrated on {num_images} trajectories ({quant.calibration_rows} rows) "
         f"in {quant.seconds:.1f} s")
    classifier, clf_acc = train_classifier()
    train_x, _, test_x, _ = load_digits_split()
    out: dict[str, Any] = {"checkpoint": ckpt_path, "per_class": per_class, "nfe": nfe(18), "steps": 18,
                           "classifier_test_accuracy": clf_acc, "fd_train_test": frechet_pixels(train_x, test_x),
                           "calibration": quant.manifest["quantization"]["calibration"]}
    for precision, path in (("fp32", fp32_path), ("int8", int8_path)):
        den = load(path, device="cpu")
        start = time.perf_counter()
        samples, classes = sample_digits(den, per_class=per_class, seed=0, num_steps=18, batch=500)
        wall = time.perf_counter() - start
        # img/s: one sequential run each, not interleaved: information only
        out[precision] = {**score_samples(samples, classes, classifier, test_x), "img_per_s_sequential": len(samples) / wall}
        den.close()
    if "int8" in TOLERANCES:
        report = verify_artifact(int8_path, net, load(int8_path, device="cpu"), "int8")
        out["int8_verify"] = {"passed": report.passed, "max_deriv": report.max_deriv, "max_rel_l2": report.max_rel_l2,
                              "tolerance": report.tolerance}
        echo(report.table())
    fp32, int8 = out["fp32"], out["int8"]
    out["fd_ratio_int8_fp32"] = int8["fd_samples_test"] / fp32["fd_samples_test"]
    rows = [[p, out[p]["accuracy"], out[p]["fd_samples_test"], out["fd_train_test"]] for p in ("fp32", "int8")]
    print(table(rows, ["digits ONNX", "accuracy", "FD vs test", "FD train vs test (yardstick)"]))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per batch size")
    parser.add_argument("--batches", default="8,32", help="CIFAR batch sizes, comma-separated")
    parser.add_argument("--digits-ckpt", default=None, help="trained digits checkpoint (default: demo's, else train)")
    parser.add_argument("--per-class", type=int, default=100, help="digits samples per class for the quality figures")
    parser.add_argument("--calibration-images", type=int, default=16, help="digits int8 calibration trajectories")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args(argv)
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    cpu = cpu_info()
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["flags"].items())
    print(f"CPU: {cpu['model']} ({cpu['logical_cpus']} logical CPUs); {flags}")
    out: dict[str, Any] = {"cpu": cpu}
    with tempfile.TemporaryDirectory(prefix="edm-precision-") as tmp:
        if not args.skip_speed:
            batches = [int(b) for b in args.batches.split(",") if b.strip()]
            out["speed"] = speed_case(tmp, batches, args.repeats, print)
            for b, case in out["speed"]["batches"].items():
                verdict = "met" if case["int8_speedup"] >= 2.2 else "NOT met"
                print(f"batch {b}: int8 {case['int8_speedup']:.2f}x fp32 onnxruntime per evaluation "
                      f"(target >= 2.2x on a VNNI CPU: {verdict}; VNNI here: {'yes' if cpu['vnni'] else 'no'}); "
                      f"bf16 {case['bf16_speedup']:.2f}x fp32 torch")
        if not args.skip_quality:
            ckpt = digits_checkpoint(args.digits_ckpt, print)
            q = out["quality"] = quality_case(ckpt, tmp, args.per_class, args.calibration_images, print)
            fd_ok = q["fd_ratio_int8_fp32"] <= 1.10
            acc_ok = q["int8"]["accuracy"] >= 0.98
            print(f"digits int8: FD {q['int8']['fd_samples_test']:.4f} vs fp32 {q['fp32']['fd_samples_test']:.4f} "
                  f"({q['fd_ratio_int8_fp32']:.3f}x; target <= 1.10x: {'met' if fd_ok else 'NOT met'}), accuracy "
                  f"{q['int8']['accuracy']:.1%} vs fp32 {q['fp32']['accuracy']:.1%} (target >= 98 %: "
                  f"{'met' if acc_ok else 'NOT met'})")
    print(f"saved {save('precision', out)}")
    return out


if __name__ == "__main__":
    main()
