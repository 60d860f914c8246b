"""Only an artifact that passed its checks ever holds the final name (issue: unverified or failed
artifacts under the final name), and interrupted exports leave nothing hidden behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from tests.conftest import REPO, requires_onnx, requires_torch, run_cli

pytestmark = [requires_torch, requires_onnx]


def _hidden(folder) -> list[str]:
    return [f for f in os.listdir(folder) if f.startswith(".") and not f.endswith(".lock")]


def test_failed_verification_keeps_nothing_under_the_final_name(tmp_path, monkeypatch):
    from edm_deploy.commands.export import export
    from edm_deploy.export import verify as verify_module
    from tests.factories import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "ckpt.pt")
    real = verify_module.verify_artifact

    def failing(*args, **kwargs):
        report = real(*args, **kwargs)
        report.failures.append("planted failure")
        return report

    monkeypatch.setattr(verify_module, "verify_artifact", failing)
    result = CliRunner().invoke(export, [ckpt, "--format", "onnx"])
    assert result.exit_code != 0 and "verification of" in str(result.exception)
    assert not (tmp_path / "ckpt.onnx").exists()
    assert (tmp_path / "ckpt.failed.onnx").exists()
    assert _hidden(tmp_path) == []


def test_an_export_killed_during_verification_leaves_no_final_file_and_the_next_one_cleans_up(tmp_path, cli_env):
    from tests.factories import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "ckpt.pt", model_channels=32)
    staging = tmp_path / ".tmp-export-ckpt.onnx.partial"
    proc = subprocess.Popen([sys.executable, "-m", "edm_deploy.cli", "export", ckpt, "--format", "onnx"],
                            env=cli_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (staging / "ckpt.onnx").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "ckpt.onnx").exists()  # killed before or while verifying: no final file
    res = run_cli(["export", ckpt, "--format", "onnx"], env=cli_env)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "ckpt.onnx").exists() and "verified" in res.stdout
    assert _hidden(tmp_path) == []  # the killed run's staging folder is gone


def test_sigterm_unwinds_and_removes_the_staging_folder(tmp_path, cli_env):
    from tests.factories import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "ckpt.pt", model_channels=32)
    staging = tmp_path / ".tmp-export-ckpt.onnx.partial"
    proc = subprocess.Popen([sys.executable, "-m", "edm_deploy.cli", "export", ckpt, "--format", "onnx"],
                            env=cli_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not staging.exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert not (tmp_path / "ckpt.onnx").exists() and _hidden(tmp_path) == []


@pytest.mark.parametrize("args,match", [
    (["--max-batch", "100000000"], "--max-batch"),
    (["--out", "x.txt"], "--out must end in"),
    (["--opt-batch", "65", "--max-batch", "64"], "--opt-batch"),
])
def test_export_values_are_checked_before_any_work(tmp_path, cli_env, args, match):
    from tests.factories import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "ckpt.pt")
    res = run_cli(["export", ckpt, "--format", "onnx", *[a if a != "x.txt" else str(tmp_path / a) for a in args]],
                  env=cli_env, timeout=120)
    assert res.returncode != 0 and match in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_export_never_writes_onto_its_input(tmp_path, cli_env):
    from tests.factories import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "ckpt.pt")
    onnx = tmp_path / "m.onnx"
    assert run_cli(["export", ckpt, "--format", "onnx", "--out", str(onnx)], env=cli_env).returncode == 0
    cache = tmp_path / "m.plan"
    cache.write_bytes(b"timing cache")
    res = run_cli(["export", ckpt, "--format", "onnx", "--out", str(tmp_path / "link.onnx")], env=cli_env)
    assert res.returncode == 0
    os.symlink(ckpt, tmp_path / "evil.onnx")
    res = run_cli(["export", ckpt, "--format", "onnx", "--out", str(tmp_path / "evil.onnx")], env=cli_env)
    assert res.returncode == 1 and "would overwrite MODEL" in res.stderr
    assert open(ckpt, "rb").read(2) == b"PK"  # the checkpoint is intact


def test_int8_export_from_the_cli_is_verified_and_says_how_it_was_calibrated(tmp_path, cli_env):
    from tests.factories import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "ckpt.pt")
    res = run_cli(["export", ckpt, "--format", "onnx", "--int8", "--calib-images", "4", "--calib-steps", "6"],
                  env=cli_env, timeout=600)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "ckpt-int8.onnx"
    assert out.exists() and "verified" in res.stdout and "max deriv err" in res.stdout
    info = run_cli(["info", str(out)], env=cli_env)
    assert "int8" in info.stdout and "calibrated" in info.stdout, info.stdout
    res = run_cli(["sample", str(out), "-n", "4", "--steps", "4", "--grid", str(tmp_path / "g.png")], env=cli_env)
    assert res.returncode == 0, res.stderr
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize("args,match", [
    (["--int8", "--fp16"], "exclude each other"),
    (["--calib-images", "4"], "apply to --int8"),
    (["--int8", "--calib-images", "0"], "--calib-images"),
    (["--int8", "--calib-method", "magic"], "--calib-method"),
    (["--int8", "--calib-data", "no-such-dataset"], "dataset not found"),
])
def test_int8_option_errors_are_one_line_and_write_nothing(tmp_path, cli_env, args, match):
    from tests.factories import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "ckpt.pt")
    res = run_cli(["export", ckpt, "--format", "onnx", *args], env=cli_env, timeout=300)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 1 and len(errors) == 1 and match in errors[0], res.stderr
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"] or all(f.endswith(".lock") or f == "ckpt.pt"
                                                            for f in os.listdir(tmp_path))


def test_the_library_names_parameters_and_the_cli_names_flags(tmp_path, cli_env):
    from edm_deploy.export.onnx_export import export_onnx
    from edm_deploy.runtime.core.errors import InputError
    from tests.factories import tiny_checkpoint, tiny_network

    net, network = tiny_network("ddpmpp")
    with pytest.raises(InputError, match="^max_batch must be >= 1") as info:
        export_onnx(net, network, str(tmp_path / "m.onnx"), max_batch=0)
    assert info.value.param == "max_batch"
    ckpt = tiny_checkpoint(tmp_path / "ckpt.pt")
    res = run_cli(["export", ckpt, "--format", "onnx", "--out", str(tmp_path / "m.plan")], env=cli_env)
    assert res.returncode == 1 and "names an engine, but no engine is built here" in res.stderr
