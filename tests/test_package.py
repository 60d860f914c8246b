"""Packaging promises: torch-free runtime, CLI help/version everywhere, one-line errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from edm_deploy.cli import COMMANDS
from tests.conftest import REPO, run_cli

BLOCK_TORCH = textwrap.dedent(
    """
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None
    sys.meta_path.insert(0, Block())
    """
)


def test_runtime_and_sampler_work_without_torch():
    code = BLOCK_TORCH + textwrap.dedent(
        """
        import numpy as np
        import edm_deploy, edm_deploy.runtime as rt
        den = rt.GaussianDenoiser(1, 8)
        rnd = rt.StackedRandomGenerator(range(3))
        out = rt.edm_sampler(den, rnd.randn((1, 8, 8)), randn_like=rnd.randn_like, num_steps=8, S_churn=5)
        assert out.shape == (3, 1, 8, 8) and np.isfinite(out).all()
        from edm_deploy.runtime.sampling.generate import generate
        imgs = generate(den, seeds=[0, 1], num_steps=4)
        assert imgs.dtype == np.uint8 and imgs.shape == (2, 8, 8, 1)
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_version_and_top_level_help(cli_env):
    res = run_cli(["--version"], env=cli_env)
    assert res.returncode == 0 and "edm-deploy" in res.stdout
    res = run_cli(["--help"], env=cli_env)
    assert res.returncode == 0
    for name in COMMANDS:
        assert name in res.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name, cli_env):
    res = run_cli([name, "--help"], env=cli_env)
    assert res.returncode == 0, res.stderr
    assert "Usage:" in res.stdout and "Example" in res.stdout


def test_unknown_command_is_one_clean_error(cli_env):
    res = run_cli(["frobnicate"], env=cli_env)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
