"""The HTML report in a real headless browser: Chromium (Debian's `chromium` + `chromium-driver`) driven
through chromedriver's W3C WebDriver HTTP API with the standard library only.

The page must load without console errors, request nothing from the network, show every figure decoded,
and a screenshot must not be blank. Without Chromium the test fails (it does not skip) and says how to
install it: apt-get update && apt-get install -y chromium chromium-driver
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"


def _browser() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail(f"the report browser test needs Chromium and chromedriver; install them with: {INSTALL}")
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriver:
    """The few WebDriver endpoints the test needs."""

    def __init__(self, url: str):
        self.url = url
        self.session = ""

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 60) -> object:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"{self.url}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"webdriver {method} {path}: {e.read().decode()[:500]}") from e

    def start(self, chromium: str, user_dir: Path) -> None:
        caps = {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1200,2400",
                    f"--user-data-dir={user_dir}",
                ],
            },
        }
        value = self.call("POST", "/session", {"capabilities": {"alwaysMatch": caps}}, timeout=120)
        self.session = value["sessionId"]

    def s(self, method: str, path: str, body: dict | None = None) -> object:
        return self.call(method, f"/session/{self.session}{path}", body)

    def script(self, js: str) -> object:
        return self.s("POST", "/execute/sync", {"script": js, "args": []})


@pytest.fixture(scope="module")
def report_path(tmp_path_factory) -> Path:
    """A real (short) digits run: its end-of-run report.html."""
    from tunelab.config import load_config
    from tunelab.run import train

    out = tmp_path_factory.mktemp("browser") / "run"
    cfg = load_config(
        "recipes/digits-cnn.yaml",
        [
            "train.max_steps=20",
            "train.log_every=5",
            "eval.every=10",
            f"output.dir={out}",
            "output.tensorboard=false",
            "output.progress=false",
        ],
    )
    train(cfg, log=lambda m: None)
    return out / "report.html"


def test_report_renders_in_headless_chromium(report_path, tmp_path):
    chromium, driver_bin = _browser()
    port = _free_port()
    proc = subprocess.Popen(
        [driver_bin, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wd = WebDriver(f"http://127.0.0.1:{port}")
    try:
        for _ in range(100):
            try:
                if wd.call("GET", "/status", timeout=2).get("ready"):
                    break
            except (urllib.error.URLError, ConnectionError, AssertionError):
                pass
            time.sleep(0.1)
        wd.start(chromium, tmp_path / "profile")
        wd.s("POST", "/url", {"url": report_path.resolve().as_uri()})
        for _ in range(50):
            if wd.script("return document.readyState") == "complete":
                break
            time.sleep(0.1)
        assert "tunelab run report" in wd.script("return document.title")
        images = wd.script("return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        assert len(images) >= 6, images  # loss, metrics, lr, grad norm, throughput, confusion matrix
        broken = [alt for alt, done, width in images if not done or width == 0]
        assert not broken, f"figures that did not decode: {broken}"
        network = wd.script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
            ".filter(n => !n.startsWith('data:'))"
        )
        assert network == [], f"the report requested resources: {network}"
        logs = wd.s("POST", "/se/log", {"type": "browser"})
        errors = [entry["message"] for entry in logs if entry.get("level") == "SEVERE"]
        assert not errors, f"console errors: {errors}"
        png = base64.b64decode(wd.s("GET", "/screenshot"))
        from PIL import Image

        shot = Image.open(io.BytesIO(png)).convert("L")
        assert shot.size[0] >= 800
        colours = shot.getcolors(maxcolors=1 << 16) or []
        assert len(colours) > 50, "the screenshot is (almost) blank"
        dark = sum(n for n, level in colours if level < 128) / (shot.size[0] * shot.size[1])
        assert dark > 0.002, "the screenshot has no text or plot lines"
    finally:
        if wd.session:
            try:
                wd.s("DELETE", "")
            except AssertionError:
                pass
        proc.terminate()
        proc.wait(timeout=10)
