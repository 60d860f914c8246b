"""Where a serving process's memory goes over a soak: Python objects, the C allocator, or neither.

The 10-minute soak of `benchmarks.serving` saw RSS rise from 426 to 555 MB. This benchmark runs
shorter soaks at the engine level (same model, mix, Poisson arrivals at 90 % of the offline
rate; results dropped as they come, as a client that keeps nothing) and samples, every few
seconds: RSS; Python's live objects (count, and by type: what `objgraph.growth` reports);
the bytes Python allocated (`tracemalloc`, in its own run, since tracing slows every
allocation); and glibc's own account (`mallinfo2`: bytes in use, bytes held free in its
arenas, bytes mapped for large blocks). Each variant runs in a fresh process, because the
allocator's settings are read at process start:

* ``default``: as `edm-deploy serve` runs;
* ``mmap-threshold``: ``MALLOC_MMAP_THRESHOLD_=131072`` fixes glibc's threshold for serving a
  block by mmap (by default it rises after a large block is freed, so later large arrays come
  from the arenas, where freed memory stays in the process);
* ``arenas-2``: ``MALLOC_ARENA_MAX=2`` (by default every thread that allocates may get its own
  arena, up to 8 per core: the engine thread, onnxruntime's workers, the submitting thread);
* ``trace``: the default with `tracemalloc` on (Python-level growth by source line);
* ``cycle``: the reference graph the engine had before this benchmark found it, rebuilt around
  today's engine (each request's future held a callback that held the request, which held the
  future: every finished request, its images included, waited for the cyclic collector);
* ``mem-pattern``: onnxruntime's memory patterns on, as the CPU backend had them before this
  benchmark found them to be the soak's rise (one allocation plan per batch shape, held from that
  shape's second run on; runtime/backends/onnxrt.py says why they are off now).

``--sweep`` shows that cause without a soak: each of passes 1-3 runs every batch size 1..N once
(shuffled) through the bare onnxruntime backend, memory patterns on and off, each in a fresh
process, and RSS is read after every pass.

``--model analytic`` runs the same soak on an exact NumPy denoiser of CIFAR-sized images
(3x32x32), whose calls cost little, so many more requests pass through the engine in the same
time: what grows per request shows there first.

`python -m benchmarks.serving_memory` (about the number of variants x --seconds); writes its part
of the serving section of benchmarks/RESULTS.md (a run of some ``--models`` keeps the other
models' tables from the last saved run).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, replace_section, save
from benchmarks.serving import arrivals, drive, offline_throughput, rss_mb
from edm_deploy.benchmarking import denoiser_inputs

BEGIN, END = "<!-- benchmarks.serving.memory:begin -->", "<!-- benchmarks.serving.memory:end -->"
VARIANTS = {
    "default": {},
    "mmap-threshold": {"MALLOC_MMAP_THRESHOLD_": "131072"},
    "arenas-2": {"MALLOC_ARENA_MAX": "2"},
    "trace": {},
    "cycle": {},
    "mem-pattern": {},
}
SWEEP_PASSES = 3


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_mb() -> dict[str, float]:
    """glibc's account of its heap (MB): in use, held free in its arenas, mapped for large blocks."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {"in_use": info.uordblks / 1e6, "arena_free": info.fordblks / 1e6, "mmapped": info.hblkhd / 1e6}


def type_counts() -> collections.Counter:
    return collections.Counter(type(o).__name__ for o in gc.get_objects())


