"""The server's web page in a real browser: the system's Chromium driven by Playwright.

`make test` installs Chromium from the system's package manager (Playwright's own browser
download is not used) and sets EDM_DEPLOY_CHROMIUM; run by hand, the test looks for
/usr/bin/chromium and is skipped, saying so, only where neither is there and the variable is unset.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time

import pytest

from tests.conftest import has_module, requires_onnx

CHROMIUM = os.environ.get("EDM_DEPLOY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
REQUIRED = bool(os.environ.get("EDM_DEPLOY_CHROMIUM"))

pytestmark = [
    requires_onnx,
    pytest.mark.skipif(not (has_module("playwright") and has_module("uvicorn") and has_module("fastapi")),
                       reason="playwright and the serve extra are needed"),
    pytest.mark.skipif(not REQUIRED and not os.path.exists(CHROMIUM),
                       reason=f"no Chromium at {CHROMIUM} (make test installs it)"),
]

# What the probe of this machine found Chromium needs as root on a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def _page():
    """A new page in the system's Chromium, closed afterwards."""
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), f"Chromium is not at {CHROMIUM}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page()
        finally:
            browser.close()


@contextlib.contextmanager
def _serve(den):
    import uvicorn

    from edm_deploy.runtime.serving import Engine
    from edm_deploy.server import create_app

    engine = Engine(den, max_batch=16, max_images=16)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, {"file": "g.onnx"}), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def served(tmp_path):
    from edm_deploy.loading import load
    from tests.onnx_oracles import gaussian_onnx

    with load(gaussian_onnx(str(tmp_path / "g.onnx"))) as den, _serve(den) as url_engine:
        yield url_engine


def test_the_page_samples_images_and_shows_errors_in_chromium(served, tmp_path):
    url, engine = served
    with _page() as page:
        page.goto(url + "/")
        page.wait_for_selector("#go[data-ready='1']", timeout=30_000)
        assert "8×8×1 images" in page.text_content("#model")
        page.select_option("#solver", "ipndm")
        page.fill("#nfe", "5")
        page.fill("#seeds", "0-5")
        page.fill("#zoom", "3")
        page.click("#go")
        page.wait_for_function("document.querySelectorAll('#images img').length === 6", timeout=30_000)
        page.wait_for_function("[...document.querySelectorAll('#images img')].every(i => i.complete && i.naturalWidth === 8)")
        sizes = page.eval_on_selector_all("#images img", "imgs => imgs.map(i => [i.width, i.naturalWidth])")
        assert sizes == [[24, 8]] * 6
        status = page.text_content("#status")
        assert status.startswith("6 images, ipndm NFE 5:") and "s on the server" in status
        page.screenshot(path=os.environ.get("EDM_DEPLOY_SCREENSHOT", str(tmp_path / "page.png")))
        # the server's one-line message reaches the page
        page.select_option("#solver", "heun")
        page.fill("#nfe", "10")
        page.click("#go")
        page.wait_for_selector("#status.error", timeout=30_000)
        assert "heun cannot spend exactly NFE 10" in page.text_content("#status")
    assert engine.stats.requests_done == 1 and engine.stats.images_done == 6


def test_the_api_page_renders_offline_from_packaged_assets(served):
    url, _ = served
    outside = []

    def only_this_server(route):
        if route.request.url.startswith(url):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    with _page() as page:
        page.route("**/*", only_this_server)
        page.goto(url + "/docs")
        page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
        assert "edm-deploy" in page.text_content(".swagger-ui .info .title")
        page.wait_for_selector(".opblock-summary-path[data-path='/v1/generate']", timeout=30_000)
    assert outside == []  # nothing fetched from anywhere but this server


def test_the_page_shows_previews_as_they_come_and_cancels_in_chromium(tmp_path):
    from edm_deploy.loading import load
    from edm_deploy.runtime.core.contract import DelegatingDenoiser
    from tests.onnx_oracles import gaussian_onnx

    class Slow(DelegatingDenoiser):
        def __call__(self, x, sigma, class_labels=None):
            time.sleep(0.01)
            return self.den(x, sigma, class_labels)

    with load(gaussian_onnx(str(tmp_path / "g.onnx"))) as den, _serve(Slow(den)) as (url, engine):
        with _page() as page:
            page.goto(url + "/")
            page.wait_for_selector("#go[data-ready='1']", timeout=30_000)
            assert "determinism: " in page.text_content("#model")
            page.select_option("#solver", "heun")
            page.fill("#nfe", "999")  # 500 steps of at least 10 ms: seconds, with a preview after each step
            page.fill("#seeds", "0-2")
            page.click("#go")
            page.wait_for_function("/step [0-9]+ of 500/.test(document.querySelector('#status').textContent)",
                                   timeout=60_000)
            page.wait_for_function("document.querySelectorAll('#images img').length === 3")
            assert "step" in page.text_content("#images figcaption")
            page.click("#cancel")
            page.wait_for_function("document.querySelector('#status').textContent === 'cancelled'", timeout=30_000)
            assert page.eval_on_selector_all("#images img", "imgs => imgs.length") == 0
        deadline = time.time() + 60
        while engine.stats.requests_cancelled != 1 and time.time() < deadline:
            time.sleep(0.05)
        assert engine.stats.requests_cancelled == 1 and engine.rows_in_flight == 0 and engine.stats.requests_done == 0
