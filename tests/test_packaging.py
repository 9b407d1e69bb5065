"""A non-editable wheel holds the packages, the released checkpoints, the manifest and the recipes, and an
install of it loads every released checkpoint by name with no source tree in sight."""
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_NOT_SOURCE = shutil.ignore_patterns(".git", "runs", "build", "dist", "*.egg-info", "__pycache__", "wandb",
                                     "lightning_logs", ".pytest_cache", ".hypothesis", "reports", "*.tmp")


def _pip(*args: str, cwd: Path) -> None:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    done = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a clean copy of the tree (building in place would leave build/ in the checkout)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE)
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(work / "dist"), str(src), cwd=work)
    (found,) = (work / "dist").glob("interpretable_zoo-*.whl")
    return found


def _source_files(folder: str, pattern: str) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).glob(pattern) if "__pycache__" not in p.parts}


def test_wheel_holds_packages_released_files_manifest_and_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("models", "explain", "train"):
        expected = _source_files(package, "**/*.py")
        assert f"{package}/__init__.py" in expected and expected <= names, sorted(expected - names)
    manifest = json.loads((ROOT / "checkpoints" / "manifest.json").read_text())["checkpoints"]
    released = {f"checkpoints/{record['file']}" for record in manifest.values()}
    assert released and released <= names and released == _source_files("checkpoints", "*.pt")
    assert "checkpoints/manifest.json" in names
    configs = _source_files("configs", "**/*.yaml")
    assert {"configs/cam/synthetic.yaml", "configs/protopnet/synthetic.yaml"} <= configs <= names
    assert not {n for n in names if n.startswith(("tests/", "notebooks/", "benchmarks/"))}


def test_license_is_an_spdx_expression():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert isinstance(project["license"], str)  # PEP 639; the {text = ...} table is deprecated


_PROBE = """
import json, sys
import models
from models.pretrained import CHECKPOINT_DIR, pretrained_entry
out = {"models": models.__file__, "checkpoints": str(CHECKPOINT_DIR), "loaded": {}, "configs": {}}
for name in models.list_pretrained():
    model = models.load_pretrained(name)  # verifies the sha256 against the installed manifest
    out["loaded"][name] = type(model).__name__
    config = pretrained_entry(name).config_file
    out["configs"][name] = [str(config), config.is_file()]
print(json.dumps(out))
"""


def test_installed_wheel_loads_every_release_by_name_from_elsewhere(wheel, tmp_path):
    site = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "--target", str(site), str(wheel), cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), WANDB_MODE="disabled")
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(out["models"]).is_relative_to(site) and Path(out["checkpoints"]) == site / "checkpoints"
    manifest = json.loads((ROOT / "checkpoints" / "manifest.json").read_text())["checkpoints"]
    assert set(out["loaded"]) == set(manifest)
    for name, record in manifest.items():
        assert out["loaded"][name] == record["class_path"].rsplit(".", 1)[1]
        path, exists = out["configs"][name]
        assert exists and Path(path) == site / record["config"], name


def test_every_explain_module_imports_first(repo_root):
    """Each module of explain/ imports on its own, first of its package (no import cycle that only a
    given order hides): one interpreter, the explain package dropped from sys.modules before each import."""
    names = sorted(p.stem for p in (repo_root / "explain").glob("*.py") if not p.stem.startswith("_"))
    probe = ("import importlib, sys, traceback\n"
             "import models, torch  # loaded once; only explain's own modules are imported afresh\n"
             "failed = []\n"
             "for name in sys.argv[1:]:\n"
             "    for key in [k for k in sys.modules if k == 'explain' or k.startswith('explain.')]:\n"
             "        del sys.modules[key]\n"
             "    try:\n"
             "        importlib.import_module(f'explain.{name}')\n"
             "    except Exception:\n"
             "        failed.append(name + ': ' + traceback.format_exc().splitlines()[-1])\n"
             "print('\\n'.join(failed))\n")
    done = subprocess.run([sys.executable, "-c", probe, *names], cwd=repo_root, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"modules that fail to import first:\n{done.stdout}"
