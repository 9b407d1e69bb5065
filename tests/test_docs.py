"""The documentation site: ``mkdocs build --strict`` (no broken link, reference, snippet or docstring section),
a page for every family, method and module present, every public function and class documented, the docstring
examples run, and in headless Chromium the index and a family page load every image."""
from __future__ import annotations

import doctest
import json
import importlib
import inspect
import re
import sys
import time
from pathlib import Path

import pytest

mkdocs_build = pytest.importorskip("mkdocs.commands.build")
from mkdocs.config import load_config  # noqa: E402
from mkdocs.exceptions import Abort  # noqa: E402

from browser import CHROMIUM, SKIP_REASON, images_loaded  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import hooks  # noqa: E402  - docs/hooks.py, the site's own code

import explain.viz  # noqa: E402,F401 - explain.viz and explain.prototype_views import each other: viz first


def _build(config_file: Path, site: Path, **overrides) -> None:
    config = load_config(str(config_file), site_dir=str(site), strict=True, **overrides)
    mkdocs_build.build(config)  # strict: any warning raises Abort


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    start = time.perf_counter()
    _build(ROOT / "mkdocs.yml", out)
    print(f"mkdocs build --strict: {time.perf_counter() - start:.1f} s")
    return out


def _html(site: Path, page: str) -> str:
    return (site / page / "index.html").read_text(encoding="utf-8")


def test_every_family_method_page_module_and_notebook_has_a_page(site):
    for page in (ROOT / "docs").rglob("*.md"):
        rel = page.relative_to(ROOT / "docs").with_suffix("")
        built = site / (rel.parent if rel.name == "index" else rel) / "index.html"  # use_directory_urls
        assert built.is_file(), f"docs/{rel}.md was not built"
    for module in hooks.public_modules():
        page = _html(site, f"reference/{module}")
        imported = importlib.import_module(module)
        for name in getattr(imported, "__all__", []):
            home = getattr(getattr(imported, name), "__module__", module)  # a re-export is documented at home
            home = home if home in hooks.public_modules() else module
            assert f'id="{home}.{name}"' in (page if home == module else _html(site, f"reference/{home}")), \
                f"reference/{home} does not document {name}"
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):  # with every stored figure
        stored = sum("image/png" in o.get("data", {}) for c in json.loads(notebook.read_text())["cells"]
                     for o in c.get("outputs", []))
        folder = site / "notebooks" / notebook.stem
        sources = re.findall(r'<img [^>]*src="([^"]+)"', (folder / "index.html").read_text(encoding="utf-8"))
        assert len(sources) == stored and all((folder / src).is_file() for src in sources), notebook.name
    home = _html(site, "")
    for family in sorted((ROOT / "docs" / "families").glob("*.md")):
        assert f'href="families/{family.stem}/"' in home, f"families/{family.name} is not in the navigation"


def test_the_methods_page_lists_every_registered_method_and_metric_with_its_options(site):
    from explain import metrics, posthoc

    page = _html(site, "explanations")
    rows = dict(re.findall(r"<tr>\s*<td><code>(\w+)</code></td>(.*?)</tr>", page, flags=re.S))
    assert set(posthoc.list_methods()) <= set(rows), set(posthoc.list_methods()) - set(rows)
    functions = {n for n in metrics.__all__ if inspect.isfunction(getattr(metrics, n))}
    assert functions <= set(rows), functions - set(rows)
    assert "<code>n_masks=6000</code>" in rows["rise"] and "Petsiuk et al. 2018" in rows["rise"]  # options, paper
    assert "<code>road_morf</code>" in rows["road"] and "Rong et al. 2022" in rows["road"]


def test_the_benchmarks_page_includes_the_latest_tables(site):
    page = _html(site, "benchmarks")
    readme = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    for cell in re.findall(r"^\| `(\w+\.py)` \|", readme, flags=re.M):
        assert f"<code>{cell}</code>" in page


def test_a_broken_link_or_reference_fails_the_strict_build(tmp_path):
    """The checks the site's build relies on can fail: the same validation settings abort on a broken
    link and on a mkdocstrings reference to nothing."""
    import yaml

    settings = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["validation"]
    for body in ("[gone](missing.md)", "::: models.no_such_module"):
        docs = tmp_path / body[:4] / "docs"
        docs.mkdir(parents=True)
        (docs / "index.md").write_text(f"# Home\n\n{body}\n")
        config = docs.parent / "mkdocs.yml"
        config.write_text(yaml.safe_dump({"site_name": "t", "validation": settings, "plugins": [
            {"mkdocstrings": {"handlers": {"python": {"paths": [str(ROOT)]}}}}]}))
        with pytest.raises(Abort):
            _build(config, docs.parent / "site")


def _public_objects():
    """(qualified name, object) of every function and class in the public modules' ``__all__`` (or, without
    one, defined there without a leading underscore) and every public method and property of those classes."""
    for module_name in hooks.public_modules():
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None) or [n for n, v in vars(module).items() if not n.startswith("_")
                                                     and getattr(v, "__module__", None) == module_name]
        for name in names:
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            yield f"{module_name}.{name}", obj
            if inspect.isclass(obj) and obj.__module__ == module_name:
                for attr, value in vars(obj).items():
                    function = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                    if not attr.startswith("_") and inspect.isfunction(function):
                        yield f"{module_name}.{name}.{attr}", getattr(obj, attr)


def test_every_public_function_and_class_has_a_docstring():
    objects = dict(_public_objects())
    assert len(objects) > 300  # the walk reaches the modules' API
    undocumented = sorted(name for name, obj in objects.items() if not inspect.getdoc(obj))  # inherited docs count
    assert not undocumented, "public objects without a docstring:\n" + "\n".join(undocumented)


def test_the_docstring_examples_run():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    examples = 0
    for module_name in hooks.public_modules():
        module = importlib.import_module(module_name)
        for test in finder.find(module, module_name):
            if test.examples:
                examples += len(test.examples)
                runner.run(test, clear_globs=True)
    results = runner.summarize(verbose=False)
    assert examples >= 10 and results.attempted == examples
    assert results.failed == 0, f"{results.failed} of {results.attempted} docstring examples failed (output above)"


@pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON)
def test_the_index_and_a_family_page_load_every_image_in_headless_chromium(site, tmp_path):
    from explain.report import CHECK_SCRIPT

    for page in ("index.html", "families/protopnet/index.html"):
        html = (site / page).read_text(encoding="utf-8")
        checked = (site / page).with_name("checked.html")  # beside the page: its relative links still resolve
        checked.write_text(html.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
        total = html.count("<img ")
        assert total >= 1 and images_loaded(tmp_path, checked) == (total, total), page
    # The check can fail: a missing image is counted.
    broken = site / "broken.html"
    broken.write_text('<html><body><img src="missing.png" alt="x">' + CHECK_SCRIPT + "</body></html>")
    assert images_loaded(tmp_path, broken) == (0, 1)
