"""Shared pytest fixtures and skips."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


requires_torch = pytest.mark.skipif(not has_module("torch"), reason="torch is not installed")
requires_onnx = pytest.mark.skipif(
    not (has_module("onnx") and has_module("onnxruntime")), reason="onnx/onnxruntime are not installed"
)


@pytest.fixture
def cli_env():
    """Environment for running the CLI in a subprocess with this interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(args, env=None, timeout=600, cwd=None):
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "edm_deploy.cli", *args],
        capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd,
    )


def run_main(args, capsys):
    """Run the CLI in-process (faster than a subprocess); return (exit code, stdout, stderr)."""
    from edm_deploy.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(code, err) -> str:
    """The single `error:` line of a refused command (exit 1, no traceback); fails otherwise."""
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]
