"""MkDocs hooks of the documentation site (``mkdocs.yml``): everything that follows the code is built here,
from what is present at build time, so a new family page, method page or module needs no edit of the site.

- The navigation: fixed pages first, then every ``families/*.md``, ``methods/*.md`` and any other top-level
  page that exists, the notebooks and the API reference.
- The API reference: one page per public module of ``models/``, ``explain/``, ``train/`` (every ``*.py``
  not starting with ``_``), rendered by mkdocstrings from the docstrings.
- The tables of explanation methods and metrics, from the registries (``explain.posthoc``,
  ``explain.prototype_localisation``, ``explain.metrics``), replacing ``<!-- zoo:methods -->`` and its kin, and
  a release's figures from the gallery (``<!-- zoo:gallery NAME -->``, for the family pages).
- The notebooks (``notebooks/*.ipynb``, stored with their outputs) as pages with their figures.
"""
from __future__ import annotations

import ast
import base64
import importlib
import inspect
import json
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGES = ("models", "explain", "train")
# Pages in this order; every other top-level page joins the "Explanations" section after the method pages.
FIRST = [{"Home": "index.md"}, {"Getting started": "getting-started.md"}]
AFTER = ["benchmarks.md", "comparison.md", "prototype_sanity.md", "reproduce.md", "gallery/index.md"]
OWN = {"index.md", "getting-started.md", "explanations.md", *AFTER}


def public_modules() -> list[str]:
    """Dotted names of the public modules: every ``<package>/<name>.py`` with no leading underscore."""
    return [f"{package}.{path.stem}" for package in PACKAGES
            for path in sorted((ROOT / package).glob("*.py")) if not path.stem.startswith("_")]


def _summary(module: str) -> str:
    """First sentence of a module's docstring, read without importing it."""
    doc = ast.get_docstring(ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text(encoding="utf-8"))) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    return re.split(r"(?<=[a-z)`])\.\s", first)[0].rstrip(".")


def _pages(folder: str) -> list[str]:
    return [f"{folder}/{p.name}" for p in sorted((DOCS / folder).glob("*.md"))] if (DOCS / folder).is_dir() else []


def _notebooks() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("*.ipynb"))


def on_config(config):
    others = sorted(p.name for p in DOCS.glob("*.md") if p.name not in OWN)
    config["nav"] = [
        *FIRST,
        {"Families": _pages("families")},
        {"Explanations and metrics": ["explanations.md", *_pages("methods"), *others]},
        *[page for page in AFTER if (DOCS / page).is_file()],
        {"Notebooks": [f"notebooks/{p.stem}.md" for p in _notebooks()]},
        {"API reference": ["reference/index.md", *[
            {package: [f"reference/{m}.md" for m in public_modules() if m.startswith(package + ".")]} for package in PACKAGES]]},
    ]
    return config


# ------------------------------------------------------------------------------ generated pages
def _reference_index() -> str:
    rows = "\n".join(f"| [`{m}`]({m}.md) | {_summary(m)} |" for m in public_modules())
    return ("# API reference\n\nOne page per public module, generated from its docstrings. Imports run one way: "
            "`models` <- `explain` <- `train`.\n\n| module | what it holds |\n|---|---|\n" + rows + "\n")


