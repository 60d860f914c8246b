"""`edm-deploy serve` and its app (`edm_deploy/server.py`): formats, errors, limits, metrics, replicas, drain.

In-process through FastAPI's test client where HTTP semantics are the point; real uvicorn
processes where the process is (two replicas answering alike and equal to `sample`, a client
that goes away, SIGTERM draining).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from edm_deploy.runtime.core.errors import InputError
from edm_deploy.runtime.sampling.generate import generate
from tests.conftest import REPO, has_module, requires_onnx, requires_torch

pytestmark = pytest.mark.skipif(not (has_module("fastapi") and has_module("httpx") and has_module("prometheus_client")),
                                reason="the serve extra (fastapi, uvicorn, prometheus-client) and httpx are not installed")


@pytest.fixture(scope="module")
def gauss_model(tmp_path_factory):
    from tests.onnx_oracles import gaussian_onnx

    return gaussian_onnx(str(tmp_path_factory.mktemp("m") / "gauss.onnx"))


@pytest.fixture
def client(gauss_model):
    from fastapi.testclient import TestClient

    from edm_deploy.loading import load
    from edm_deploy.runtime.serving import Engine
    from edm_deploy.server import create_app

    with load(gauss_model) as den:
        engine = Engine(den, max_batch=16, max_images=8, max_queue=4)
        with TestClient(create_app(engine, {"file": gauss_model})) as c:
            c.den, c.engine = den, engine
            yield c


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def test_one_png_and_the_other_formats_hold_the_api_images(client):
    want = generate(client.den, [0, 1, 2, 3], solver="ipndm", nfe=5)
    r = client.post("/v1/generate", json={"seeds": [2], "solver": "ipndm", "nfe": 5})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-nfe"] == "5" and float(r.headers["x-seconds"]) > 0
    np.testing.assert_array_equal(_png(r.content), want[2, :, :, 0])
    r = client.post("/v1/generate", json={"seeds": "0-3", "solver": "ipndm", "nfe": 5, "format": "npz"})
    npz = np.load(io.BytesIO(r.content))
    np.testing.assert_array_equal(npz["images"], want)
    assert npz["seeds"].tolist() == [0, 1, 2, 3]
    r = client.post("/v1/generate", json={"n": 4, "solver": "ipndm", "nfe": 5})  # several: json by default
    body = r.json()
    assert body["seeds"] == [0, 1, 2, 3] and body["nfe"] == 5 and body["solver"] == "ipndm"
    import base64

    np.testing.assert_array_equal(np.stack([_png(base64.b64decode(b)) for b in body["images"]])[..., None], want)
    r = client.post("/v1/generate", json={"n": 4, "solver": "ipndm", "nfe": 5, "format": "grid", "grid_cols": 2,
                                          "grid_scale": 3})
    grid = _png(r.content)  # as `sample --grid --grid-scale 3` writes it: each image x3, then 1 px padding
    assert grid.shape == (2 * 3 * 8 + 3, 2 * 3 * 8 + 3)
    np.testing.assert_array_equal(grid[1:25, 26:50], want[1, :, :, 0].repeat(3, axis=0).repeat(3, axis=1))


@pytest.mark.parametrize("body,api", [
    ({"seeds": [0], "solver": "heun", "afs": True}, dict(solver="heun", afs=True)),
    ({"seeds": [0], "solver": "heun", "nfe": 10}, dict(solver="heun", nfe=10)),
    ({"seeds": [0], "solver": "ipndm", "sigmas": [80, 90, 1]}, dict(solver="ipndm", sigmas=[80, 90, 1])),
    ({"seeds": [0], "solver": "ipndm", "S_churn": 5}, dict(solver="ipndm", S_churn=5)),
    ({"seeds": [2**32]}, dict(seeds=[2**32])),
    ({"seeds": [1.9]}, dict(seeds=[1.9])),
    ({"seeds": [0], "nfe": "5"}, dict(nfe="5")),
])
def test_a_bad_request_is_a_400_with_the_apis_own_message(client, body, api):
    seeds = api.pop("seeds", [0])
    with pytest.raises(InputError) as info:
        generate(client.den, seeds, **api)
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 400 and r.json() == {"error": str(info.value)}


def test_requests_the_api_cannot_take_say_why(client):
    cases = [({"seeds": [0], "steps": 4}, "unknown field 'steps' (the API calls it num_steps)"),
             ({"seeds": list(range(9))}, "at most 8 images"),
             ({"seeds": [0, 1], "format": "png"}, "format png holds one image"),
             ({"seeds": [0], "format": "gif"}, "unknown format"),
             ({"seeds": [0], "class_idx": 3}, "unconditional"),
             ({"seeds": [0], "grid_scale": 99}, "grid_scale must be"),
             ({"seeds": [0], "guidance": "abc"}, "guidance must be a number"),
             ({"seeds": [0], "guidance": [1]}, "guidance must be a number"),
             ({"seeds": [0], "timeout": 10**400}, "has 401 digits; at most 20 are read"),
             ({"seeds": [0], "nfe": -10**400}, "has 401 digits; at most 20 are read"),
             ({"seeds": [0], "timeout": 10**19}, "timeout"),
             ({"seeds": [0], "nfe": 10**19}, "nfe"),
             ({"seeds": "9" * 5000}, "bad seed list"),
             ([1, 2], "JSON object")]
    for body, match in cases:
        r = client.post("/v1/generate", json=body)
        assert r.status_code == 400 and match in r.json()["error"], (body, r.text)
    r = client.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = client.post("/v1/generate", content=b"[" * 2_000_000)
    assert r.status_code == 413 and "larger than" in r.json()["error"]


def test_model_health_metrics_and_openapi(client):
    info = client.get("/v1/model").json()
    assert info["img_resolution"] == 8 and info["limits"]["max_batch"] == 16 and "ipndm" in info["solvers"]
    assert client.get("/healthz").json()["status"] == "ok"
    for k in range(3):
        client.post("/v1/generate", json={"seeds": [k], "solver": "heun", "num_steps": 5})
    text = client.get("/metrics").text
    assert 'edm_deploy_requests_total{status="ok"} 3.0' in text and "edm_deploy_images_total 3.0" in text
    assert "edm_deploy_rows_per_call_count 27.0" in text  # 9 calls per Heun-5 request, in sequence
    assert "edm_deploy_queue_length 0.0" in text and "edm_deploy_request_latency_seconds_bucket" in text
    schema = client.get("/openapi.json").json()
    props = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert {"seeds", "solver", "nfe", "num_steps", "sigmas", "guidance", "format"} <= set(props)
    assert "<form" in client.get("/").text


def test_a_backend_error_is_a_one_line_500_and_the_server_goes_on():
    from fastapi.testclient import TestClient

    from edm_deploy.runtime.serving import Engine
    from edm_deploy.server import create_app
    from tests.test_engine import FailsFirstCall

    engine = Engine(FailsFirstCall("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : a kernel failed\nstack frame 1"),
                    max_batch=8)
    with TestClient(create_app(engine, {"file": "fails-once"})) as c:
        r = c.post("/v1/generate", json={"seeds": [0], "class_idx": 1, "solver": "ipndm", "nfe": 3})
        assert r.status_code == 500 and r.json() == {"error": "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : a kernel failed"}
        r = c.post("/v1/generate", json={"seeds": [0], "class_idx": 1, "solver": "ipndm", "nfe": 3})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def test_a_full_queue_is_a_503_with_retry_after_never_a_hang(gauss_model):
    from fastapi.testclient import TestClient

    from edm_deploy.loading import load
    from edm_deploy.runtime.core.contract import DelegatingDenoiser
    from edm_deploy.runtime.serving import Engine
    from edm_deploy.server import create_app

    class Slow(DelegatingDenoiser):
        def __call__(self, x, sigma, class_labels=None):
            time.sleep(0.005)
            return self.den(x, sigma, class_labels)

    with load(gauss_model) as den:
        engine = Engine(Slow(den), max_batch=1, max_queue=1)
        with TestClient(create_app(engine)) as c:
            slow = [threading.Thread(target=c.post, args=("/v1/generate",),
                                     kwargs={"json": {"seeds": [k], "num_steps": 400}}) for k in range(2)]
            for t in slow:
                t.start()
                time.sleep(0.3)
            r = c.post("/v1/generate", json={"seeds": [9]})
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["error"]
            assert any(t.is_alive() for t in slow)  # answered while the queue was still full
            for t in slow:
                t.join()


# ------------------------------------------------------------------------------------------------
# Real processes


def _start(model, *args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "edm_deploy.cli", "serve", model, "--port", "0", *args],
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300  # a hang guard: a busy 2-core machine takes a minute to import and load
    lines = []
    while time.time() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if line.startswith("listening on "):
            proc.url = line.split()[-1]
            threading.Thread(target=lambda: [lines.append(x) for x in proc.stderr], daemon=True).start()
            proc.lines = lines
            return proc
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("server did not start:\n" + "".join(lines))


@pytest.fixture(scope="module")
def unet_model(tmp_path_factory):
    if not (has_module("torch") and has_module("onnx")):
        pytest.skip("torch and onnx are needed to export a network")
    from edm_deploy.export.onnx_export import export_onnx
    from tests.factories import tiny_network

    net, network = tiny_network("ddpmpp", label_dim=10)
    path = str(tmp_path_factory.mktemp("unet") / "unet.onnx")
    export_onnx(net, network, path, max_batch=16)
    return path


@requires_torch
@requires_onnx
def test_two_replicas_under_other_loads_serve_what_sample_writes_bit_for_bit(unet_model, tmp_path):
    import httpx

    from tests.conftest import run_cli

    jobs = [{"seeds": [0, 1, 2], "class_idx": 4, "solver": "ipndm", "nfe": 5},
            {"seeds": [3], "class_idx": 1, "solver": "heun", "num_steps": 4},
            {"seeds": [5, 6], "class_idx": 7, "solver": "unipc", "nfe": 4}]
    replicas = [_start(unet_model, "--fixed-batch", "8") for _ in range(2)]
    try:
        answers = []
        for k, replica in enumerate(replicas):
            with httpx.Client(base_url=replica.url, timeout=120) as http:
                noise = [threading.Thread(target=http.post, args=("/v1/generate",),
                                          kwargs={"json": {"n": 4 + k, "solver": "heun", "num_steps": 6 + 3 * k}})]
                for t in noise:
                    t.start()
                got = []
                out = [None] * len(jobs)

                def ask(i, job, out=out):
                    out[i] = http.post("/v1/generate", json={**job, "format": "npz"})

                threads = [threading.Thread(target=ask, args=(i, job)) for i, job in enumerate(jobs)]
                for t in threads:
                    t.start()
                for t in threads + noise:
                    t.join()
                for r in out:
                    assert r.status_code == 200, r.text
                    got.append(np.load(io.BytesIO(r.content))["images"])
                answers.append(got)
        for a, b in zip(*answers):
            np.testing.assert_array_equal(a, b)
        for job, served in zip(jobs, answers[0]):
            npz = tmp_path / f"s{job['seeds'][0]}.npz"
            flags = {"heun": ["--steps", str(job.get("num_steps"))]}.get(job["solver"], ["--nfe", str(job.get("nfe"))])
            res = run_cli(["sample", unet_model, "--seeds", ",".join(map(str, job["seeds"])), "--class",
                           str(job["class_idx"]), "--solver", job["solver"], *flags, "--fixed-batch", "8",
                           "--npz", str(npz)])
            assert res.returncode == 0, res.stderr
            np.testing.assert_array_equal(np.load(npz)["images"], served)
    finally:
        for replica in replicas:
            replica.kill()
            replica.wait()


def _wait_for(condition, what, seconds=120.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@requires_onnx
def test_a_client_that_goes_away_frees_its_rows_and_sigterm_drains(gauss_model):
    import httpx

    server = _start(gauss_model, "--max-batch", "1", "--max-steps", "100000", "--drain-grace", "1")
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server.url + "/v1/generate", json={"seeds": [0], "num_steps": 100_000}, timeout=1.0)
        _wait_for(lambda: 'edm_deploy_requests_total{status="cancelled"} 1.0' in httpx.get(server.url + "/metrics").text,
                  "the cancel")
        assert "edm_deploy_rows_in_flight 0.0" in httpx.get(server.url + "/metrics").text
        results = {}
        # 30,000 Heun steps: seconds on a 2-core CPU, so the SIGTERM below lands while it runs
        slow = threading.Thread(target=lambda: results.update(slow=httpx.post(
            server.url + "/v1/generate", json={"seeds": [1], "num_steps": 30_000}, timeout=300)))
        slow.start()
        _wait_for(lambda: "edm_deploy_rows_in_flight 1.0" in httpx.get(server.url + "/metrics").text, "the slow request")
        server.send_signal(signal.SIGTERM)
        _wait_for(lambda: httpx.get(server.url + "/healthz").status_code == 503, "readiness to fail")
        r = httpx.post(server.url + "/v1/generate", json={"seeds": [2]}, timeout=5)  # the listener is still open
        assert r.status_code == 503 and "shutting down" in r.json()["error"] and int(r.headers["retry-after"]) >= 1
        assert r.headers["connection"] == "close"
        slow.join(timeout=300)
        assert results["slow"].status_code == 200 and results["slow"].headers["content-type"] == "image/png"
        assert server.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):  # then the listener closed
            httpx.get(server.url + "/healthz")
        assert any(line.startswith("stopped: 1 requests") for line in server.lines), server.lines
        assert not any("Traceback" in line for line in server.lines), server.lines
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@requires_onnx
def test_requests_left_at_the_drain_timeout_get_the_json_503_and_the_exit_status_says_so(gauss_model):
    import httpx

    server = _start(gauss_model, "--max-batch", "1", "--max-steps", "100000", "--drain-grace", "0",
                    "--drain-timeout", "1")
    try:
        results = {}
        slow = threading.Thread(target=lambda: results.update(slow=httpx.post(
            server.url + "/v1/generate", json={"seeds": [1], "num_steps": 100_000}, timeout=300)))
        slow.start()
        _wait_for(lambda: "edm_deploy_rows_in_flight 1.0" in httpx.get(server.url + "/metrics").text, "the slow request")
        server.send_signal(signal.SIGTERM)
        slow.join(timeout=120)
        r = results["slow"]
        assert r.status_code == 503 and r.json()["error"].startswith("the server stopped before this request finished")
        assert int(r.headers["retry-after"]) >= 1
        assert server.wait(timeout=60) == 75
        lines = "".join(server.lines)
        assert lines.count("abandoned a request for seeds 1") == 1 and "Traceback" not in lines, lines
        assert "error: 1 requests were abandoned" in lines
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_the_request_schema_covers_every_sampler_setting():
    import dataclasses

    from edm_deploy.http_api import request_schema
    from edm_deploy.runtime.sampling.settings import SamplerSettings

    props = request_schema()["properties"]
    assert all(f.name in props for f in dataclasses.fields(SamplerSettings))
    assert props["solver"]["enum"][0] == "euler" and json.dumps(props)


# ------------------------------------------------------------------------------------------------
# The front door under hostile clients (issue 30): one test per class of failure


@pytest.fixture
def cond_client(tmp_path):
    """A class-conditional model behind the in-process client, with small limits."""
    from fastapi.testclient import TestClient

    from edm_deploy.http_api import Limits
    from edm_deploy.loading import load
    from edm_deploy.runtime.serving import Engine
    from edm_deploy.server import create_app
    from tests.onnx_oracles import gaussian_onnx

    model = gaussian_onnx(str(tmp_path / "c.onnx"), label_dim=4)
    with load(model) as den:
        engine = Engine(den, max_batch=16, max_images=8)
        limits = Limits(max_images=8, img_resolution=8, max_steps=50, request_timeout=60)
        with TestClient(create_app(engine, {"file": "c.onnx"}, limits=limits)) as c:
            c.engine = engine
            yield c


def test_client_input_is_a_400_in_the_apis_words_never_a_500(cond_client):
    cases = [({"sigmas": [80]}, "sigmas needs at least two time points"),
             ({"sigmas": [80, 1, 1e-300]}, "sigmas 1e-300 is below the smallest float32 noise level"),
             ({"sigma_min": 1e-300}, "sigma_min 1e-300 is below the smallest float32 noise level"),
             ({"guidance": 1e300, "class_idx": 1}, "guidance must lie in [-100, 100]"),
             ({"solver": "heun", "nfe": 10}, "heun cannot spend exactly NFE 10")]
    for body, match in cases:
        r = cond_client.post("/v1/generate", json=body)
        assert r.status_code == 400 and match in r.json()["error"], (body, r.text)
        assert "--" not in r.json()["error"], r.text  # no command-line flag in an HTTP answer
    for raw, match in [(b'{"seeds": [1' + b"0" * 5000 + b"]}", "has 5,001 digits; at most 20 are read"),
                       (b"[" * 100 + b"]" * 100, "nested 100 levels deep"),  # valid JSON, not called invalid
                       (b'{"guidance": NaN}', "is not valid JSON (NaN is not a JSON number)")]:
        r = cond_client.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and match in r.json()["error"], r.text


def test_cli_words_in_library_text_become_the_apis_names():
    from edm_deploy.http_api import api_words

    assert api_words("use --solver consistency (NFE 1 or 2)") == "use solver consistency (NFE 1 or 2)"
    assert api_words("N (--nfe K: K points)") == "N (nfe K: K points)"
    assert api_words("give --steps 4 or --class 3") == "give num_steps 4 or class_idx 3"
    assert api_words("edm-deploy train --consistency") == "edm-deploy train --consistency"  # a command, kept


def test_the_body_is_refused_on_its_declared_length_and_type_before_it_is_read(cond_client):
    r = cond_client.post("/v1/generate", content=b"{}", headers={"content-type": "application/json",
                                                                 "content-length": str(1 << 30)})
    assert r.status_code == 413 and "larger than 1048576 bytes" in r.json()["error"]
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {} if ctype is None else {"content-type": ctype}
        r = cond_client.post("/v1/generate", content=b'{"seeds": [1]}', headers=headers)
        assert r.status_code == 415 and "application/json" in r.json()["error"], ctype
    r = cond_client.post("/v1/generate", content=b'{"seeds": [1]}',
                         headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_seeds_and_counts_are_bounded_before_anything_is_expanded(cond_client, monkeypatch):
    import edm_deploy.runtime.sampling.seeds as seeds_module

    built = []
    for name in ("parse_seeds", "check_seeds"):
        real = getattr(seeds_module, name)
        monkeypatch.setattr(seeds_module, name, lambda value, *a, _real=real, **k: built.append(value) or _real(value, *a, **k))
    for body in ({"seeds": "0-9999999"}, {"n": 10_000_000}, {"seeds": list(range(50_000))},
                 {"seeds": "0-4,5-9"}):
        r = cond_client.post("/v1/generate", json=body)
        assert r.status_code == 400 and "at most 8 images" in r.json()["error"], r.text
    assert built == []  # nothing was expanded or walked
    r = cond_client.post("/v1/generate", json={"seeds": "0-3", "format": "npz"})
    assert r.status_code == 200 and np.load(io.BytesIO(r.content))["seeds"].tolist() == [0, 1, 2, 3]


def test_the_work_a_request_asks_is_bounded_before_it_is_planned_and_every_request_has_a_deadline(cond_client):
    for body, match in [({"solver": "deis", "num_steps": 99_998}, "num_steps 99,998 is more than this server takes"),
                        ({"solver": "ipndm", "nfe": 51}, "nfe 51 is more than"),
                        ({"sigmas": list(np.geomspace(80, 0.01, 60))}, "sigmas holds 60 time points"),
                        ({"timeout": 61}, "timeout must be more than 0 and at most 60 s")]:
        r = cond_client.post("/v1/generate", json=body)
        assert r.status_code == 400 and match in r.json()["error"] and "max_steps" in r.json()["error"] or \
            "timeout" in match, r.text
    submitted = []
    real = cond_client.engine.request
    cond_client.engine.request = lambda *a, **kw: submitted.append(real(*a, **kw)) or submitted[-1]
    assert cond_client.post("/v1/generate", json={"seeds": [0], "nfe": 5, "solver": "ipndm"}).status_code == 200
    assert submitted[-1].timeout == 60  # no timeout given: the server's request_timeout


def test_deis_coefficients_are_computed_once_per_schedule(monkeypatch):
    from edm_deploy.runtime.sampling import solvers as slv
    from edm_deploy.runtime.serving import Engine
    from tests.test_engine import Recording

    calls = []
    real = slv.deis_tab_coefficients
    monkeypatch.setattr(slv, "deis_tab_coefficients", lambda *a, **k: calls.append(1) or real(*a, **k))
    slv._deis_coefficients.cache_clear()
    with Engine(Recording(), max_batch=8) as engine:
        for seed in range(3):
            engine.submit([seed], 1, {"solver": "deis", "num_steps": 37}).result(timeout=60)
    assert len(calls) == 1


def test_grid_options_apply_to_grids_only_and_the_grid_is_bounded(cond_client):
    for body, match in [({"seeds": [0, 1], "grid_cols": 2}, "grid_cols applies to format grid, not json"),
                        ({"seeds": [0], "format": "npz", "grid_scale": 2}, "grid_scale applies to format grid"),
                        ({"seeds": [0, 1], "format": "grid", "grid_cols": 3}, "grid_cols must lie in [1, 2]")]:
        r = cond_client.post("/v1/generate", json=body)
        assert r.status_code == 400 and match in r.json()["error"], r.text


def test_head_answers_every_get_path_without_a_body(cond_client):
    for path in ("/healthz", "/v1/model", "/metrics", "/", "/openapi.json", "/docs"):
        get, head = cond_client.get(path), cond_client.head(path)
        assert head.status_code == get.status_code == 200 and head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"]
    r = cond_client.put("/healthz")
    assert r.status_code == 405 and r.json() == {"error": "/healthz does not take PUT"}
    assert cond_client.get("/nope").json() == {"error": "no such path: /nope"}


def test_every_response_is_described_in_openapi_with_one_error_shape(cond_client):
    from edm_deploy.http_api import parse_generate

    schema = cond_client.get("/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            for status, response in op["responses"].items():
                assert response.get("content"), (path, method, status)
                if int(status) >= 400:
                    assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
                if status == "503":
                    assert response["headers"]["Retry-After"]["required"]
    ok = schema["paths"]["/v1/generate"]["post"]["responses"]["200"]
    assert ok["content"]["image/png"]["schema"] == {"type": "string", "format": "binary"}
    assert ok["content"]["application/octet-stream"]["schema"]["format"] == "binary"
    assert {"X-Seconds", "X-NFE", "X-Solver", "X-Seeds", "X-Warning"} <= set(ok["headers"])
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    request = schema["components"]["schemas"]["GenerateRequest"]
    limits = cond_client.get("/v1/model").json()["limits"]
    from edm_deploy.http_api import Limits

    limits = Limits(max_images=8, img_resolution=8, max_steps=limits["max_steps"])
    for example in request["properties"]["sigmas"]["examples"] + request["examples"]:
        parse_generate(example if isinstance(example, dict) else {"sigmas": example}, limits)  # each one is valid
    assert "cdn" not in cond_client.get("/docs").text.lower()
    assert cond_client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200


def test_the_model_endpoint_names_the_file_and_the_real_noise_range(cond_client):
    info = cond_client.get("/v1/model").json()
    assert info["model"]["file"] == "c.onnx"
    assert info["sigma_min"] == 0.002 and info["sigma_max"] == 80.0  # what a default request samples between
    assert info["model_sigma_min"] == 0.0 and info["model_sigma_max"] is None  # this oracle takes any level
    assert "--" not in json.dumps(info["solvers"])


def test_metrics_count_refusals_by_reason_call_latency_and_the_process(cond_client):
    cond_client.post("/v1/generate", json={"seeds": [0], "steps": 3})
    cond_client.post("/v1/generate", content=b"{}", headers={"content-type": "text/plain"})
    cond_client.post("/v1/generate", content=b"{}", headers={"content-type": "application/json",
                                                              "content-length": str(1 << 30)})
    cond_client.post("/v1/generate", json={"seeds": [0], "solver": "ipndm", "nfe": 3})
    text = cond_client.get("/metrics").text
    for reason, status in (("bad_request", 400), ("unsupported_media_type", 415), ("body_too_large", 413)):
        assert f'edm_deploy_refused_requests_total{{reason="{reason}",status="{status}"}} 1.0' in text, reason
    assert "edm_deploy_network_call_seconds_count 3.0" in text
    assert "process_resident_memory_bytes" in text and "process_open_fds" in text


def test_the_http_fields_are_declared_once_and_reach_the_engine_by_name():
    import dataclasses
    import inspect

    from edm_deploy.http_api import BODY_FIELDS, GenerateRequest, request_schema
    from edm_deploy.runtime.serving import Engine

    props = request_schema()["properties"]
    assert all(f.name in props and props[f.name]["description"] for f in BODY_FIELDS)
    engine_params = set(inspect.signature(Engine.request).parameters) - {"self"}
    passed = set(GenerateRequest(seeds=[0]).engine_args())
    assert passed <= engine_params and passed == {f.name for f in BODY_FIELDS if f.metadata["engine"]} | {"settings"}
    assert {f.name for f in dataclasses.fields(GenerateRequest)} == {f.name for f in BODY_FIELDS} | {"settings"}


# ------------------------------------------------------------------------------------------------
# Over TCP: slow and surplus clients, a disconnect mid-body, the port


def _raw(url):
    import socket

    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    return socket.create_connection((host.strip("[]"), int(port)), timeout=30)


def _read_all(sock):
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


@requires_onnx
def test_slow_and_surplus_clients_are_cut_off_and_overload_is_logged_once(gauss_model, caplog):
    from edm_deploy.loading import load
    from edm_deploy.runtime.serving import Engine
    from tests.live_server import live_server

    caplog.set_level("INFO", logger="edm_deploy.server")
    with load(gauss_model) as den, live_server(Engine(den, max_batch=4), header_timeout=0.3, body_timeout=0.3,
                                                max_connections=3) as server:
        slow_headers = _raw(server.url)
        slow_headers.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        assert _read_all(slow_headers) == b""  # closed by the server, unanswered
        slow_body = _raw(server.url)
        slow_body.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"seeds\"")
        answer = _read_all(slow_body)
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.3 s" in answer
        held = [_raw(server.url) for _ in range(3)]
        for sock in held:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"200 OK" in sock.recv(65536)
        surplus = [_raw(server.url) for _ in range(5)]
        for sock in surplus:
            answer = _read_all(sock)
            assert answer.startswith(b"HTTP/1.1 503") and b'"error"' in answer and b"retry-after: 1" in answer
        for sock in held + surplus + [slow_headers, slow_body]:
            sock.close()
        _wait_for(lambda: "no longer overloaded" in caplog.text, "the overload to end")
        import httpx

        assert httpx.get(server.url + "/healthz").status_code == 200
        assert 'edm_deploy_refused_requests_total{reason="too_many_connections",status="503"} 5.0' in \
            httpx.get(server.url + "/metrics").text
    assert caplog.text.count("overloaded: 3 connections are open") == 1


@requires_onnx
def test_a_client_leaving_mid_body_is_one_log_line_and_a_declared_gigabyte_is_refused_unread(gauss_model, caplog):
    from edm_deploy.loading import load
    from edm_deploy.runtime.serving import Engine
    from tests.live_server import live_server

    caplog.set_level("INFO")
    with load(gauss_model) as den, live_server(Engine(den, max_batch=4)) as server:
        sock = _raw(server.url)
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1073741824\r\n\r\n")  # a gigabyte announced, none sent
        answer = _read_all(sock)  # answered and closed without waiting for it
        assert answer.startswith(b"HTTP/1.1 413") and b"larger than 1048576 bytes" in answer
        sock.close()
        sock = _raw(server.url)
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"seeds\"")
        _wait_for(lambda: server.server_state.tasks, "the request to start")
        sock.close()
        _wait_for(lambda: "went away while sending its request body" in caplog.text, "the log line")
        import httpx

        chunks = (b" " * 65536 for _ in range(64))  # 4 MiB streamed without a declared length
        r = httpx.post(server.url + "/v1/generate", content=chunks, headers={"content-type": "application/json"})
        assert r.status_code == 413
    assert caplog.text.count("went away while sending its request body") == 1
    assert "Traceback" not in caplog.text and "ClientDisconnect" not in caplog.text


def test_a_busy_port_is_one_error_line_before_anything_is_served(gauss_model):
    import socket

    from tests.conftest import run_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = run_cli(["serve", gauss_model, "--port", str(port)])
    assert res.returncode == 1 and "serving" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"error: cannot listen on 127.0.0.1:{port}: address already in use "
                                               "(another server holds the port: choose another --port)"]


def test_an_ipv6_address_is_printed_in_brackets():
    import socket

    from edm_deploy.listener import bind, url_of

    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        sock = bind("::1", 0)
    except InputError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    with sock:
        assert url_of(sock) == f"http://[::1]:{sock.getsockname()[1]}"


# ------------------------------------------------------------------------------------------------
# Streams, priorities, the determinism guarantee


def _lines(response):
    return [json.loads(line) for line in response.text.splitlines()]


def test_a_stream_carries_previews_as_they_come_then_the_same_result(client):
    body = {"seeds": [0, 1], "solver": "heun", "num_steps": 6, "priority": 3, "deadline": 2.5}
    r = client.post("/v1/generate", json={**body, "stream": True, "preview_every": 2})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = _lines(r)
    previews = [line["preview"] for line in lines[:-1]]
    assert [(p["step"], p["steps"], p["seeds"], p["index"]) for p in previews] == [(s, 6, [0, 1], [0, 2]) for s in (2, 4, 6)]
    assert all(_png(base64.b64decode(im)).shape[:2] == (8, 8) for p in previews for im in p["images"])
    plain = client.post("/v1/generate", json={**body, "format": "json"}).json()
    assert lines[-1]["result"]["images"] == plain["images"] and lines[-1]["result"]["seeds"] == [0, 1]
    assert client.get("/v1/model").json()["determinism"] == "batch-invariant (checked at batch sizes 1-16)"


def test_stream_options_and_priorities_are_checked_in_the_apis_words(client):
    for body, match in [({"preview_every": 2}, "preview_every needs stream: true"),
                        ({"stream": True, "format": "png"}, "a stream answers in JSON lines"),
                        ({"stream": "yes"}, "stream must be true or false"),
                        ({"priority": 11}, "priority must be an integer from -10 to 10"),
                        ({"deadline": -1}, "deadline must be a positive number of seconds")]:
        r = client.post("/v1/generate", json={"seeds": [0], **body})
        assert r.status_code == 400 and match in r.json()["error"], (body, r.json())


def test_a_stream_whose_failure_comes_after_its_start_ends_with_an_error_line():
    from fastapi.testclient import TestClient

    from edm_deploy.runtime.serving import Engine
    from edm_deploy.server import create_app
    from tests.test_engine import Recording

    with TestClient(create_app(Engine(Recording(poison_sigma=1.5), max_batch=4), {"file": "m"})) as c:
        r = c.post("/v1/generate", json={"seeds": [0], "class_idx": 1, "solver": "dpmpp-2m",
                                         "sigmas": [80.0, 1.5, 0.002], "stream": True})
    assert r.status_code == 200 and _lines(r) == [{"error": "the denoiser produced NaN/Inf for seeds 0", "status": 500}]


def test_metrics_count_real_and_padded_rows_apart(gauss_model):
    from fastapi.testclient import TestClient

    from edm_deploy.loading import load
    from edm_deploy.runtime.serving import Engine
    from edm_deploy.server import create_app

    with load(gauss_model) as den:
        engine = Engine(den, fixed_batch=4)
        with TestClient(create_app(engine, {"file": "m"})) as c:
            assert c.post("/v1/generate", json={"seeds": [0], "solver": "euler", "num_steps": 3}).status_code == 200
            text = c.get("/metrics").text
            assert c.get("/v1/model").json()["determinism"] == "fixed batch 4"
    assert "edm_deploy_rows_total 3.0" in text and "edm_deploy_padded_rows_total 9.0" in text


@requires_onnx
def test_a_streaming_client_that_goes_away_frees_its_rows_at_the_next_call(gauss_model):
    import httpx

    from edm_deploy.http_api import Limits
    from edm_deploy.loading import load
    from edm_deploy.runtime.serving import Engine
    from tests.live_server import live_server

    limits = Limits(max_images=1, img_resolution=8, max_steps=100_000)
    with load(gauss_model) as den, live_server(Engine(den, max_batch=4), limits=limits) as server:
        body = {"seeds": [0], "num_steps": 100_000, "stream": True, "preview_every": 1}
        with httpx.stream("POST", server.url + "/v1/generate", json=body, timeout=60) as r:
            first = json.loads(next(r.iter_lines()))
            assert first["preview"]["step"] == 1 and server.engine.rows_in_flight == 1
        _wait_for(lambda: server.engine.stats.requests_cancelled == 1 and server.engine.rows_in_flight == 0,
                  "the stream's rows to leave")
