"""The documentation site: built offline with warnings as errors, every public name in the API reference, every
config field documented with its type and default, and every guide's Python code run as written."""
from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import polypeft as pp

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GUIDES = sorted((DOCS / "guides").glob("*.md"))


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)


@pytest.mark.parametrize("guide", GUIDES, ids=lambda path: path.stem)
def test_a_guide_runs_as_written(guide, tmp_path, monkeypatch):
    """The blocks of one page run in order in one namespace, as a reader would paste them."""
    import warnings

    blocks = python_blocks(guide)
    assert blocks, f"{guide.name} has no Python block"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__guide__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for number, block in enumerate(blocks, start=1):
            exec(compile(block, f"{guide.name}, block {number}", "exec"), namespace)


def test_every_public_name_is_in_the_api_reference():
    reference = "\n".join(page.read_text(encoding="utf-8") for page in (DOCS / "api").glob("*.md"))
    shown = set(re.findall(r"^::: (\S+)", reference, flags=re.MULTILINE))
    missing = []
    for name in pp.__all__:
        module, attribute = (pp._MODULES[name], None) if name in pp._MODULES else pp._WHERE[name]
        if "polypeft" + module + ("" if attribute is None else f".{attribute}") not in shown:
            missing.append(name)
    assert not missing, f"public names without an API entry: {missing}"


def documented_fields(cls: type) -> set[str]:
    """Fields named in the class's own docstring as `name (type): meaning` (Google style, read by mkdocstrings)."""
    return set(re.findall(r"^\s+(\w+) \([^)]*\): ", cls.__doc__ or "", flags=re.MULTILINE))


def test_every_config_field_has_its_type_default_and_meaning():
    from polypeft.core.method_config import MethodConfig
    from polypeft.methods.registry import registered_methods

    shared = {f.name for f in dataclasses.fields(MethodConfig)}
    assert documented_fields(MethodConfig) == shared
    for entry in registered_methods().values():
        cls = entry.config_class
        inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)
                     for f in dataclasses.fields(base)}
        own = {f.name for f in dataclasses.fields(cls)} - inherited
        assert own <= documented_fields(cls), f"{cls.__name__} leaves {sorted(own - documented_fields(cls))} out"
        for field in dataclasses.fields(cls):
            if field.name in own:
                default = re.escape(str(field.default))
                assert re.search(rf"{field.name} \([^)]*\): Default \"?{default}\"?[ .:(]", cls.__doc__), \
                    f"{cls.__name__}.{field.name}: its docstring does not give its default {field.default!r}"
    lms = documented_fields(pp.LMSConfig)
    assert {"rank", "shared_route", "target_modules", "freeze_base", "modules_to_save", "keep_base_dtype"} <= lms


def test_forward_says_how_routes_are_given():
    doc = inspect.getdoc(pp.PolyModel.forward)
    for argument in ("src_lang", "tgt_lang", "lang"):
        assert f"{argument}:" in doc, argument
    assert "Define the computation" not in doc  # torch's generic text


@pytest.mark.slow
def test_the_site_builds_offline_with_warnings_as_errors(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    configs = (tmp_path / "site" / "api" / "configs" / "index.html").read_text(encoding="utf-8")
    for field in ("keep_base_dtype", "modules_to_save", "synthesis", "source_layer_offset", "budget"):
        assert field in configs, field
    assert "src_lang" in (tmp_path / "site" / "api" / "model" / "index.html").read_text(encoding="utf-8")
    assert (tmp_path / "site" / "figures" / "lrp2_heatmap_de.png").stat().st_size > 1000
    assert not (tmp_path / "site" / "hooks.py").exists()
