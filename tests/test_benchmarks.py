"""Every benchmark script runs with --quick and prints its table (speed itself is measured by the
scripts, never asserted here)."""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# A line of each script's table header (a new script without an entry fails the coverage test).
# The torch scripts run on one thread: on a shared 2-core machine two OpenMP threads per process
# spin against the other jobs and multiply the wall time of these tiny problems several times.
HEADERS = {
    "dissect.py": "max |dIoU|",
    "icnn_vs_plain.py": "test acc",
    "last_layer.py": "| path | time (s) | CPU s | image-passes/s |",
    "metrics.py": "img-steps/s",
    "prototree.py": "ms/step",
    "push.py": "push/pass",
    "road.py": "| size | variant | s per image and fraction |",
    "synthetic_speed.py": "| size | case |",
    "train_step.py": "| family | step (ms) | images/s |",
}
HELPERS = {"common.py", "__init__.py"}  # imported by the scripts, not run
NO_TORCH = {"synthetic_speed.py"}  # no --threads option


def test_every_benchmark_script_is_covered():
    scripts = {p.name for p in (ROOT / "benchmarks").glob("*.py")} - HELPERS
    assert scripts == set(HEADERS)


@pytest.mark.parametrize("script", sorted(HEADERS))
def test_benchmark_runs_quick_and_prints_its_table(script):
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled", CUDA_VISIBLE_DEVICES="")
    threads = [] if script in NO_TORCH else ["--threads", "1"]
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *threads], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert HEADERS[script] in result.stdout, result.stdout[-2000:]
    header = next(i for i, line in enumerate(result.stdout.splitlines()) if HEADERS[script] in line)
    assert len(result.stdout.splitlines()) >= header + 3  # the header is followed by rows
