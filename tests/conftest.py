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


def run_cli(args, env=None, timeout=600, cwd=None, isolated=False):
    """Run `edm-deploy ARGS` and return a CompletedProcess (returncode, stdout, stderr).

    In this process by default: the same `cli.main` a console run calls, with `env` and `cwd`
    applied for the call, standard output and error captured; a subprocess costs an interpreter
    and a torch import per call. ``isolated=True`` runs a real process, for what only a process
    shows (signals, a kill, the imports of a fresh interpreter, file locks held by another process).
    """
    import subprocess

    if isolated:
        return subprocess.run([sys.executable, "-m", "edm_deploy.cli", *args], capture_output=True, text=True, env=env,
                              timeout=timeout, cwd=cwd)
    return _run_in_process([str(a) for a in args], env, cwd)


def _run_in_process(args, env, cwd):
    import contextlib
    import io
    import signal
    import subprocess

    from edm_deploy.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    saved_sigterm = signal.getsignal(signal.SIGTERM)
    code = 0
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                result = main(args)
                code = result if isinstance(result, int) else 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        signal.signal(signal.SIGTERM, saved_sigterm)
    return subprocess.CompletedProcess(["edm-deploy", *args], code, out.getvalue(), err.getvalue())


def run_main(args, capsys=None):
    """The CLI in this process as (exit code, stdout, stderr): `run_cli` for tests that unpack the three."""
    res = run_cli(args)
    return res.returncode, res.stdout, res.stderr


def one_error_line(code, err) -> str:
    """The single `error:` line of a refused command (exit 1, no traceback); fails otherwise."""
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]
