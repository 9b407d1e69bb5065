"""Headless Chromium for the tests that open pages (the HTML report, the documentation site): where it is,
how to run it, and how many of a page's images decoded."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
if CHROMIUM is None and Path("/usr/bin/chromium").is_file():
    CHROMIUM = "/usr/bin/chromium"
SKIP_REASON = "Chromium is not installed (apt-get install chromium; .ci/run does)"

def chromium(tmp_path: Path, *args: str) -> str:
    """Run headless Chromium with a throw-away profile under `tmp_path`; its stdout."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000"]
    done = subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def images_loaded(tmp_path: Path, page: Path) -> tuple[int, int]:
    """(decoded, total) images of a page that carries `explain.report.CHECK_SCRIPT`."""
    dom = chromium(tmp_path, "--dump-dom", page.as_uri())
    found = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert found, "the page's image check did not run: " + dom[-500:]
    return int(found.group(1)), int(found.group(2))
