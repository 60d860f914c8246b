"""The README's embedding example runs as written (on a small exported model)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO, requires_onnx, requires_torch


@requires_torch
@requires_onnx
def test_readme_embedding_example_runs(tmp_path):
    from edm_deploy.export.onnx_export import export_onnx
    from tests.factories import tiny_network

    net, network = tiny_network("ddpmpp")
    model = tmp_path / "model.onnx"
    export_onnx(net, network, str(model), max_batch=16)
    readme = open(f"{REPO}/README.md", encoding="utf-8").read()
    block = re.search(r"## Embedding API\s+```python\n(.*?)```", readme, re.S).group(1)
    assert len(block.strip().splitlines()) <= 12
    code = block.replace('"demo/model.onnx"', repr(str(model)))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "(16, 8, 8, 1) uint8"
    assert lines[1] == "(2, 1, 8, 8) float64"


def test_readme_gives_the_two_commands():
    readme = open(f"{REPO}/README.md", encoding="utf-8").read()
    assert "make demo" in readme and "make test" in readme
