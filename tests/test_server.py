"""`edm-deploy serve` and its app (`edm_deploy/server.py`): formats, errors, limits, metrics, replicas, drain.

In-process through FastAPI's test client where HTTP semantics are the point; real uvicorn
processes where the process is (two replicas answering alike and equal to `sample`, a client
that goes away, SIGTERM draining).
"""

from __future__ import annotations

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

from edm_deploy.runtime.errors import InputError
from edm_deploy.runtime.generate import generate
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
    from edm_deploy.runtime.engine import Engine
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
    assert _png(r.content).shape == (3 * (2 * 8 + 3), 3 * (2 * 8 + 3))  # 2x2 images, 1 px padding, x3


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
             ({"seeds": [0], "timeout": 10**400}, "timeout must be a finite number"),
             ({"seeds": [0], "sigma_max": 10**400}, "sigma_max must be a finite number"),
             ({"seeds": [0], "nfe": -10**400}, "nfe must be"),
             ({"seeds": "9" * 5000}, "bad seed list"),
             ([1, 2], "JSON object")]
    for body, match in cases:
        r = client.post("/v1/generate", json=body)
        assert r.status_code == 400 and match in r.json()["error"], (body, r.text)
    r = client.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = client.post("/v1/generate", content=b"[" * 2_000_000)
    assert r.status_code == 413


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
    props = schema["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"seeds", "solver", "nfe", "num_steps", "sigmas", "guidance", "format"} <= set(props)
    assert "<form" in client.get("/").text


def test_a_backend_error_is_a_one_line_500_and_the_server_goes_on():
    from fastapi.testclient import TestClient

    from edm_deploy.runtime.engine import Engine
    from edm_deploy.server import create_app
    from tests.test_engine import Recording

    class FailsOnce(Recording):
        def __call__(self, x, sigma, class_labels=None):
            if not self.calls:
                self.calls.append(None)
                raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : a kernel failed\nstack frame 1")
            return super().__call__(x, sigma, class_labels)

    engine = Engine(FailsOnce(), max_batch=8)
    with TestClient(create_app(engine, {"file": "fails-once"})) as c:
        r = c.post("/v1/generate", json={"seeds": [0], "class_idx": 1, "solver": "ipndm", "nfe": 3})
        assert r.status_code == 500 and r.json() == {"error": "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : a kernel failed"}
        r = c.post("/v1/generate", json={"seeds": [0], "class_idx": 1, "solver": "ipndm", "nfe": 3})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def test_a_full_queue_is_a_503_with_retry_after_never_a_hang(gauss_model):
    from fastapi.testclient import TestClient

    from edm_deploy.loading import load
    from edm_deploy.runtime.contract import DelegatingDenoiser
    from edm_deploy.runtime.engine import Engine
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
            start = time.perf_counter()
            r = c.post("/v1/generate", json={"seeds": [9]})
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["error"]
            assert time.perf_counter() - start < 1.0
            for t in slow:
                t.join()


# ------------------------------------------------------------------------------------------------
# Real processes


def _start(model, *args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "edm_deploy.cli", "serve", model, "--port", "0", *args],
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
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


@requires_onnx
def test_a_client_that_goes_away_frees_its_rows_and_sigterm_drains(gauss_model):
    import httpx

    server = _start(gauss_model, "--max-batch", "1")
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server.url + "/v1/generate", json={"seeds": [0], "num_steps": 100_000}, timeout=1.0)
        deadline = time.time() + 10
        while time.time() < deadline:
            metrics = httpx.get(server.url + "/metrics").text
            if 'edm_deploy_requests_total{status="cancelled"} 1.0' in metrics:
                break
            time.sleep(0.2)
        assert 'edm_deploy_requests_total{status="cancelled"} 1.0' in metrics
        assert "edm_deploy_rows_in_flight 0.0" in metrics
        results = {}
        # 30,000 Heun steps: seconds on a 2-core CPU, so the SIGTERM below lands while it runs
        slow = threading.Thread(target=lambda: results.update(slow=httpx.post(
            server.url + "/v1/generate", json={"seeds": [1], "num_steps": 30_000}, timeout=300)))
        slow.start()
        time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.HTTPError):
            r = httpx.post(server.url + "/v1/generate", json={"seeds": [2]}, timeout=5)
            assert r.status_code == 503  # a connection that got in: refused with 503, else refused outright
            raise httpx.HTTPError("refused with 503")
        slow.join(timeout=300)
        assert "slow" in results, server.lines
        assert results["slow"].status_code == 200 and results["slow"].headers["content-type"] == "image/png"
        assert float(results["slow"].headers["X-Seconds"]) > 0.8  # it was in flight when SIGTERM came
        assert server.wait(timeout=60) == 0
        assert any(line.startswith("stopped: 1 requests") for line in server.lines), server.lines
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_the_request_schema_covers_every_sampler_setting():
    import dataclasses

    from edm_deploy.runtime.settings import SamplerSettings
    from edm_deploy.server import request_schema

    props = request_schema()["properties"]
    assert all(f.name in props for f in dataclasses.fields(SamplerSettings))
    assert props["solver"]["enum"][0] == "euler" and json.dumps(props)
