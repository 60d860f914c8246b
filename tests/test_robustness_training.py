"""Training and checkpoints under bad input: every value checked at the boundary, diverged runs stop
with the last finite resume point intact, one writer per run folder, no output onto an input, and
messages about unreadable checkpoints that say what is wrong with the file (never torch's advice
to load it unsafely)."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from edm_deploy.runtime.core.errors import InputError, NumericalError  # noqa: E402
from edm_deploy.training import training_loop as TL  # noqa: E402
from edm_deploy.training.checkpoint import load_checkpoint  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.test_training import _cli_error, micro  # noqa: E402

FLOAT_FIELDS = ["duration_kimg", "lr", "lr_rampup_kimg", "ema_halflife_kimg", "ema_rampup_ratio", "dropout",
                "augment", "loss_scaling", "kimg_per_tick", "snapshot_kimg", "ckpt_kimg"]


def _all_finite(path: str) -> bool:
    ckpt = load_checkpoint(path)
    tensors = list(ckpt["ema"].values())
    if ckpt["training_state"] is not None:
        tensors += list(ckpt["training_state"]["net"].values())
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


# ----------------------------------------------------------------------------------------------
# Values nobody checked.


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_every_float_option_must_be_finite(name, value):
    with pytest.raises(InputError, match=f"^{name} must be a finite number") as info:
        TL.check_options(micro(**{name: value}))
    assert info.value.param == name and "\n" not in str(info.value)


def test_integer_options_and_threads_are_bounded():
    for name, value in (("batch", 0), ("batch", 2.5), ("batch_gpu", 0), ("cbase", True), ("max_images", -3),
                        ("threads", 0), ("seed", "1")):
        with pytest.raises(InputError, match=f"^{name} must be an integer"):
            TL.check_options(micro(**{name: value}))
    with pytest.raises(InputError, match=r"threads must be at most \d+ \(the CPUs"):
        TL.check_options(micro(threads=100000))
    TL.check_options(micro(threads=TL.cpu_count()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is real on CUDA")
def test_fp16_without_cuda_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(InputError, match="fp16 needs a CUDA device") as info:
        TL.training_loop(micro(outdir=str(out), fp16=True, duration_kimg=0.016), echo=None, progress=False)
    assert info.value.param == "fp16"
    assert not out.exists()


def test_train_cli_refuses_bad_values_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--data", "digits", "--outdir", str(out), "--no-progress"]
    for args, match in ((["--duration", "inf"], "--duration must be a finite number"),
                        (["--lr", "nan"], "--lr must be a finite number"),
                        (["--ema", "-inf"], "--ema must be a finite number"),
                        (["--threads", "100000"], "--threads must be at most"),
                        (["--dropout", "1"], "--dropout must be a probability")):
        assert match in _cli_error(capsys, base + args)
    if not torch.cuda.is_available():
        assert "--fp16 needs a CUDA device" in _cli_error(capsys, base + ["--fp16"])
    # A resumed run keeps its stored options: a preset given with --resume would be ignored.
    message = _cli_error(capsys, ["train", "--outdir", str(out), "--resume", str(tmp_path / "x" / "ckpt.pt"),
                                  "--preset", "cifar10"])
    assert "--preset cannot be combined with --resume" in message
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# A run that diverges.


def test_a_diverging_run_stops_and_keeps_the_last_finite_resume_point(tmp_path, monkeypatch):
    # Resume points every 16 images; from the 4th step on the loss is NaN (and the weights follow).
    real = TL.make_loss
    calls = {"n": 0}

    def poisoned(precond):
        inner = real(precond)

        def loss(**kw):
            calls["n"] += 1
            value = inner(**kw)
            return value * float("nan") if calls["n"] >= 4 else value

        return loss

    monkeypatch.setattr(TL, "make_loss", poisoned)
    out = str(tmp_path / "run")
    ckpt = os.path.join(out, "ckpt.pt")
    with pytest.raises(NumericalError) as info:
        TL.training_loop(micro(outdir=out, duration_kimg=0.016 * 6, kimg_per_tick=0.016, snapshot_kimg=0.016),
                         echo=None, progress=False)
    message = str(info.value)
    assert "diverged at 0.064 kimg" in message and "nan" in message and f"{ckpt} at 0.048 kimg" in message
    assert load_checkpoint(ckpt)["training_state"]["cur_nimg"] == 48
    snapshots = sorted(f for f in os.listdir(out) if f.endswith(".pt"))
    assert len(snapshots) == 4 and all(_all_finite(os.path.join(out, f)) for f in snapshots)
    assert "error: training diverged" in open(os.path.join(out, "log.txt")).read()


def test_cli_lr_1e10_exits_non_zero_without_a_nan_checkpoint(tmp_path, cli_env):
    from tests.conftest import run_cli

    out = tmp_path / "run"
    res = run_cli(["train", "--data", "digits", "--outdir", str(out), "--cond", "--cbase", "16", "--cres", "1",
                   "--batch", "16", "--duration", "0.128", "--tick", "0.016", "--snap-kimg", "0.016",
                   "--augment", "0", "--dropout", "0", "--max-images", "32", "--lr", "1e10", "--lr-rampup", "0",
                   "--threads", "1", "--no-progress"], env=cli_env, timeout=300)
    assert res.returncode == 1, (res.stdout, res.stderr)
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: training diverged") and "Traceback" not in res.stderr
    for name in os.listdir(out):
        if name.endswith(".pt"):
            assert _all_finite(str(out / name)), name


# ----------------------------------------------------------------------------------------------
# One writer per run folder, and no output onto an input.

_HOLD = """
import sys, time
from edm_deploy.runtime.core.fileio import exclusive_output
with exclusive_output(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_run_into_a_busy_folder_is_refused(tmp_path, cli_env):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              env=cli_env, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(os.listdir(out))
        with pytest.raises(InputError, match="another edm-deploy process is writing"):
            TL.training_loop(micro(outdir=str(out), duration_kimg=0.016), echo=None, progress=False)
        assert sorted(os.listdir(out)) == before  # no log line, no options file from the refused run
    finally:
        holder.kill()
        holder.wait()
    # Once the first writer is gone the folder is free again.
    TL.training_loop(micro(outdir=str(out), duration_kimg=0.016), echo=None, progress=False)
    assert os.path.exists(out / "ckpt.pt")


def test_run_files_never_replace_an_input(tmp_path):
    from edm_deploy.training.dataset import write_dataset_zip

    data = str(tmp_path / "digits.zip")
    write_dataset_zip("digits", data, max_images=20)
    before = open(data, "rb").read()
    out = tmp_path / "run"
    out.mkdir()
    (out / "stats.jsonl").symlink_to(data)
    with pytest.raises(InputError, match="stats.jsonl .* would overwrite data"):
        TL.training_loop(micro(data=data, cond=False, outdir=str(out), duration_kimg=0.016), echo=None,
                         progress=False)
    assert open(data, "rb").read() == before and sorted(os.listdir(out)) == ["stats.jsonl"]


# ----------------------------------------------------------------------------------------------
# Unreadable checkpoints: the message says what is wrong with the file.


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def _bad_checkpoints(tmp_path) -> dict:
    good = io.BytesIO()
    torch.save({"a": torch.ones(3)}, good)
    hostile = io.BytesIO()
    torch.save({"format": "edm-deploy-checkpoint", "payload": _RunsCode()}, hostile)
    files = {
        "random": os.urandom(5000),
        "text": b"hello, this is text\n",
        "truncated": good.getvalue()[:200],
        "hostile": hostile.getvalue(),
        "plain-pickle": pickle.dumps({"a": 1}, protocol=4),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = str(tmp_path / f"{name}.pt")
        with open(paths[name], "wb") as f:
            f.write(data)
    return paths


def test_unreadable_checkpoints_say_what_is_wrong(tmp_path):
    for name, path in _bad_checkpoints(tmp_path).items():
        with pytest.raises(InputError) as info:
            load_checkpoint(path)
        message = str(info.value)
        assert message.startswith(f"{path} is not a readable edm-deploy checkpoint: "), message
        assert "weights_only" not in message and "\n" not in message and len(message) < 400, message
        if name == "hostile":
            assert f"{os.system.__module__}.system" in message and "nothing from the file ran" in message
        if name in ("random", "text"):
            assert "not a torch.save file" in message


def test_cli_never_passes_on_torchs_unsafe_advice(tmp_path, capsys):
    from edm_deploy.cli import main

    for path in _bad_checkpoints(tmp_path).values():
        for args in (["info", path], ["verify", str(tmp_path / "m.onnx"), "--against", path]):
            with pytest.raises(SystemExit) as exc:
                main(args)
            assert exc.value.code == 1
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("error:") and "weights_only" not in err[0], (args, err)


def test_a_finished_run_releases_its_folder(tmp_path):
    out = str(tmp_path / "run")
    TL.training_loop(micro(outdir=out, duration_kimg=0.016), echo=None, progress=False)
    res = TL.training_loop(micro(outdir=out, duration_kimg=0.032, resume=os.path.join(out, "ckpt.pt")),
                           echo=None, progress=False)
    assert res.cur_nimg == 32
