"""Batch invariance on the trained digits model: how often an image depends on its batch, and
what `--fixed-batch` (the network always sees N rows per call) costs.

On the demo's digits model exported to fp32 ONNX (onnxruntime CPU), 1000 seeds are sampled
(Heun, 18 steps) at several batch sizes; the benchmark counts images that differ from the batch-64
run (any pixel), then repeats with `FixedShapeDenoiser(den, 64)`, and times each run interleaved.
The fixed shape costs the padded rows: nothing when the batch is a multiple of N.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from benchmarks.common import save, table


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="trained digits checkpoint [default: the demo's, else train one]")
    parser.add_argument("--seeds", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=64, help="the fixed batch N")
    parser.add_argument("--batches", default="64,1,7,50,100")
    args = parser.parse_args(argv)

    from benchmarks.precision import digits_checkpoint
    from edm_deploy.export.pipeline import export_checkpoint
    from edm_deploy.loading import load
    from edm_deploy.runtime.sampling.fixed_shape import FixedShapeDenoiser
    from edm_deploy.runtime.sampling.generate import generate

    ckpt = digits_checkpoint(args.ckpt, print)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="edm-invariance-") as workdir:
        path = export_checkpoint(ckpt, os.path.join(workdir, "m.onnx"), max_batch=1000, verify=False).path
        with load(path, device="cpu") as den:
            fixed = FixedShapeDenoiser(den, args.rows)
            results = {}
            for batch in batches:
                for name, model in (("plain", den), (f"fixed {args.rows}", fixed)):
                    start = time.perf_counter()
                    images = generate(model, range(args.seeds), batch_size=batch, num_steps=18)
                    results[(name, batch)] = (images, time.perf_counter() - start)
    for (name, batch), (images, wall) in results.items():
        ref_images, ref_wall = results[(name, batches[0])]
        differ = int((images != ref_images).reshape(len(images), -1).any(axis=1).sum())
        plain_wall = results[("plain", batch)][1]
        rows.append([name, batch, differ, round(args.seeds / wall, 1), round(wall / plain_wall, 3)])
    header = ["network calls", "--batch", f"images differing from --batch {batches[0]}", "img/s", "time / plain"]
    print(table(rows, header))
    payload = {"ckpt": ckpt, "seeds": args.seeds, "rows_fixed": args.rows,
               "cases": [dict(zip(["mode", "batch", "differing", "img_per_s", "time_ratio"], r)) for r in rows]}
    print("saved", save("batch_invariance", payload))
    return payload


if __name__ == "__main__":
    main()
