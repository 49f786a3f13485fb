"""``report.html`` in a real browser: headless Chromium renders it, takes a screenshot, and
reports every image's decoded size, console errors and the summary table's rows.

Chromium is the Debian package ``chromium``; the session fixture installs it with apt-get
when it is missing and apt is usable (as root), and skips the tests otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg
from test_reports_data import built_report, report_inputs  # noqa: F401  (fixtures)

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]

# Runs before the page's content: records errors (scripts, failed resources, console.error)
# and, once the page has loaded, writes what it saw into the DOM for --dump-dom.
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  window.__errors.push(String(e.message || (e.target && e.target.src || "").slice(0, 80)));
}, true);
var __error = console.error;
console.error = function () {
  window.__errors.push(Array.prototype.join.call(arguments, " "));
  __error.apply(console, arguments);
};
window.addEventListener("load", function () {
  var images = Array.prototype.map.call(document.images, function (img) {
    return {alt: img.alt, width: img.naturalWidth, height: img.naturalHeight,
            complete: img.complete};
  });
  var out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({
    images: images, errors: window.__errors,
    summaryRows: document.querySelectorAll("#summary tbody tr").length,
    summaryModels: Array.prototype.map.call(
      document.querySelectorAll("#summary tbody tr td:first-child"),
      function (td) { return td.textContent; })
  });
  document.body.appendChild(out);
});
</script>"""


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


@pytest.fixture(scope="session")
def chromium() -> str:
    """The chromium executable, installed with apt-get when missing (root only)."""
    path = _find_chromium()
    if path is None and hasattr(os, "geteuid") and os.geteuid() == 0 and \
            shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]
        if subprocess.run(install, env=env, capture_output=True, timeout=1200).returncode:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True,
                           timeout=600)
            subprocess.run(install, env=env, capture_output=True, timeout=1200)
        path = _find_chromium()
    if path is None:
        message = "chromium is not installed and cannot be installed with apt-get here"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must really render the report, never skip it
        pytest.skip(message)
    return path


def _run(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    profile.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def _png_size(data: bytes) -> tuple[int, int]:
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_report_renders_in_chromium(chromium: str, built_report, tmp_path: Path) -> None:  # noqa: F811
    html = built_report.html
    out = built_report.out_dir

    # 1. The report itself: a screenshot, and no console message at all (it has no scripts,
    #    so any message would be a blocked resource or a parse problem).
    shot = tmp_path / "report.png"
    proc = _run(chromium, tmp_path / "p1", f"--screenshot={shot}",
                "--window-size=1280,3600", html.as_uri())
    assert _console(proc.stderr) == []
    pixels = mpimg.imread(shot)
    assert pixels.shape[:2] == (3600, 1280)
    assert float(np.std(pixels[..., :3])) > 0.05  # not a blank page
    if os.environ.get("LIPCERT_SCREENSHOT"):
        shutil.copy(shot, os.environ["LIPCERT_SCREENSHOT"])

    # 2. The same page with a probe script (and without the page's script-blocking CSP).
    text = html.read_text(encoding="utf-8")
    text = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", text)
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    proc = _run(chromium, tmp_path / "p2", "--dump-dom", "--virtual-time-budget=5000",
                probed.as_uri())
    match = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert match, proc.stdout[-2000:]
    seen = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert seen["errors"] == []
    assert _console(proc.stderr) == []

    figures = sorted((out / "figures").iterdir())
    assert len(seen["images"]) == len(figures) == 5
    expected = {_png_size(p.read_bytes()) for p in figures}
    for img in seen["images"]:
        assert img["complete"] and img["width"] > 0, f"broken image: {img['alt']}"
    assert {(i["width"], i["height"]) for i in seen["images"]} == expected

    models = list(built_report.summary["model"])
    assert seen["summaryRows"] == len(models) == 3
    assert [m.strip() for m in seen["summaryModels"]] == models
