"""`python -m benchmarks` (`make bench`): every CPU benchmark in sequence.

The GPU benchmark is separate (`benchmarks/gpu.sh`) because it needs a CUDA machine.
"""

from __future__ import annotations

import sys

from benchmarks import backends_cpu, sample_scale, sampler_overhead


def main() -> None:
    quick = "--quick" in sys.argv
    print("== sampler overhead ==")
    sampler_overhead.main(["--repeats", "3"] + (["--skip-network"] if quick else []))
    print("\n== CPU backends: onnxruntime vs torch eager vs torch.compile ==")
    backends_cpu.main(["--repeats", "3"] + (["--no-compile", "--skip-cifar"] if quick else []))
    print("\n== sample at scale: memory and overhead ==")
    sample_scale.main(["--large", "5000"] if quick else [])


if __name__ == "__main__":
    main()