def profile_soak(den, batch: int, rate: float, seconds: float, every: float, trace: bool) -> dict[str, Any]:
    """Continuous batching at `rate` for `seconds`, sampling memory every `every` seconds."""
    import tracemalloc

    from edm_deploy.runtime.serving import Engine

    label_dim = int(den.label_dim)
    count = int(rate * seconds)
    plan = arrivals(rate, count, seed=7)
    engine = Engine(den, max_batch=batch, max_queue=count + 1, max_images=1)
    engine.check_shapes()
    engine.start()
    if trace:
        tracemalloc.start(8)
    samples: list[dict] = []
    warm: dict[str, Any] = {}  # the object counts (and traced snapshot) once warm-up is over

    def sample(t: float) -> None:
        row = {"t": round(t, 1), "rss": rss_mb(), "objects": len(gc.get_objects()),
               "queued": engine.queue_length, **malloc_mb()}
        if trace:
            row["traced"] = tracemalloc.get_traced_memory()[0] / 1e6
        samples.append(row)
        if not warm and t >= seconds / 4:  # after warm-up
            warm.update(types=type_counts(), snapshot=tracemalloc.take_snapshot() if trace else None)

    tally, errors, t0 = drive(engine, plan, label_dim, every, sample)
    engine.shutdown()
    end = {"t": round(time.perf_counter() - t0, 1), "rss": rss_mb(), "objects": len(gc.get_objects()),
           "queued": 0, **malloc_mb()}
    growth = type_counts() - warm.get("types", collections.Counter())
    out: dict[str, Any] = {"requests": count, **tally, "errors": errors, "samples": samples, "end": end,
                           "type_growth": growth.most_common(8), "padded_rows": engine.stats.padded_rows}
    first_snapshot = warm.get("snapshot")
    if trace:
        end["traced"] = tracemalloc.get_traced_memory()[0] / 1e6
        if first_snapshot is not None:
            stats = tracemalloc.take_snapshot().compare_to(first_snapshot, "lineno")
            out["traced_growth"] = [(str(s.traceback), s.size_diff / 1e6) for s in stats[:6]]
        tracemalloc.stop()
    return out


def rebuild_cycle() -> None:
    """Give every request the reference cycle the engine had before: future -> callback -> request -> future."""
    from edm_deploy.runtime.serving import engine as serving_engine

    class CyclicRequestState(serving_engine.RequestState):
        def __init__(self, spec, plan, future, **kwargs):
            super().__init__(spec, plan, future, **kwargs)
            future.add_done_callback(lambda f, request=self: None)

    serving_engine.RequestState = CyclicRequestState


def open_model(model: str, variant: str):
    """The soak's denoiser: the exact analytic one, or the ONNX file as `serve` opens it (patterns on for `mem-pattern`)."""
    import contextlib

    from edm_deploy.loading import load
    from edm_deploy.runtime.backends.onnxrt import OnnxRuntimeDenoiser
    from edm_deploy.runtime.sampling.analytic import GaussianDenoiser

    if model == "analytic":
        return contextlib.nullcontext(GaussianDenoiser(3, 32))
    if variant in ("mem-pattern", "sweep-on"):
        return OnnxRuntimeDenoiser(model, device="cpu", memory_pattern=True)
    return load(model)


def sweep(den, batch: int) -> dict[str, Any]:
    """RSS (MB) after each of SWEEP_PASSES passes over every batch size 1..`batch`, in a shuffled order."""
    rng = np.random.default_rng(0)
    out = {"start": rss_mb(), "passes": []}
    for _ in range(SWEEP_PASSES):
        for rows in rng.permutation(np.arange(1, batch + 1)):
            den(*denoiser_inputs(den, int(rows), rng))
        out["passes"].append(rss_mb())
    return out


def pattern_speed(model: str, batches=(1, 8, 32, 64), rounds: int = 15) -> dict[str, float]:
    """Seconds per call with memory patterns off / on, by batch: medians of `rounds` calls, the two sessions
    alternating call by call in this process (a drift of the machine's speed hits both alike)."""
    from edm_deploy.runtime.backends.onnxrt import OnnxRuntimeDenoiser

    dens = {on: OnnxRuntimeDenoiser(model, device="cpu", memory_pattern=on) for on in (False, True)}
    rng = np.random.default_rng(0)
    out = {}
    for rows in batches:
        inputs = denoiser_inputs(dens[False], rows, rng)
        times: dict[bool, list] = {False: [], True: []}
        for _ in range(2):  # warm-up: the second run of a shape is the one that records its pattern
            for d in dens.values():
                d(*inputs)
        for _ in range(rounds):
            for on, d in dens.items():
                start = time.perf_counter()
                d(*inputs)
                times[on].append(time.perf_counter() - start)
        out[str(rows)] = float(np.median(times[False]) / np.median(times[True]))
    for d in dens.values():
        d.close()
    return out


