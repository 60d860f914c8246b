"""Serving under open-loop load: step-level continuous batching against the two usual schedulers.

One engine (`runtime.serving.Engine`), one model, one batch limit, three schedulers side by side:
(a) ``one-request`` (every network call serves one request), (b) ``request-batch`` (the waiting
requests are batched and run to completion together, as general model servers do), (c)
``continuous`` (step-level: rows of every request in flight share each call, requests join and
leave between calls). Requests are single images with a realistic mix (80 % iPNDM NFE 5, 20 %
Heun NFE 35), seeds and classes per request, arriving as a Poisson process (open loop: an
arrival never waits for a completion) at several rates, given as fractions of the offline
throughput; latency is measured from the scheduled arrival to the image.

The offline yardstick is `generate` (what `sample` runs, without writing files) at the same batch
limit: the mix's images/s = 1 / (0.8 / ips(iPNDM 5) + 0.2 / ips(Heun 35)), each measured over
whole batches. Saturation is the highest offered rate (above the offline throughput).

Models: the trained digits model (the demo's `tiny` preset, ONNX on onnxruntime) and the paper's
CIFAR-10 DDPM++ size (55.7 M parameters, random weights). A soak at 90 % of the offline rate
checks that no request is lost or fails and that memory stays flat (RSS sampled every 5 s).

Admission (``--parts admission``): FIFO (``continuous``) against the deadline policy
(``deadline``: earliest latest-start time, short work first with aging built in) on the same
arrivals, interleaved round by round, p95/p99 per solver and the longest wait.

Targets (issue 20): (c) at saturation >= 0.9x offline throughput; at 60 % load, p95 latency of
(c) <= 0.5x that of (b); the soak without a lost or failed request, memory flat (what memory
does and why: `benchmarks.serving_memory`). The section in benchmarks/RESULTS.md and the plot
docs/serving.png are replaced on each full run; a run of some ``--parts`` rewrites only their
subsections.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import resource
import tempfile
import threading
import time
from typing import Any, Callable, Optional

import numpy as np

from benchmarks.common import replace_section, save, save_figure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_MD = os.path.join(REPO, "benchmarks", "RESULTS.md")
PLOT = os.path.join(REPO, "docs", "serving.png")
BEGIN, END = "<!-- benchmarks.serving:begin -->", "<!-- benchmarks.serving:end -->"
ADMISSION_BEGIN, ADMISSION_END = "<!-- benchmarks.serving.admission:begin -->", "<!-- benchmarks.serving.admission:end -->"
MIX = ((0.8, {"solver": "ipndm", "nfe": 5}), (0.2, {"solver": "heun", "nfe": 35}))
SCHEDULERS = ("one-request", "request-batch", "continuous")
ADMISSION = ("continuous", "deadline")  # FIFO admission against the deadline policy (`runtime.serving.scheduler`)
ADMISSION_LOADS = (0.6, 0.9, 1.5)
PARTS = ("schedulers", "saturation", "admission", "soak")
LOADS = (0.3, 0.6, 0.9, 1.5)


def rss_mb() -> float:
    """Resident memory of this process now (MB), from /proc (ru_maxrss is the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def offline_throughput(den, batch: int, label_dim: int, repeats: int) -> dict[str, Any]:
    """images/s of `generate` for each setting of the mix at this batch limit, and the mix's."""
    from edm_deploy.runtime.sampling.generate import generate

    out: dict[str, Any] = {}
    for _, settings in MIX:
        seeds = list(range(10_000, 10_000 + batch))
        generate(den, seeds, batch_size=batch, **settings)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            generate(den, seeds, batch_size=batch, **settings)
            times.append(time.perf_counter() - start)
        med = float(np.median(times))
        out[f"{settings['solver']}@{settings['nfe']}"] = {"img_per_s": batch / med, "spread": (max(times) - min(times)) / med}
    out["mix_img_per_s"] = 1.0 / sum(share / out[f"{s['solver']}@{s['nfe']}"]["img_per_s"] for share, s in MIX)
    return out


def arrivals(rate: float, count: int, seed: int) -> list[tuple[float, dict, int, None]]:
    """(arrival time, settings, seed, None) of `count` Poisson arrivals at `rate` per second."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=count)
    kinds = rng.choice(len(MIX), size=count, p=[share for share, _ in MIX])
    return [(float(t), MIX[k][1], 1_000_000 + i, None) for i, (t, k) in enumerate(zip(np.cumsum(gaps), kinds))]


def run_load(den, scheduler: str, batch: int, rate: float, count: int, seed: int, label_dim: int) -> dict[str, Any]:
    """Offer `count` single-image requests at `rate`/s to a fresh engine; latency from scheduled arrival."""
    from edm_deploy.runtime.serving import Engine

    plan = arrivals(rate, count, seed)
    engine = Engine(den, max_batch=batch, max_queue=count + 1, max_images=1, scheduler=scheduler)
    engine.check_shapes()  # before the clock starts: not part of any request's latency
    engine.start()
    done_at: list[Optional[float]] = [None] * count
    waited: list[float] = [0.0] * count
    failures: list[str] = []
    lock = threading.Lock()
    t0 = time.perf_counter() + 0.05
    futures = []
    for i, (at, settings, s, _) in enumerate(plan):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        fut = engine.submit([s], None if not label_dim else s % label_dim, settings)

        def finished(f, i=i):
            with lock:
                done_at[i] = time.perf_counter()
                if f.cancelled() or f.exception() is not None:
                    failures.append(repr(f.exception()))
                else:
                    waited[i] = f.result().queued_s
        fut.add_done_callback(finished)
        futures.append(fut)
    for fut in futures:
        try:
            fut.result(timeout=3600)
        except Exception:
            pass
    engine.shutdown()
    latencies = np.array([done - (t0 + at) for done, (at, *_rest) in zip(done_at, plan)])
    span = max(done_at) - (t0 + plan[0][0])
    solvers = np.array([settings["solver"] for _, settings, *_rest in plan])
    names = sorted(set(solvers.tolist()))  # the mix's short and long requests apart
    waits = np.array(waited)
    return {"scheduler": scheduler, "offered_per_s": rate, "requests": count, "failed": len(failures),
            "throughput_per_s": count / span, "p50_s": float(np.percentile(latencies, 50)),
            "p95_s": float(np.percentile(latencies, 95)), "p99_s": float(np.percentile(latencies, 99)),
            "p95_by_solver_s": {n: float(np.percentile(latencies[solvers == n], 95)) for n in names},
            "p99_by_solver_s": {n: float(np.percentile(latencies[solvers == n], 99)) for n in names},
            "max_wait_s": float(waits.max()), "max_wait_by_solver_s": {n: float(waits[solvers == n].max()) for n in names},
            "rows_per_call": engine.stats.rows_per_call, "network_calls": engine.stats.network_calls,
            "padded_rows": engine.stats.padded_rows, "determinism": str(engine.determinism)}


def admission(den, batch: int, base: float, loads, count_for, rounds: int, echo) -> dict[str, Any]:
    """FIFO (`continuous`) against the deadline policy on the same arrivals, interleaved round by round.

    Each round offers the same Poisson plan (seeded by round and load) to both policies back to
    back, so a drift of the machine's speed hits both alike; the figures are medians over rounds.
    """
    runs: dict[tuple[float, str], list] = {}
    for k in range(rounds):
        for load in loads:
            rate = load * base
            for policy in ADMISSION:
                r = run_load(den, policy, batch, rate, count_for(rate), seed=900 + 10 * k + int(load * 10),
                             label_dim=int(den.label_dim))
                runs.setdefault((load, policy), []).append(r)
                echo(f"  admission round {k + 1}, load {load:.1f}, {policy:>10}: p95 "
                     + "/".join(f"{v:.3f}" for v in r["p95_by_solver_s"].values()) + " s, p99 "
                     + "/".join(f"{v:.3f}" for v in r["p99_by_solver_s"].values())
                     + f" s, longest wait {r['max_wait_s']:.3f} s, {r['failed']} failed")
    points = []
    for (load, policy), rs in runs.items():
        med = {key: {n: float(np.median([r[key][n] for r in rs])) for n in rs[0][key]}
               for key in ("p95_by_solver_s", "p99_by_solver_s")}
        longest = {n: float(max(r["max_wait_by_solver_s"][n] for r in rs)) for n in rs[0]["max_wait_by_solver_s"]}
        points.append({"load": load, "scheduler": policy, "rounds": len(rs), **med, "max_wait_by_solver_s": longest,
                       "max_wait_s": float(max(r["max_wait_s"] for r in rs)),
                       "throughput_per_s": float(np.median([r["throughput_per_s"] for r in rs])),
                       "failed": sum(r["failed"] for r in rs)})
    return {"batch": batch, "offline_mix_img_per_s": base, "points": points}


def drive(engine, plan, label_dim: int, every: float, sample: Callable[[float], None]) -> tuple[dict, dict, float]:
    """Submit `plan`'s single-image requests at their arrival times and wait for all of them, calling
    `sample(seconds since the start)` every `every` seconds on the way; results are dropped as they
    come. Returns the tally {"ok", "failed"}, the failures by error, and the start time (perf_counter)."""
    tally = {"ok": 0, "failed": 0}
    errors: collections.Counter = collections.Counter()
    done = threading.Condition()

    def finished(f) -> None:
        with done:
            failed = f.cancelled() or f.exception() is not None
            tally["failed" if failed else "ok"] += 1
            if failed:
                errors["cancelled" if f.cancelled() else repr(f.exception())[:200]] += 1
            done.notify_all()

    t0 = time.perf_counter() + 0.05
    next_sample = t0
    for at, settings, s, _ in plan:
        now = time.perf_counter()
        if now >= next_sample:
            sample(now - t0)
            next_sample += every
        delay = t0 + at - now
        if delay > 0:
            time.sleep(delay)
        engine.submit([s], None if not label_dim else s % label_dim, settings).add_done_callback(finished)
    with done:
        done.wait_for(lambda: tally["ok"] + tally["failed"] == len(plan), timeout=3600)
    return tally, dict(errors), t0


def soak(den, batch: int, rate: float, seconds: float, label_dim: int, echo) -> dict[str, Any]:
    """Continuous batching at `rate` for `seconds`: lost/failed requests and RSS over time.

    Results are counted as they arrive and dropped (a client that kept every result would show
    its own growth, not the engine's).
    """
    from edm_deploy.runtime.serving import Engine

    count = int(rate * seconds)
    plan = arrivals(rate, count, seed=7)
    engine = Engine(den, max_batch=batch, max_queue=count + 1, max_images=1).start()
    memory = []
    tally, _, t0 = drive(engine, plan, label_dim, 5.0, lambda t: memory.append((round(t, 1), round(rss_mb(), 1))))
    engine.shutdown()
    ok, failed = tally["ok"], tally["failed"]
    memory.append((round(time.perf_counter() - t0, 1), round(rss_mb(), 1)))
    later = [m for t, m in memory if t >= seconds / 4] or [memory[-1][1]]
    echo(f"  soak: {ok}/{count} ok, {failed} failed, RSS {memory[0][1]:.0f} -> {memory[-1][1]:.0f} MB "
         f"(after the first quarter: {min(later):.0f}..{max(later):.0f} MB)")
    return {"seconds": seconds, "offered_per_s": rate, "requests": count, "ok": ok, "failed": failed,
            "lost": count - ok - failed, "rss_mb": memory, "rss_after_warmup_range_mb": [min(later), max(later)]}


def saturation(den, batch: int, label_dim: int, load: float, count_for, repeats: int, echo,
               rounds: int = 3) -> dict[str, Any]:
    """Throughput at saturation / offline throughput, measured in interleaved rounds.

    This machine's speed drifts by tens of percent over minutes, so a ratio of figures taken
    minutes apart means little. Each round measures the offline mix, then each scheduler at
    `load` (a queue that never empties), then the offline mix again; a scheduler's ratio in the
    round is its throughput over the mean of the two offline figures; the median round is reported.
    """
    names = ("request-batch", "continuous")
    ratios: dict[str, list] = {n: [] for n in names}
    before = offline_throughput(den, batch, label_dim, repeats)["mix_img_per_s"]
    offline = [before]
    for k in range(rounds):
        got = {}
        for scheduler in names:
            rate = load * before
            r = run_load(den, scheduler, batch, rate, max(20, count_for(rate) // 2), seed=500 + k, label_dim=label_dim)
            got[scheduler] = r["throughput_per_s"]
        after = offline_throughput(den, batch, label_dim, repeats)["mix_img_per_s"]
        offline.append(after)
        for scheduler in names:
            ratios[scheduler].append(got[scheduler] / (0.5 * (before + after)))
        echo(f"  saturation round {k + 1}: offline {before:.1f} -> {after:.1f} img/s; " + ", ".join(
            f"{n} {got[n]:.1f} img/s ({ratios[n][-1]:.2f}x)" for n in names))
        before = after
    return {"load": load, "offline_mix_img_per_s": offline, "ratios": ratios,
            **{f"{n.replace('-', '_')}_ratio": float(np.median(ratios[n])) for n in names}}


def bench_model(name: str, den, batch: int, loads, count_for, repeats: int, soak_s: float, echo,
                parts: tuple = PARTS, rounds: int = 3) -> dict[str, Any]:
    label_dim = int(den.label_dim)
    offline = offline_throughput(den, batch, label_dim, repeats)
    base = offline["mix_img_per_s"]
    echo(f"{name}: offline generate at batch {batch}: " + ", ".join(
        f"{k} {v['img_per_s']:.1f} img/s" for k, v in offline.items() if isinstance(v, dict))
        + f"; the 80/20 mix {base:.1f} img/s")
    out: dict[str, Any] = {"model": name, "batch": batch, "offline": offline}
    if "schedulers" in parts:
        out["points"] = points = []
        for load in loads:
            rate = load * base
            for scheduler in SCHEDULERS:
                if scheduler == "one-request" and load > 0.6 and name != "digits":
                    continue  # hopelessly overloaded and long on the big network; its trend is clear below
                r = run_load(den, scheduler, batch, rate, count_for(rate), seed=int(load * 100), label_dim=label_dim)
                r["load"] = load
                points.append(r)
                echo(f"  load {load:.1f} ({rate:.1f}/s) {scheduler:>13}: {r['throughput_per_s']:.1f} img/s, "
                     f"p50 {r['p50_s']:.3f} s, p95 {r['p95_s']:.3f} s, p99 {r['p99_s']:.3f} s, p95 by solver "
                     + "/".join(f"{v:.3f}" for v in r["p95_by_solver_s"].values())
                     + f" s, {r['rows_per_call']:.1f} rows/call, {r['failed']} failed")
        at60 = {p["scheduler"]: p for p in points if abs(p["load"] - 0.6) < 1e-9}
        if "continuous" in at60 and "request-batch" in at60:
            out["p95_ratio_at_60"] = at60["continuous"]["p95_s"] / at60["request-batch"]["p95_s"]
            out["p95_ratio_at_60_by_solver"] = {k: v / at60["request-batch"]["p95_by_solver_s"][k]
                                                for k, v in at60["continuous"]["p95_by_solver_s"].items()}
    if "saturation" in parts:
        out["saturation"] = saturation(den, batch, label_dim, max(loads), count_for, repeats, echo)
        out["saturation_ratio"] = out["saturation"]["continuous_ratio"]
    if "admission" in parts:
        out["admission"] = admission(den, batch, base, ADMISSION_LOADS, count_for, rounds, echo)
    if "soak" in parts and soak_s > 0:
        out["soak"] = soak(den, batch, 0.9 * base, soak_s, label_dim, echo)
    return out


def digits_model(workdir: str, batch: int, ckpt: Optional[str], echo) -> str:
    from benchmarks.precision import digits_checkpoint
    from edm_deploy.export.onnx_export import export_onnx
    from edm_deploy.training.checkpoint import load_checkpoint, load_network

    path = digits_checkpoint(ckpt, echo)
    raw = load_checkpoint(path)
    onnx_path = os.path.join(workdir, "digits.onnx")
    export_onnx(load_network(raw).eval(), raw["network"], onnx_path, max_batch=batch, opt_batch=batch, source_path=path)
    return onnx_path


def cifar_model(workdir: str, batch: int) -> str:
    from benchmarks.backends_cpu import cifar_network, random_checkpoint
    from edm_deploy.export.onnx_export import export_onnx
    from edm_deploy.training.checkpoint import load_checkpoint, load_network

    raw = load_checkpoint(random_checkpoint(cifar_network(), os.path.join(workdir, "cifar.pt")))
    onnx_path = os.path.join(workdir, "cifar.onnx")
    export_onnx(load_network(raw).eval().requires_grad_(False), raw["network"], onnx_path, max_batch=batch,
                opt_batch=batch)
    return onnx_path


def verdicts(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        if "saturation" in r:
            sat = r["saturation_ratio"]
            rb = r["saturation"]["request_batch_ratio"]
            lines.append(f"{r['model']}: continuous batching at saturation {sat:.2f}x the offline throughput, request-"
                         f"batch {rb:.2f}x (medians of {len(r['saturation']['ratios']['continuous'])} interleaved "
                         "rounds, each against the offline mix measured just before and after) "
                         f"(target >= 0.9: {'met' if sat >= 0.9 else 'NOT met'})")
        if "p95_ratio_at_60" in r:
            q = r["p95_ratio_at_60"]
            lines.append(f"{r['model']}: p95 latency at 60 % load, continuous / request-batch = {q:.2f} "
                         f"(target <= 0.5: {'met' if q <= 0.5 else 'NOT met'}); by solver: " + ", ".join(
                             f"{k} {v:.2f}" for k, v in r["p95_ratio_at_60_by_solver"].items()))
        if "soak" in r:
            s = r["soak"]
            lo, hi = s["rss_after_warmup_range_mb"]
            lines.append(f"{r['model']}: soak {s['seconds']:.0f} s at 90 % load: {s['ok']}/{s['requests']} ok, "
                         f"{s['failed']} failed, {s['lost']} lost; RSS after the first quarter {lo:.0f}..{hi:.0f} MB")
    return lines


def markdown(results: list[dict], cpu: dict) -> str:
    lines = [BEGIN, "## Serving: continuous batching against request-level and one-request scheduling", "",
             f"`python -m benchmarks.serving`, {time.strftime('%Y-%m-%d')}, on {cpu.get('model')} "
             f"({cpu.get('logical_cpus')} logical CPUs), onnxruntime CPU. Single-image requests, 80 % iPNDM NFE 5 / "
             "20 % Heun NFE 35, Poisson arrivals at a fraction (load) of the offline throughput; latency from the "
             "scheduled arrival to the image. Offline = `generate` (what `sample` runs) at the same batch limit.", ""]
    for r in results:
        off = r["offline"]
        lines += [f"**{r['model']}**, batch limit {r['batch']}: offline " + ", ".join(
            f"{k} {v['img_per_s']:.1f} img/s" for k, v in off.items() if isinstance(v, dict))
            + f"; mix {off['mix_img_per_s']:.1f} img/s.", ""]
        if not r.get("points"):
            continue
        rows = [[f"{p['load']:.1f}", p["scheduler"], f"{p['throughput_per_s']:.1f}", f"{p['p50_s']:.3f}",
                 f"{p['p95_s']:.3f}", f"{p['p99_s']:.3f}", "/".join(f"{v:.3f}" for v in p["p95_by_solver_s"].values()),
                 f"{p['rows_per_call']:.1f}", str(p["failed"])]
                for p in r["points"]]
        solvers = "/".join(r["points"][0]["p95_by_solver_s"])
        lines += [f"| load | scheduler | img/s | p50 s | p95 s | p99 s | p95 {solvers} s | rows/call | failed |",
                  "|---|---|---|---|---|---|---|---|---|"] + ["| " + " | ".join(row) + " |" for row in rows] + [""]
    lines += ["Verdicts:", ""] + [f"* {v}" for v in verdicts(results)] + [""]
    lines += [admission_markdown(r, cpu) for r in results if "admission" in r]
    lines += ["![serving](../docs/serving.png)", END]
    return "\n".join(lines) + "\n"


def admission_markdown(r: dict, cpu: dict) -> str:
    """The FIFO / deadline comparison as its own marked part of the serving section."""
    adm = r["admission"]
    points = {(p["load"], p["scheduler"]): p for p in adm["points"]}
    loads = sorted({p["load"] for p in adm["points"]})
    solvers = list(adm["points"][0]["p95_by_solver_s"])
    rounds = adm["points"][0]["rounds"]
    lines = [ADMISSION_BEGIN, "### Admission: FIFO against the deadline policy", "",
             f"`python -m benchmarks.serving --parts admission`, {time.strftime('%Y-%m-%d')}, on {cpu.get('model')} "
             f"({cpu.get('logical_cpus')} logical CPUs), {r['model']} model, batch limit {adm['batch']}, the same mix "
             "and arrivals as above. `continuous` admits first come first served; `deadline` admits the earliest "
             "latest-start time (arrival + (stretch - 1) x NFE x call time: short work first, aging built in; "
             f"`runtime/serving/scheduler.py`). Both run the same Poisson plan back to back in each of {rounds} "
             "rounds; figures are the medians over rounds (the longest wait: the maximum over every request of every "
             "round, submission to admission).", "",
             "| load | solver | p95 FIFO s | p95 deadline s | ratio | p99 FIFO s | p99 deadline s | ratio "
             "| longest wait FIFO s | longest wait deadline s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for load in loads:
        fifo, edf = points[(load, "continuous")], points[(load, "deadline")]
        for n in solvers:
            lines.append(f"| {load:.1f} | {n} | {fifo['p95_by_solver_s'][n]:.3f} | {edf['p95_by_solver_s'][n]:.3f} | "
                         f"{edf['p95_by_solver_s'][n] / fifo['p95_by_solver_s'][n]:.2f} | "
                         f"{fifo['p99_by_solver_s'][n]:.3f} | {edf['p99_by_solver_s'][n]:.3f} | "
                         f"{edf['p99_by_solver_s'][n] / fifo['p99_by_solver_s'][n]:.2f} | "
                         f"{fifo['max_wait_by_solver_s'][n]:.3f} | {edf['max_wait_by_solver_s'][n]:.3f} |")
    failed = sum(p["failed"] for p in adm["points"])
    lines += ["", f"Failed requests: {failed}.", ADMISSION_END, ""]
    return "\n".join(lines)


def plot(results: list[dict], path: str = PLOT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3.6 * len(results)), dpi=110, squeeze=False)
    for row, r in zip(axes, results):
        base = r["offline"]["mix_img_per_s"]
        for scheduler in SCHEDULERS:
            pts = sorted((p["load"], p) for p in r["points"] if p["scheduler"] == scheduler)
            if not pts:
                continue
            row[0].plot([lo for lo, _ in pts], [p["throughput_per_s"] / base for _, p in pts], marker="o", label=scheduler)
            row[1].plot([lo for lo, _ in pts], [p["p95_s"] for _, p in pts], marker="o", label=scheduler)
        row[0].axhline(1.0, color="grey", linestyle="--", linewidth=1, label="offline sample")
        row[0].set_ylabel("throughput / offline")
        row[1].set_ylabel("p95 latency (s)")
        row[1].set_yscale("log")
        for ax in row:
            ax.set_xlabel("offered load (fraction of offline throughput)")
            ax.set_title(f"{r['model']}, batch limit {r['batch']}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None) -> list:
    from benchmarks.precision import cpu_info
    from edm_deploy.loading import load

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,cifar10", help="comma-separated: digits, cifar10")
    parser.add_argument("--ckpt", default=None, help="trained digits checkpoint (default: the demo's, else train one)")
    parser.add_argument("--digits-batch", type=int, default=64)
    parser.add_argument("--cifar-batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each load point (offered requests = rate x seconds)")
    parser.add_argument("--soak", type=float, default=600.0, help="soak seconds at 90 %% load on the digits model (0: none)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loads", default=",".join(map(str, LOADS)), help="offered loads, fractions of the offline rate")
    parser.add_argument("--quick", action="store_true", help="short points, no CIFAR, a 20 s soak; results not written")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated parts to run: {', '.join(PARTS)} (a partial run rewrites only its own "
                             "subsections of the serving section)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the admission comparison")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    loads = sorted(float(v) for v in args.loads.split(",") if v.strip())
    if args.quick:
        models, args.seconds, args.soak, args.repeats, args.no_write = ["digits"], 4.0, 20.0, 2, True
    cpu = cpu_info()
    print(f"CPU: {cpu['model']} ({cpu['logical_cpus']} logical CPUs)")
    results = []
    with tempfile.TemporaryDirectory(prefix="edm-serving-") as tmp:
        for name in models:
            batch = args.digits_batch if name == "digits" else args.cifar_batch
            path = digits_model(tmp, batch, args.ckpt, print) if name == "digits" else cifar_model(tmp, batch)
            seconds = args.seconds if name == "digits" else 3 * args.seconds
            with load(path) as den:
                results.append(bench_model(name, den, batch, loads, lambda rate, s=seconds: max(20, int(rate * s)),
                                           args.repeats, args.soak if name == "digits" else 0.0, print,
                                           parts, args.rounds))
    for line in verdicts(results):
        print(line)
    full = set(parts) == set(PARTS)
    if not args.no_write and full:
        replace_section(markdown(results, cpu), BEGIN, END)
        plot(results)
        print(f"wrote {RESULTS_MD} (section) and {PLOT}")
    elif not args.no_write:
        for r in results:
            if "admission" in r:
                replace_section(admission_markdown(r, cpu), ADMISSION_BEGIN, ADMISSION_END)
        print(f"wrote {RESULTS_MD} (the subsections of: {', '.join(parts)})")
    name = "serving" if full else "serving-" + "-".join(parts)
    print(f"saved {save(name, {'results': results, 'cpu': cpu})}")
    return results


if __name__ == "__main__":
    main()