def _cell_text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def notebook_page(path: Path) -> tuple[str, dict[str, bytes]]:
    """A notebook as Markdown (markdown cells as they are, code in fences, stored outputs below each cell)
    and its figures as PNG files named relative to the page."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    parts = [f"*`notebooks/{path.name}`, shown with its stored outputs (`python notebooks/refresh.py` "
             "executes every notebook again and stores them).*"]
    images: dict[str, bytes] = {}
    for cell in nb["cells"]:
        source = _cell_text(cell.get("source", ""))
        if cell["cell_type"] == "markdown":
            parts.append(source)
            continue
        if cell["cell_type"] != "code":
            continue
        parts.append(f"```python\n{source}\n```")
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                name = f"{path.stem}/{len(images)}.png"
                images[name] = base64.b64decode(_cell_text(data["image/png"]))
                parts.append(f"![output {len(images)}]({name})")
            elif output.get("output_type") == "stream" or "text/plain" in data:
                text = _cell_text(output.get("text", data.get("text/plain", ""))).rstrip()
                if text:
                    parts.append("```text\n" + text + "\n```")
            elif output.get("output_type") == "error":
                parts.append("```text\n" + "\n".join(output.get("traceback", [])) + "\n```")
    if not any(cell.get("outputs") for cell in nb["cells"] if cell["cell_type"] == "code"):
        parts.insert(1, "!!! note\n    This notebook is stored without outputs; `python notebooks/refresh.py` "
                        "stores them.")
    return "\n\n".join(parts) + "\n", images


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, "reference/index.md", content=_reference_index()))
    for module in public_modules():
        page = f"# `{module}`\n\n::: {module}\n"
        files.append(File.generated(config, f"reference/{module}.md", content=page))
    for path in _notebooks():
        page, images = notebook_page(path)
        files.append(File.generated(config, f"notebooks/{path.stem}.md", content=page))
        for name, data in images.items():
            files.append(File.generated(config, f"notebooks/{name}", content=data))
    return files


# ------------------------------------------------------------------------------ registry tables
# "(Chen et al., NeurIPS 2019)", "(Zeiler and Fergus 2014; ...)", "(Adebayo et al. 2018)": the first one cited
_CITATION = re.compile(r"\(((?:[A-Z][\w-]+(?: et al\.?| and [A-Z][\w-]+)?),? (?:[A-Za-z]+ )?(?:19|20)\d\d[a-z]?)[);,']")


def _first_line(fn) -> str:
    doc = " ".join((inspect.getdoc(fn) or "").split("\n\n")[0].split())
    return doc.replace("|", "\\|")


def _paper(fn) -> str:
    found = _CITATION.search(" ".join((inspect.getdoc(fn) or "").split()))
    return found.group(1) if found else "-"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"<{type(value).__name__} of {len(value)}>" if hasattr(value, "__len__") else "..."


def _options(fn, skip: set[str]) -> str:
    params = [p for name, p in inspect.signature(fn).parameters.items() if name not in skip
              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    shown = [f"`{p.name}`" if p.default is p.empty else f"`{p.name}={_short(p.default)}`" for p in params]
    return ", ".join(shown).replace("|", "\\|") or "-"


def _import_explain() -> None:
    """Import every public explain module of this checkout (whatever else is installed), so that every
    registration has run. (sys.path is set here: mkdocs restores it after loading the hooks.)"""
    if str(ROOT) not in sys.path[:1]:
        sys.path.insert(0, str(ROOT))
    import explain.viz  # noqa: F401 - explain.viz and explain.prototype_views import each other, viz first

    for module in public_modules():
        if module.startswith("explain."):
            importlib.import_module(module)


def methods_table() -> str:
    """Every method of `explain.posthoc.attribute`: its kind, options, what it computes and its paper."""
    from explain import posthoc

    rows = ["| method | needs | options | what it computes | follows |", "|---|---|---|---|---|"]
    for name in posthoc.list_methods():
        spec = posthoc.describe_method(name)
        fn = spec["fn"]
        needs = ", ".join(k for k in ("gradient", "layer") if spec[k]) or "-"
        rows.append(f"| `{name}` | {needs} | {_options(fn, {'model', 'images', 'target', 'layer'})} | "
                    f"{_first_line(fn)} | {_paper(fn)} |")
    return "\n".join(rows)


def localisation_table() -> str:
    """The prototype localisation methods of `explain.prototype_localisation`."""
    from explain import prototype_localisation as pl

    rows = ["| method | what it computes |", "|---|---|"]
    doc = inspect.getdoc(pl) or ""
    for name in pl.METHODS:
        found = re.search(rf"^- ``{name}``: (.*?)(?=^- |^\s*$)", doc, flags=re.M | re.S)
        rows.append(f"| `{name}` | {' '.join(found.group(1).split()) if found else '-'} |")
    return "\n".join(rows)


def metrics_table() -> str:
    """Every function exported by `explain.metrics`: its options, what it scores and its paper; the names
    `python -m train.compare` takes are marked."""
    from explain import compare, metrics

    rows = ["| function | `train.compare` metric | options | what it computes | follows |", "|---|---|---|---|---|"]
    for name in metrics.__all__:
        fn = getattr(metrics, name)
        if not inspect.isfunction(fn):
            continue
        keys = [k for k in compare.METRICS if k == name or k.startswith(name + "_")]
        cli = ", ".join(f"`{k}`" for k in keys) or "-"
        rows.append(f"| `{name}` | {cli} | {_options(fn, {'model', 'images', 'heatmaps', 'target'})} | "
                    f"{_first_line(fn)} | {_paper(fn)} |")
    return "\n".join(rows)


def gallery_section(name: str, page_uri: str) -> str:
    """The section of release `name` in ``docs/gallery/index.md`` (written by ``python -m train.gallery``), its
    images linked from the page at `page_uri`."""
    gallery = DOCS / "gallery" / "index.md"
    text = gallery.read_text(encoding="utf-8") if gallery.is_file() else ""
    found = re.search(rf"^## `{re.escape(name)}`\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    if found is None:
        raise ValueError(f"{page_uri}: the gallery has no release {name!r}; run python -m train.gallery --out docs/gallery")
    prefix = "../" * page_uri.count("/") + "gallery/"
    return re.sub(r"\]\((?!https?:)([^)]+)\)", lambda m: f"]({prefix}{m.group(1)})", found.group(1).strip())


TABLES = {"methods": methods_table, "localisation": localisation_table, "metrics": metrics_table}
MARKER = re.compile(r"<!-- zoo:(\w+)(?: ([\w.-]+))? -->")


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Replace ``<!-- zoo:TABLE -->`` by a generated table and ``<!-- zoo:gallery NAME -->`` by a release's figures."""
    def replace(match: re.Match) -> str:
        kind, argument = match.groups()
        if kind == "gallery" and argument:
            return gallery_section(argument, page.file.src_uri)
        if kind not in TABLES:
            raise ValueError(f"{page.file.src_uri}: unknown marker {match.group(0)}; known: gallery NAME, {', '.join(TABLES)}")
        _import_explain()
        return TABLES[kind]()

    return MARKER.sub(replace, markdown)