def child(args) -> None:
    """One variant in this process: load the model, measure the offline rate, soak, print JSON."""
    if args.variant == "cycle":
        rebuild_cycle()
    if args.variant.startswith("sweep-"):
        with open_model(args.model, args.variant) as den:
            print("RESULT " + json.dumps(sweep(den, args.batch), default=float))
        return
    with open_model(args.model, args.variant) as den:
        base = offline_throughput(den, args.batch, int(den.label_dim), repeats=2)["mix_img_per_s"]
        result = profile_soak(den, args.batch, 0.9 * base, args.seconds, args.every, args.variant == "trace")
    result["offline_mix_img_per_s"] = base
    print("RESULT " + json.dumps(result, default=float))


def run_variant(name: str, model: str, batch: int, seconds: float, every: float) -> dict[str, Any]:
    env = dict(os.environ, **VARIANTS.get(name, {}))
    cmd = [sys.executable, "-m", "benchmarks.serving_memory", "--child", "--variant", name, "--model", model,
           "--batch", str(batch), "--seconds", str(seconds), "--every", str(every)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"variant {name} failed:\n{proc.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def summary(name: str, r: dict) -> dict[str, Any]:
    """RSS after warm-up (the first quarter) to the end, and what the allocator held at the end."""
    samples = r["samples"] + [r["end"]]
    warm = [s for s in samples if s["t"] >= samples[-1]["t"] / 4] or samples[-1:]
    rss = [s["rss"] for s in warm]
    return {"variant": name, "requests": r["requests"], "ok": r["ok"], "failed": r["failed"], "errors": r.get("errors"),
            "rss_first": samples[0]["rss"], "rss_warm": rss[0], "rss_max": max(rss), "rss_end": rss[-1],
            "rise_after_warmup": (max(rss) - rss[0]) / rss[0],
            "objects_warm": warm[0]["objects"], "objects_end": r["end"]["objects"],
            "malloc_end": {k: r["end"].get(k) for k in ("in_use", "arena_free", "mmapped")},
            "traced_end_mb": r["end"].get("traced"), "type_growth": r["type_growth"],
            "traced_growth": r.get("traced_growth")}


def markdown(runs: dict[str, dict], cpu: dict, batch: int) -> str:
    lines = [BEGIN, "### Memory over a soak", "",
             f"`python -m benchmarks.serving_memory`, on {cpu.get('model')} ({cpu.get('logical_cpus')} logical CPUs), "
             f"batch limit {batch}, 90 % of the offline rate, each variant a fresh process; warm = the first sample "
             "after the first quarter.", ""]
    for model, run in runs.items():
        label = os.path.basename(model)
        if run["rows"]:
            lines += [f"**{label}** ({run['seconds']:g} s per variant, {run['date']}):", ""] + _table(run["rows"]) + [""]
        if run.get("sweep"):
            lines += [f"Shape sweep ({label}, `--sweep`, {run['date']}): RSS in MB after loading, then after each "
                      f"pass over every batch size 1..{batch} (shuffled), each setting in a fresh process:", ""] + [
                f"- memory patterns {on}: {r['start']:.0f} -> " + " -> ".join(f"{v:.0f}" for v in r["passes"])
                for on, r in run["sweep"].items()] + [""]
            if run.get("pattern_speed"):
                lines += ["Time per call without / with memory patterns (medians, the two sessions alternating call by "
                          "call in one process), by batch: " + ", ".join(
                              f"{b}: {v:.3f}" for b, v in run["pattern_speed"].items()), ""]
    lines += [END, ""]
    return "\n".join(lines)


def earlier_runs(path: str, batch: int) -> dict[str, dict]:
    """The models of the last saved run at this batch limit, so a run of one model keeps the other's table."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}
    runs = saved.get("runs") if saved.get("batch") == batch else None
    return runs if isinstance(runs, dict) and all(isinstance(r, dict) and "rows" in r for r in runs.values()) else {}


def _table(rows: list[dict]) -> list[str]:
    lines = [
             "| variant | requests ok | RSS start MB | RSS warm MB | RSS max after warm-up MB | rise after warm-up "
             "| Python objects warm / end | malloc in use / held free / mmapped at the end MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["malloc_end"]
        lines.append(f"| {r['variant']} | {r['ok']}/{r['requests']} | {r['rss_first']:.0f} | {r['rss_warm']:.0f} | "
                     f"{r['rss_max']:.0f} | {100 * r['rise_after_warmup']:.1f} % | {r['objects_warm']} / "
                     f"{r['objects_end']} | {m['in_use']:.0f} / {m['arena_free']:.0f} / {m['mmapped']:.0f} |")
    return lines


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="trained digits checkpoint (default: the demo's, else train one)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--every", type=float, default=5.0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--models", default="digits,analytic",
                        help="comma-separated: digits (ONNX, trained here), analytic, or the path of an exported .onnx")
    parser.add_argument("--sweep", action="store_true",
                        help="also the shape sweep (ONNX models): RSS after each pass over batch sizes 1..--batch, "
                             "memory patterns on and off")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return []
    from benchmarks.precision import cpu_info
    from benchmarks.serving import digits_model

    cpu = cpu_info()
    runs = earlier_runs(os.path.join(RESULTS_DIR, "serving_memory.json"), args.batch)
    with tempfile.TemporaryDirectory(prefix="edm-serving-memory-") as tmp:
        for which in [m.strip() for m in args.models.split(",") if m.strip()]:
            model = digits_model(tmp, args.batch, args.ckpt, print) if which == "digits" else which
            variants = [v.strip() for v in args.variants.split(",") if v.strip()]
            # A run of some variants keeps the other variants (and the sweep) of the last run of the same length.
            earlier = runs.get(which) if (runs.get(which) or {}).get("seconds") == args.seconds else {}
            rows: list[dict] = [r for r in earlier.get("rows", []) if r["variant"] not in variants]
            runs[which] = {"seconds": args.seconds, "date": time.strftime("%Y-%m-%d"), "rows": rows,
                           **({"sweep": earlier["sweep"]} if "sweep" in earlier else {})}
            if args.sweep and which != "analytic":
                runs[which]["sweep"] = {on: run_variant(f"sweep-{on}", model, args.batch, 0, 0) for on in ("on", "off")}
                runs[which]["pattern_speed"] = pattern_speed(model)
                print(f"{which} sweep over batch sizes 1..{args.batch}: " + "; ".join(
                    f"patterns {on}: RSS {r['start']:.0f} -> " + " -> ".join(f"{v:.0f}" for v in r["passes"]) + " MB"
                    for on, r in runs[which]["sweep"].items()) + "; call time off/on by batch "
                    + ", ".join(f"{b}: {v:.3f}" for b, v in runs[which]["pattern_speed"].items()), flush=True)
            for name in variants:
                r = summary(name, run_variant(name, model, args.batch, args.seconds, args.every))
                rows.append(r)
                print(f"{which} {name}: {r['ok']}/{r['requests']} ok; RSS {r['rss_first']:.0f} -> warm "
                      f"{r['rss_warm']:.0f} -> max {r['rss_max']:.0f} MB ({100 * r['rise_after_warmup']:.1f} % after "
                      f"warm-up); objects {r['objects_warm']} -> {r['objects_end']}; malloc at the end "
                      f"{r['malloc_end']}; type growth {r['type_growth'][:4]}"
                      + (f"; traced {r['traced_end_mb']:.1f} MB, growth by line {r['traced_growth']}"
                         if r["traced_end_mb"] else ""), flush=True)
    if not args.no_write:
        replace_section(markdown(runs, cpu, args.batch), BEGIN, END)
    print(f"saved {save('serving_memory', {'runs': runs, 'cpu': cpu, 'batch': args.batch})}")
    return runs


if __name__ == "__main__":
    main()
