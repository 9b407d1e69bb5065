"""Execute every notebook top to bottom in a fresh kernel of this interpreter (a failing cell fails the test) and
check that the outputs stored in the file are those of its current cells (``python notebooks/refresh.py``
stores them), reusing that one execution.

Marked ``notebooks`` (they run by default; ``-m "not notebooks"`` skips them). The kernel is a spec written to a
temporary Jupyter path that starts `sys.executable` (notebooks/refresh.py), so the test works in any fresh venv
with the dev extras, whatever "python3" kernel the machine has registered.
"""
import importlib.util
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("notebook_refresh", ROOT / "notebooks" / "refresh.py")
refresh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(refresh)

NOTEBOOKS = refresh.notebooks()
# Figures each notebook displays at least (03: one more where Graphviz renders the tree).
MIN_FIGURES = {"01_quick_start": 8, "02_protopnet": 5, "03_prototree": 3, "04_interpretable_cnn": 3,
               "05_posthoc_comparison": 1, "06_pipnet": 4, "07_concept_bottleneck": 5, "08_bcos": 3}

pytestmark = pytest.mark.notebooks


def test_the_notebooks_are_valid_and_stored_with_their_figures():
    assert [p.stem for p in NOTEBOOKS] == sorted(MIN_FIGURES)
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert refresh.figures(nb) >= MIN_FIGURES[path.stem], \
            f"{path.name} is stored without its figures; run python notebooks/refresh.py {path.stem}"


def test_the_staleness_check_can_fail():
    """A stored notebook whose cell was edited after its run, or whose outputs were stripped, is stale."""
    stored = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1", execution_count=1, outputs=[
        nbformat.v4.new_output("execute_result", data={"text/plain": "2"}, execution_count=1)])])
    stored.metadata["interpretable_zoo"] = {"sources_sha256": refresh.sources_digest(stored)}
    fresh = nbformat.from_dict(stored)
    assert refresh.stale_outputs(stored, fresh) == []
    edited = nbformat.from_dict(stored)
    edited.cells[0].source = "1 + 2"
    assert any("sources_sha256" in p for p in refresh.stale_outputs(edited, edited))
    stripped = nbformat.from_dict(stored)
    stripped.cells[0].outputs, stripped.cells[0].execution_count = [], None
    problems = refresh.stale_outputs(stripped, fresh)
    assert any("execution counts" in p for p in problems) and any("cell 1 shows []" in p for p in problems)


@pytest.fixture(scope="module")
def kernel():
    with refresh.kernel_environment():
        yield


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom_and_its_stored_outputs_are_current(path, kernel):
    start = time.perf_counter()
    executed = refresh.execute(path)  # raises CellExecutionError naming the failing cell
    seconds = time.perf_counter() - start
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = refresh.figures(executed)
    assert figures >= MIN_FIGURES[path.stem], f"{path.name} displayed {figures} figures"
    print(f"{path.name}: {seconds:.0f} s, {figures} figures")
    problems = refresh.stale_outputs(nbformat.read(path, as_version=4), executed)
    assert not problems, f"{path.name}: stored outputs are stale ({'; '.join(problems)}); " \
                         f"run python notebooks/refresh.py {path.stem}"
