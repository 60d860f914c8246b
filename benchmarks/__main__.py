"""`python -m benchmarks` (`make bench`): every CPU benchmark in sequence (`--quick` for a short pass).

The GPU benchmark is separate (`benchmarks/gpu.sh`) because it needs a CUDA machine. The digits
benchmarks (precision, solvers, guidance, consistency) reuse the demo's trained model when `make
demo` has run, and train one otherwise (~2.5 min on an idle 2-core CPU); the consistency
benchmark tunes it (its run is kept in benchmarks/results/consistency-digits and resumes).
"""

from __future__ import annotations

import sys

from benchmarks import (
    backends_cpu,
    batch_invariance,
    consistency,
    guidance,
    precision,
    sample_scale,
    sampler_overhead,
    serving,
    solvers,
)


def main() -> None:
    quick = "--quick" in sys.argv
    print("== sampler overhead ==")
    sampler_overhead.main(["--repeats", "3"] + (["--skip-network"] if quick else []))
    print("\n== CPU backends: onnxruntime vs torch eager vs torch.compile ==")
    backends_cpu.main(["--repeats", "3"] + (["--no-compile", "--skip-cifar"] if quick else []))
    print("\n== sample at scale: memory and overhead ==")
    sample_scale.main(["--large", "5000"] if quick else [])
    print("\n== precision: int8 and bf16 against fp32 (speed on CIFAR-10 DDPM++, quality on the digits) ==")
    precision.main(["--repeats", "3"] + (["--batches", "8", "--per-class", "20"] if quick else []))
    print("\n== solvers x NFE on the digits ==")
    solvers.main(["--nfes", "4,5,35", "--searched-nfes", "4", "--per-class", "20", "--no-write"] if quick else [])
    print("\n== batch invariance and the cost of --fixed-batch ==")
    batch_invariance.main(["--seeds", "200"] if quick else [])
    print("\n== guidance on the digits ==")
    guidance.main(["--per-class", "20", "--no-write"] if quick else [])
    print("\n== serving: continuous batching against request-level and one-request scheduling ==")
    serving.main(["--quick"] if quick else [])
    print("\n== consistency tuning (ECT) on the digits: NFE 1-3 against the teacher's solvers ==")
    consistency.main(["--quick"] if quick else [])


if __name__ == "__main__":
    main()
