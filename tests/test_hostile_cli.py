"""The command line and the library under a hostile sweep, one test per class of failure: a small
file that asks for gigabytes, outputs written over files edm-deploy did not write, inputs that
silently mean something else, damaged or altered models taken as whole, and messages that
point away from the cause."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import resource
import threading

import numpy as np
import pytest

from edm_deploy.runtime.core.errors import InputError
from tests.conftest import has_module, requires_onnx, requires_torch, run_cli


def _one_error_line(res) -> str:
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 1 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    return errors[0]


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    from tests.onnx_oracles import gaussian_onnx

    d = tmp_path_factory.mktemp("oracle")
    return {"uncond": gaussian_onnx(str(d / "g.onnx")), "cond": gaussian_onnx(str(d / "c.onnx"), label_dim=10)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    pytest.importorskip("torch")
    from tests.factories import tiny_checkpoint

    return tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "t.pt"))


def _tuned_onnx(source: str, path: str) -> str:
    """`source` with a consistency record in its manifest (a consistency-tuned model's manifest)."""
    import onnx

    from edm_deploy.runtime.core.manifest import ONNX_METADATA_KEY

    model = onnx.load(source)
    manifest = json.loads({p.key: p.value for p in model.metadata_props}[ONNX_METADATA_KEY])
    manifest["consistency"] = {"method": "ect", "from_checkpoint": "teacher.pt", "from_sha256": "0" * 64,
                               "from_kimg": 10}
    onnx.helper.set_model_props(model, {ONNX_METADATA_KEY: json.dumps(manifest)})
    onnx.save(model, path)
    return path


# -- 1. a description is bounded by the weights it comes with ---------------------------------------


@requires_torch
def test_a_network_described_beyond_its_weights_is_refused_before_it_is_built(ckpt, tmp_path, monkeypatch):
    import torch

    import edm_deploy.training.checkpoint as checkpoint
    from edm_deploy.loading import load, read_manifest

    stored = torch.load(ckpt, weights_only=True)
    cases = {"model_channels": 16384, "num_blocks": 10**6, "resample_filter": [1] * 10**5}
    for key, value in cases.items():
        forged = dict(stored, network={**stored["network"], "init_kwargs": {**stored["network"]["init_kwargs"],
                                                                              key: value}})
        path = str(tmp_path / f"{key}.pt")
        torch.save(forged, path)
        for read in (read_manifest, load):  # info, and sample / export / verify (they load it)
            with pytest.raises(InputError, match=f"{key}|do not fit|numbers"):
                read(path)

    # info states the model from its description alone: no weights are loaded into a network.
    def no_weights(*args, **kwargs):
        raise AssertionError("info built the network")

    monkeypatch.setattr(checkpoint, "load_weights", no_weights)
    manifest = read_manifest(ckpt)
    built = checkpoint.build_network(stored["network"])
    assert manifest["checkpoint"]["parameters"] == sum(p.numel() for p in built.parameters())
    assert manifest["img_resolution"] == 8 and manifest["label_dim"] == 10


# -- 2. nothing replaced that edm-deploy did not write ----------------------------------------------


@requires_onnx
def test_no_output_replaces_a_file_edm_deploy_did_not_write(oracle, tmp_path):
    from PIL import Image

    model = oracle["uncond"]
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(photo)
    victims = {name: tmp_path / name for name in ("victim.pt", "notes.json", "user.onnx", "user2.onnx.data")}
    for path in victims.values():
        path.write_bytes(b"the user's own bytes " * 10)
    before = {p: _sha(p) for p in [photo, *victims.values()]}
    cases = [
        (["bench", model, "--batch", "2", "--repeats", "1", "--no-sampling", "--json", victims["victim.pt"]], "--json"),
        (["sample", model, "-n", "2", "--grid", photo], "--grid"),
        (["schedule", model, "--nfe", "4", "--out", victims["notes.json"]], "--out"),
        (["schedule", model, "--solver", "consistency", "--nfe", "2", "--ref", tmp_path / "ref.npz", "--out",
          victims["notes.json"]], "--out"),
        (["convert", tmp_path / "missing.pkl", "--out", victims["victim.pt"]], "--out"),
    ]
    if has_module("torch"):
        from tests.factories import tiny_checkpoint

        pt = tiny_checkpoint(str(tmp_path / "user2.pt"))
        cases += [(["export", pt, "--format", "onnx", "--out", victims["user.onnx"]], "user.onnx"),
                  (["export", pt, "--format", "onnx", "--out", tmp_path / "user2.onnx"], "user2.onnx.data")]
    for args, named in cases:
        line = _one_error_line(run_cli(args))
        assert named in line and "not written" not in line and "that edm-deploy wrote" in line, line
    assert {p: _sha(p) for p in before} == before

    # What edm-deploy wrote itself, a rerun replaces.
    grid, report = tmp_path / "grid.png", tmp_path / "bench.json"
    for _ in range(2):
        assert run_cli(["sample", model, "-n", "2", "--steps", "2", "--grid", grid]).returncode == 0
        assert run_cli(["bench", model, "--batch", "2", "--repeats", "1", "--no-sampling", "--json", report]
                       ).returncode == 0
    assert json.loads(report.read_text())["format"] == "edm-deploy-bench"


# -- 3. nothing silently means something else -------------------------------------------------------


@requires_onnx
def test_inputs_that_would_mean_something_else_are_refused(oracle, tmp_path):
    model, cond = oracle["uncond"], oracle["cond"]
    refused = {
        ("sample", model, "--seeds", "٣", "--npz", tmp_path / "a.npz"): "seed list",
        ("sample", model, "-n", "٣", "--npz", tmp_path / "b.npz"): "ASCII",
        ("sample", cond, "--seeds", "1", "--class", "٣", "--npz", tmp_path / "c.npz"): "--class",
        ("sample", model, "--seeds", "1", "--shard", "٠/٢", "--npz", tmp_path / "d.npz"): "shard",
        ("sample", model, "-n", "2", "--guidance", "١", "--npz", tmp_path / "e.npz"): "ASCII",
        ("sample", model, "-n", "2", "--npz", tmp_path / "f.npz", "--grid-scale", "4"): "--grid-scale",
        ("sample", model, "-n", "2", "--outdir", tmp_path / "g", "--grid-cols", "2"): "--grid-cols",
        ("bench", model, "--solvers", "--max-error", "nan"): "--max-error",
        ("export", model, "--format", "trt", "--workspace", "nan"): "--workspace",
    }
    for args, named in refused.items():
        line = _one_error_line(run_cli(list(args)))
        assert named in line, (args, line)
    assert not any(tmp_path.iterdir())  # nothing was written


def test_the_python_api_checks_what_it_is_handed():
    from edm_deploy.runtime.serving import Engine, ImageRequest
    from tests.test_engine import Recording

    with Engine(Recording(), max_batch=8, max_images=4) as engine:
        with pytest.raises(InputError, match="at most 4 images"):
            engine.submit(request=ImageRequest(tuple(range(100))))  # built by hand: checked all the same
        with pytest.raises(InputError, match=r"settings must be .*\{'solver': 'ipndm'\}"):
            engine.submit([0], None, "ipndm")
        assert engine.submit(request=ImageRequest((0, 1), 2, engine.request([0]).settings)).result(60).seeds == [0, 1]


@requires_torch
def test_a_resume_below_the_length_already_trained_is_refused(tmp_path):
    from edm_deploy.training.options import TrainingOptions
    from edm_deploy.training.training_loop import _check_left_to_train

    resume = str(tmp_path / "run" / "ckpt.pt")
    state = {"training_state": {"cur_nimg": 5000, "options": {"duration_kimg": 10}}}
    for outdir in (tmp_path / "run", tmp_path / "other"):  # the run's own folder too: not a silent "done"
        with pytest.raises(InputError, match="already at 5 kimg.*cannot be made shorter"):
            _check_left_to_train(TrainingOptions(resume=resume, outdir=str(outdir), duration_kimg=2), state)
    finished = {"training_state": {"cur_nimg": 10016, "options": {"duration_kimg": 10}}}
    _check_left_to_train(TrainingOptions(resume=resume, outdir=str(tmp_path / "run"), duration_kimg=10), finished)


@requires_onnx
def test_warnings_say_when_the_images_will_be_poor(oracle, tmp_path):
    from edm_deploy.loading import load
    from edm_deploy.runtime.sampling.guidance import GuidedDenoiser
    from edm_deploy.runtime.sampling.schedule_search import model_warnings

    tuned_path = _tuned_onnx(oracle["uncond"], str(tmp_path / "tuned.onnx"))
    with load(tuned_path) as tuned, load(oracle["uncond"]) as plain:
        for den, guide, which in ((tuned, plain, "model is consistency-tuned"), (plain, tuned, "guide is consistency")):
            assert any(which in w for w in GuidedDenoiser(den, guide, 2.0).warnings)
        assert not GuidedDenoiser(plain, plain, 2.0).warnings
        assert "solver consistency" in model_warnings(tuned)[0] and not model_warnings(plain)
    res = run_cli(["schedule", tuned_path, "--nfe", "2", "--out", tmp_path / "s.json", "--latents", "2",
                   "--refine-latents", "0", "--no-check", "--fine-points", "5"])
    assert res.returncode == 0 and "consistency-tuned" in res.stderr and "--solver consistency --nfe 1" in res.stderr


@requires_torch
def test_fp16_on_a_cpu_is_a_warning_with_its_cost():
    from edm_deploy.runtime.backends.torch_backend import TorchDenoiser
    from tests.factories import tiny_network

    net, _ = tiny_network()
    with TorchDenoiser.from_module(net, device="cpu", fp16=True) as den:
        assert any("fp16 on a CPU" in w and "slower" in w for w in den.warnings)
    with TorchDenoiser.from_module(net, device="cpu") as den:
        assert not den.warnings


# -- 4. a damaged or altered model is not taken as whole --------------------------------------------


@requires_onnx
def test_a_damaged_or_altered_onnx_file_is_refused(oracle, tmp_path):
    import onnx

    from edm_deploy.export.onnx_export import embed_manifest
    from edm_deploy.loading import load, read_manifest
    from edm_deploy.runtime.core.manifest import ONNX_METADATA_KEY

    def manifest_of(model):
        return json.loads({p.key: p.value for p in model.metadata_props}[ONNX_METADATA_KEY])

    model = onnx.load(oracle["uncond"])
    embed_manifest(model, manifest_of(model))  # as an export writes it: with its content digest
    good = str(tmp_path / "good.onnx")
    onnx.save(model, good)
    with load(good) as den:
        assert den.manifest["content_sha256"]
    data = open(good, "rb").read()
    mu = np.float32(0.3).tobytes()
    assert data.count(mu) == 1
    flipped = tmp_path / "flipped.onnx"
    flipped.write_bytes(data.replace(mu, np.float32(0.30000004).tobytes()))  # one bit of one weight
    claims = dict(manifest_of(model), precision="fp16")
    altered = onnx.load(good)
    onnx.helper.set_model_props(altered, {ONNX_METADATA_KEY: json.dumps(claims)})
    onnx.save(altered, str(tmp_path / "altered.onnx"))
    for path in (flipped, tmp_path / "altered.onnx"):
        for read in (load, read_manifest):  # sample, serve, bench / info, export, verify
            with pytest.raises(InputError, match="damaged or was altered"):
                read(str(path))
    line = _one_error_line(run_cli(["sample", flipped, "-n", "1", "--npz", tmp_path / "x.npz"]))
    assert "flipped.onnx is damaged" in line

    # Without a digest (older files), the graph itself tells the precision; a name that is none is refused too.
    for precision, match in (("fp16", "says fp16, but the graph computes in fp32"), ("fast", "precision must be")):
        bare = onnx.load(oracle["uncond"])
        onnx.helper.set_model_props(bare, {ONNX_METADATA_KEY: json.dumps(dict(manifest_of(bare), precision=precision))})
        onnx.save(bare, str(tmp_path / "bare.onnx"))
        with pytest.raises(InputError, match=match):
            read_manifest(str(tmp_path / "bare.onnx"))


# -- 5. errors that point at the real cause ---------------------------------------------------------


def test_valid_json_beyond_what_is_read_is_not_called_invalid():
    from edm_deploy.runtime.core.jsonio import loads_bounded

    for text, match in (('{"a": 1' + "0" * 5000 + "}", "valid JSON, but its integer 1000"),
                        ('{"a": 1e400}', "valid JSON, but 1e400 is beyond the range of a float")):
        with pytest.raises(InputError, match=match) as err:
            loads_bounded(text, "s.json", what="schedule")
        assert "not valid" not in str(err.value)
    with pytest.raises(InputError, match="is not valid schedule"):
        loads_bounded('{"a": ', "s.json", what="schedule")


def test_nfe_messages_name_nfe_and_suggest_only_what_is_allowed():
    from edm_deploy.runtime.core.schedules import MAX_STEPS
    from edm_deploy.runtime.sampling.solvers import steps_for_nfe

    for solver in ("ipndm", "heun", "unipc"):
        with pytest.raises(InputError) as err:
            steps_for_nfe(solver, MAX_STEPS)
        text = str(err.value)
        assert err.value.param == "nfe" and "steps" not in text.replace("time points", ""), text
        suggested = [int(n.replace(",", "")) for n in text.split("NFE ")[-1].replace(" or ", " ").split()
                     if n.replace(",", "").isdigit()]
        assert suggested and all(n <= MAX_STEPS for n in suggested), text
        for n in suggested:
            assert steps_for_nfe(solver, n) <= MAX_STEPS  # what it suggests is accepted


def test_errors_name_the_file_and_the_cause(tmp_path, monkeypatch):
    from edm_deploy.cli import FLAGS, cli_message
    from edm_deploy.runtime.core.fileio import atomic_write_bytes
    from edm_deploy.runtime.output.run_record import RUN_RECORD, check_run_record
    from edm_deploy.runtime.sampling.schedule_search import plan_search

    # A damaged run record is said to be damaged, not "other settings".
    (tmp_path / "000000.png").write_bytes(b"png")
    (tmp_path / RUN_RECORD).write_text('{"model": "ab')
    with pytest.raises(InputError, match="run record is damaged") as err:
        check_run_record(str(tmp_path), {"model": "ab"}, holds_images=lambda folder: True)
    assert "other settings" not in str(err.value)

    # A write the OS refuses (a full disk, here a file size limit) names the file.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError) as err:
            atomic_write_bytes(str(tmp_path / "big.bin"), b"x" * 100_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert err.value.filename == str(tmp_path / "big.bin") and not os.path.exists(tmp_path / "big.bin")

    # A message that gives the flag already is not given it twice.
    monkeypatch.setitem(FLAGS, "cond", "--cond")
    text = cli_message(InputError("x.pt is class-conditional (10 classes): tune it with cond (--cond)", param="cond"))
    assert text.endswith("tune it with cond (--cond)")

    with pytest.raises(InputError, match="coeff 1e.308.*use a coeff from") as err:
        plan_search("ipndm", 5, coeff=1e308)
    assert err.value.param == "coeff"


@requires_onnx
def test_commands_name_the_real_cause(oracle, tmp_path):
    from tests.onnx_oracles import oracle_manifest

    model = oracle["uncond"]
    line = _one_error_line(run_cli(["verify", model, "--against", model]))
    assert "is an exported ONNX model, not a checkpoint" in line
    line = _one_error_line(run_cli(["bench", model, "--batch", "65536", "--repeats", "1", "--no-sampling"]))
    assert "batch limit" in line and ": 64 (" in line

    # An engine reached through a symlink finds its manifest beside the engine file.
    (tmp_path / "eng").mkdir()
    real = tmp_path / "eng" / "real.plan"
    real.write_bytes(b"engine bytes")
    manifest = dict(oracle_manifest(1, 8), tensorrt={"plan_sha256": _sha(real)})
    (tmp_path / "eng" / "real.plan.json").write_text(json.dumps(manifest))
    os.symlink(real, tmp_path / "link.plan")
    res = run_cli(["info", tmp_path / "link.plan"])
    assert res.returncode == 0 and "1x8x8" in res.stdout, res.stderr


# -- the FID downloads: a failed one is never cached ------------------------------------------------


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A local HTTP server: path -> (content type, body)."""
    pages: dict[str, tuple[str, bytes]] = {}
    monkeypatch.setenv("EDM_DEPLOY_CACHE", str(tmp_path / "cache"))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the handler's API
            kind, body = pages[self.path]
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield pages, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_failed_download_is_not_cached(served, tmp_path):
    from edm_deploy.runtime.core.download import cache_dir, fetch

    pages, base = served

    def npz_only(path):
        if not open(path, "rb").read(2) == b"PK":
            raise InputError(f"{path} is not an .npz")

    pages["/ref.npz"] = ("text/html", b"<html>503 try later</html>")
    with pytest.raises(InputError, match="web page"):
        fetch(f"{base}/ref.npz", progress=False)
    pages["/ref.npz"] = ("application/octet-stream", b"garbage, not a zip")
    with pytest.raises(InputError, match="not the file expected, so it was not cached"):
        fetch(f"{base}/ref.npz", progress=False, check=npz_only)
    assert not [f for f in os.listdir(cache_dir()) if not f.startswith(".")]
    fetch(f"{base}/ref.npz", progress=False)  # cached without a check (as an older run would have)
    pages["/ref.npz"] = ("application/octet-stream", b"PK\x03\x04 a fresh copy")
    path = fetch(f"{base}/ref.npz", progress=False, check=npz_only)  # the bad cached copy is fetched again
    assert open(path, "rb").read().startswith(b"PK")
