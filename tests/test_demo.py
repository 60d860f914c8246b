"""The main job end to end, shortened: train briefly, export, grid, report; then resume is a no-op."""

from __future__ import annotations

import json
import os

from tests.conftest import requires_onnx, requires_torch, run_cli

pytestmark = [requires_torch, requires_onnx]


def test_shortened_demo_end_to_end_and_resume(tmp_path, cli_env):
    out = tmp_path / "demo"
    args = ["demo", "--outdir", str(out), "--kimg", "0.5", "--tune-kimg", "0.3", "--per-class", "3"]
    res = run_cli(args, env=cli_env, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("grid.png", "report.md", "report.json", "model.onnx", "model-fp16.onnx", "model-int8.onnx",
                 "model-consistency.onnx", "schedule-ipndm-nfe4.json", os.path.join("train", "ckpt.pt"),
                 os.path.join("consistency", "ckpt.pt")):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert report["nfe"] == 35 and report["classifier_test_accuracy"] > 0.95
    assert report["fast"]["solver"] == "ipndm" and report["fast"]["nfe"] == 5 and report["fast"]["img_per_s"] > 0
    assert report["searched"]["nfe"] == 4 and len(report["searched"]["sigmas"]) == 5
    assert "ipndm at NFE 5" in (out / "report.md").read_text() and "searched schedule" in (out / "report.md").read_text()
    for nfe in (1, 2):
        c = report[f"consistency_nfe{nfe}"]
        assert len(c["sigmas"]) == nfe and 0 <= c["accuracy"] <= 1 and c["img_per_s"] > 0
        assert f"consistency-tuned (ECT) at NFE {nfe}" in (out / "report.md").read_text()
    for precision in ("fp32", "fp16", "int8"):
        r = report[precision]
        assert len(r["per_class"]) == 10 and 0 <= r["accuracy"] <= 1 and r["img_per_s"] > 0
    assert report["fd_train_test"] > 0
    assert "classifier accuracy" in res.stdout and "Fréchet distance" in res.stdout
    from PIL import Image

    grid = Image.open(out / "grid.png")
    assert grid.size[0] >= 10 * 8 * 4 and grid.size[1] >= 10 * 8 * 4
    # A second run finds every step complete and only re-scores.
    res = run_cli(args, env=cli_env, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already done" in res.stdout and "up to date" in res.stdout
    assert "consistency tuning: already done" in res.stdout
    assert json.loads((out / "report.json").read_text())["searched"]["sigmas"] == report["searched"]["sigmas"]


def test_demo_lengths_must_be_finite_and_positive(tmp_path):
    for flag in ("--kimg", "--tune-kimg"):
        for value in ("nan", "inf", "0"):
            res = run_cli(["demo", "--outdir", str(tmp_path / "d"), flag, value])
            assert res.returncode != 0 and "Traceback" not in res.stderr
            assert f"Invalid value for '{flag}'" in res.stderr, res.stderr
    assert not (tmp_path / "d").exists()  # refused before anything is written
