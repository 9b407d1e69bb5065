"""Execute the notebooks top to bottom in a fresh kernel and store them with their outputs, so their figures show
on the repository page and in the documentation site.

    python notebooks/refresh.py                 # every notebooks/*.ipynb
    python notebooks/refresh.py 03_prototree    # some of them

The kernel runs this interpreter (a kernel spec written to a temporary Jupyter path), from ``notebooks/`` as a
user would, with wandb off. Each stored notebook records the digest of its code cells
(``metadata.interpretable_zoo.sources_sha256``); `stale_outputs` compares a stored notebook with a fresh
execution (tests/test_notebooks.py does so with the execution it runs anyway).
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import nbclient
import nbformat

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KERNEL = "izoo-notebook-kernel"
TIMEOUT = 600  # seconds per cell
# A code cell tagged so shows what the machine offers (a Graphviz rendering where `dot` is installed, else text):
# its displays are not compared with a fresh run's.
SYSTEM_TAG = "depends-on-system"


def notebooks(names: Sequence[str] = ()) -> list[Path]:
    """The notebooks named (stems or file names), or all of ``notebooks/*.ipynb``."""
    every = sorted(HERE.glob("*.ipynb"))
    if not names:
        return every
    by_stem = {p.stem: p for p in every}
    unknown = [n for n in names if Path(n).stem not in by_stem]
    if unknown:
        raise SystemExit(f"error: no notebook {', '.join(unknown)} in {HERE}; notebooks: {', '.join(by_stem)}")
    return [by_stem[Path(n).stem] for n in names]


@contextlib.contextmanager
def kernel_environment() -> Iterator[None]:
    """Environment of a kernel that runs this interpreter with the checkout importable and wandb off."""
    keys = ("JUPYTER_PATH", "PYTHONPATH", "WANDB_MODE", "MPLBACKEND")
    before = {k: os.environ.get(k) for k in keys}
    with tempfile.TemporaryDirectory() as data:
        spec = Path(data) / "kernels" / KERNEL
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "interpretable-zoo", "language": "python"}))
        os.environ.update(JUPYTER_PATH=data, PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
        os.environ.pop("MPLBACKEND", None)  # the kernel picks its inline backend
        try:
            yield
        finally:
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def sources_digest(nb: nbformat.NotebookNode) -> str:
    """sha256 of the code cells' sources, in order."""
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    return hashlib.sha256(json.dumps(code).encode()).hexdigest()


def execute(path: Path) -> nbformat.NotebookNode:
    """A freshly executed copy of the notebook (the file is not written); call inside `kernel_environment`.
    Raises nbclient's CellExecutionError naming the failing cell."""
    nb = nbformat.read(path, as_version=4)
    kernelspec = nb.metadata.get("kernelspec")
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=TIMEOUT, record_timing=False,
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    if kernelspec is not None:
        nb.metadata["kernelspec"] = kernelspec  # keep the user's "python3", not the temporary kernel
    nb.metadata["interpretable_zoo"] = {"sources_sha256": sources_digest(nb)}
    return nb


def _displays(cell: nbformat.NotebookNode) -> list[tuple[str, tuple[str, ...]]]:
    """What a cell shows, streams left out (warnings and progress text vary from run to run)."""
    return [(o.output_type, tuple(sorted(o.get("data", {})))) for o in cell.get("outputs", []) if o.output_type != "stream"]


def figures(nb: nbformat.NotebookNode) -> int:
    """PNG figures among the outputs."""
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def stale_outputs(stored: nbformat.NotebookNode, executed: nbformat.NotebookNode) -> list[str]:
    """Why the stored outputs are not those of the current cells (empty if they are): the cells, the recorded
    digest of the sources, one top-to-bottom run (execution counts 1..N), and per cell the same displays
    (figures, tables, results) as a fresh execution, cells tagged `SYSTEM_TAG` left out."""
    problems = []
    code = [c for c in stored.cells if c.cell_type == "code"]
    fresh = [c for c in executed.cells if c.cell_type == "code"]
    if [c.source for c in code] != [c.source for c in fresh]:
        return ["the code cells differ from the executed notebook's"]
    recorded = stored.metadata.get("interpretable_zoo", {}).get("sources_sha256")
    if recorded != sources_digest(stored):
        problems.append("no outputs of these sources are recorded (sources_sha256 missing or different)")
    counts = [c.execution_count for c in code]
    if counts != list(range(1, len(code) + 1)):
        problems.append(f"not one top-to-bottom run: execution counts {counts}")
    for i, (old, new) in enumerate(zip(code, fresh)):
        if SYSTEM_TAG in old.metadata.get("tags", []):
            continue
        if _displays(old) != _displays(new):
            problems.append(f"code cell {i + 1} shows {_displays(old)} but a fresh run shows {_displays(new)}")
    return problems


def shrink_figures(nb: nbformat.NotebookNode) -> None:
    """Store every PNG output with a 256-colour palette (a third of the bytes; `train.gallery.small_png`)."""
    sys.path.insert(0, str(ROOT))
    from train.gallery import small_png

    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if "image/png" in output.get("data", {}):
                png = small_png(base64.b64decode(output.data["image/png"]))
                output.data["image/png"] = base64.b64encode(png).decode("ascii")


def main(argv: Sequence[str] | None = None) -> None:
    """Execute and store the notebooks named in `argv` (default: all)."""
    paths = notebooks(sys.argv[1:] if argv is None else argv)
    with kernel_environment():
        for path in paths:
            nb = execute(path)
            shrink_figures(nb)
            nbformat.validate(nb)
            nbformat.write(nb, path)
            print(f"{path.relative_to(ROOT)}: {figures(nb)} figures, {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
