"""Resume points on a clock as well as by kimg, and a resume that has nothing left to train."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from edm_deploy.runtime.core.errors import InputError  # noqa: E402
from edm_deploy.training import training_loop as TL  # noqa: E402
from edm_deploy.training.checkpoint import load_checkpoint  # noqa: E402
from tests.test_training import _cli_error, _equal_states, interrupt_on_loss_call, micro  # noqa: E402

# A tick every step, snapshots (and so kimg-based resume points) far beyond the run.
CLOCKED = dict(duration_kimg=0.016 * 6, kimg_per_tick=0.016, snapshot_kimg=100)


def test_resume_points_on_a_clock_survive_a_kill_and_resume_exactly(tmp_path, monkeypatch):
    full = TL.training_loop(micro(outdir=str(tmp_path / "full"), **CLOCKED), echo=None, progress=False)
    interrupt_on_loss_call(monkeypatch, 4)
    by_kimg = str(tmp_path / "by_kimg")
    with pytest.raises(KeyboardInterrupt):
        TL.training_loop(micro(outdir=by_kimg, ckpt_seconds=0, **CLOCKED), echo=None, progress=False)
    assert not os.path.exists(os.path.join(by_kimg, "ckpt.pt"))  # by kimg only: nothing to resume from
    interrupt_on_loss_call(monkeypatch, 4)
    clocked = str(tmp_path / "clocked")
    with pytest.raises(KeyboardInterrupt):
        TL.training_loop(micro(outdir=clocked, ckpt_seconds=1e-9, **CLOCKED), echo=None, progress=False)
    ckpt = os.path.join(clocked, "ckpt.pt")
    assert load_checkpoint(ckpt)["training_state"]["cur_nimg"] == 48  # the last tick before the kill
    monkeypatch.undo()
    resumed = TL.training_loop(TL.resume_options(ckpt), echo=None, progress=False)
    assert _equal_states(full.net.state_dict(), resumed.net.state_dict())
    assert _equal_states(full.ema.state_dict(), resumed.ema.state_dict())


def test_ckpt_seconds_is_checked_and_may_change_on_resume():
    with pytest.raises(InputError, match="ckpt_seconds must be a non-negative number of seconds"):
        TL.check_options(micro(ckpt_seconds=-1))
    assert "ckpt_seconds" in TL.RESUME_MUTABLE
    assert TL.options_from_preset("tiny").ckpt_seconds == 30  # the demo's run keeps a resume point every ~30 s


def test_a_resume_with_nothing_left_to_train(tmp_path, capsys):
    run = str(tmp_path / "run")
    TL.training_loop(micro(outdir=run, duration_kimg=0.032), echo=None, progress=False)
    ckpt = os.path.join(run, "ckpt.pt")
    stamp = os.path.getmtime(ckpt)
    # Into a new folder: refused, since the user asked for a run there and it would stay empty.
    new = str(tmp_path / "new")
    with pytest.raises(InputError, match=r"already at 0.032 kimg, which reaches duration_kimg 0.032: resuming into "
                                         r".*new would train nothing") as info:
        TL.training_loop(TL.resume_options(ckpt, outdir=new), echo=None, progress=False)
    assert info.value.param == "duration_kimg" and not os.path.exists(new)
    message = _cli_error(capsys, ["train", "--resume", ckpt, "--outdir", new, "--duration", "0.016", "--no-progress"])
    assert "beyond --duration 0.016" in message and "give more than 0.032 kimg to continue it" in message
    assert not os.path.exists(new)
    # Into its own folder: the finished run is there already; nothing is written.
    res = TL.training_loop(TL.resume_options(ckpt, outdir=run), echo=None, progress=False)
    assert res.cur_nimg == 32 and os.path.getmtime(ckpt) == stamp
    # With something left to train, the new folder gets the continued run.
    res = TL.training_loop(TL.resume_options(ckpt, outdir=new, duration_kimg=0.048), echo=None, progress=False)
    assert load_checkpoint(os.path.join(new, "ckpt.pt"))["training_state"]["cur_nimg"] == 48
