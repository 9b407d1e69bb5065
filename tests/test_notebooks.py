"""Execute every notebook top to bottom in a fresh kernel of this interpreter; a failing cell fails the test.

Marked ``notebooks`` (they run by default; ``-m "not notebooks"`` skips them). The kernel is a spec
written to a temporary Jupyter path that starts `sys.executable`, so the test works in any fresh venv
with the dev extras, whatever "python3" kernel the machine has registered.
"""
import json
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "izoo-test-kernel"
# Figures each notebook displays at least (03: one more where Graphviz renders the tree).
MIN_FIGURES = {"01_quick_start": 8, "02_protopnet": 5, "03_prototree": 3, "04_interpretable_cnn": 3,
               "05_posthoc_comparison": 1, "07_concept_bottleneck": 5}

pytestmark = pytest.mark.notebooks


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A Jupyter data dir holding a kernel spec for this interpreter."""
    data = tmp_path_factory.mktemp("jupyter")
    spec = data / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "interpretable-zoo tests", "language": "python",
    }))
    return data


def test_there_are_five_notebooks_without_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_quick_start.ipynb", "02_protopnet.ipynb", "03_prototree.ipynb",
                                           "04_interpretable_cnn.ipynb", "05_posthoc_comparison.ipynb",
                                           "07_concept_bottleneck.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, kernel_env, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_env))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel picks its inline backend
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=300,
                                     resources={"metadata": {"path": str(path.parent)}})  # run from notebooks/, as a user would
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the failing cell
    seconds = time.perf_counter() - start
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = sum("image/png" in o.get("data", {}) for o in outputs)
    assert figures >= MIN_FIGURES[path.stem], f"{path.name} displayed {figures} figures"
    print(f"{path.name}: {seconds:.0f} s, {figures} figures")
