"""Issue 27, "a saved folder is whole or untouched" and "a load checks what it loads": saves and exports are
transactions, an export follows no link out of its folder, and a load refuses weights another config built."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import polypeft as pp
from polypeft.model import savefiles
from polypeft.model.savefiles import CONFIG_NAME, WEIGHTS_NAME
from tiny_models import build, randomize_added

LANGS = ["en", "de", "fr"]


def make(synthesis: str = "pair", seed: int = 3, **options) -> pp.PolyModel:
    poly = pp.wrap(build("bart"), pp.LMSConfig(languages=LANGS, rank=2, synthesis=synthesis, **options))
    randomize_added(poly, seed=seed)
    return poly


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------------------------- transactions

def test_a_save_that_fails_half_way_leaves_the_old_folder_whole(tmp_path, monkeypatch):
    save = tmp_path / "save"
    make(seed=1).save_pretrained(save)
    before = snapshot(save)

    def card_fails(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(savefiles, "model_card", card_fails)  # the weights and config are written by then
    with pytest.raises(OSError, match="No space left"):
        make(seed=2).save_pretrained(save)
    assert snapshot(save) == before
    assert leftovers(tmp_path) == []


def test_a_save_keeps_the_users_own_files_in_its_folder(tmp_path):
    save = tmp_path / "save"
    (save / "checkpoint-1").mkdir(parents=True)
    (save / "checkpoint-1" / "optimizer.bin").write_bytes(b"the user's")
    (save / "notes.txt").write_text("mine", encoding="utf-8")
    make().save_pretrained(save)
    make(seed=5).save_pretrained(save)
    assert (save / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert (save / "checkpoint-1" / "optimizer.bin").read_bytes() == b"the user's"
    assert sorted(p.name for p in save.iterdir()) == ["README.md", "checkpoint-1", "notes.txt", CONFIG_NAME,
                                                      WEIGHTS_NAME]
    assert leftovers(tmp_path) == []


def test_a_re_export_after_pairs_to_languages_leaves_no_stale_adapter(tmp_path):
    routes = tmp_path / "routes"
    make("pair").export_lora_routes(routes)
    assert len([p for p in routes.iterdir() if p.is_dir()]) == 9
    make("language").export_lora_routes(routes)
    index = json.loads((routes / "routes.json").read_text())
    listed = {entry["path"] for entry in index["routes"]}
    assert listed == set(LANGS)
    assert {p.name for p in routes.iterdir()} == listed | {"routes.json"}


def test_an_export_follows_no_link_out_of_its_folder(tmp_path):
    routes, elsewhere = tmp_path / "routes", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not an adapter", encoding="utf-8")
    make("language").export_lora_routes(routes)
    os.rename(routes / "de", tmp_path / "old-de")
    os.symlink(elsewhere, routes / "de")  # routes/de now points out of the export
    make("language", seed=4).export_lora_routes(routes)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"], "the export wrote through the link"
    assert (routes / "de").is_dir() and not (routes / "de").is_symlink()


def test_an_export_into_a_folder_holding_the_users_files_is_refused_untouched(tmp_path):
    routes = tmp_path / "routes"
    routes.mkdir()
    (routes / "thesis.tex").write_text("mine", encoding="utf-8")
    with pytest.raises(pp.ExportError, match=r"holds \['thesis.tex'\], which no earlier export wrote"):
        make("language").export_lora_routes(routes)
    assert sorted(p.name for p in routes.iterdir()) == ["thesis.tex"]


def test_an_export_that_fails_half_way_leaves_the_old_export_whole(tmp_path):
    routes = tmp_path / "routes"
    make("language").export_lora_routes(routes)
    before = snapshot(routes)
    os.chmod(routes / "de", 0o500)  # a read-only route folder: the old export wrote into it and failed there
    try:
        poisoned = make("language", seed=9)
        with torch.no_grad():
            list(poisoned.routed_layers.values())[-1].lms_F.data[2, 0, 0] = float("nan")  # fails at the last route
        with pytest.raises(pp.NonFiniteError):
            poisoned.export_lora_routes(routes)
        assert snapshot(routes) == before
        make("language", seed=9).export_lora_routes(routes)  # a read-only folder of the old export is no obstacle
    finally:
        for folder in (routes / "de",):
            if folder.exists():
                os.chmod(folder, 0o700)
    assert snapshot(routes) != before and leftovers(tmp_path) == []


def test_an_over_long_language_code_is_refused_before_anything_is_written(tmp_path):
    code = "x" * 300
    with pytest.raises(pp.ExportError, match=r"at most 255 bytes"):
        pp.wrap(
            build("bart"), pp.LMSConfig(languages=["en", code], rank=2, synthesis="language")).export_lora_routes(
            tmp_path / "routes")
    assert not (tmp_path / "routes").exists()


# ---------------------------------------------------------------------------------------------- loads check

def rewrite_weights(folder, change_metadata=None, drop_metadata: bool = False) -> None:
    path = folder / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    if change_metadata:
        metadata = change_metadata(metadata)
    save_file(load_file(str(path)), str(path), metadata=None if drop_metadata else metadata)


def edit_config(folder, **changes) -> None:
    path = folder / CONFIG_NAME
    saved = json.loads(path.read_text())
    saved["config"].update(changes)
    path.write_text(json.dumps(saved))


def test_a_config_edited_from_pair_to_language_is_refused(tmp_path):
    make("pair").save_pretrained(tmp_path)
    edit_config(tmp_path, synthesis="language")  # same shapes, other routes
    with pytest.raises(pp.ConfigError, match=r"polypeft_model.safetensors was built by another config than the one "
                                             r"being loaded \(synthesis: weights 'pair', config 'language'\)"):
        pp.PolyModel.from_pretrained(build("bart"), tmp_path)


def test_weights_without_polypeft_metadata_are_refused_for_a_language_routed_method(tmp_path):
    make("pair").save_pretrained(tmp_path)
    rewrite_weights(tmp_path, drop_metadata=True)
    edit_config(tmp_path, languages=["de", "en", "fr"])
    with pytest.raises(pp.ConfigError, match=r"does not record the language order of its routes"):
        pp.PolyModel.from_pretrained(build("bart"), tmp_path)


def test_an_untouched_save_still_loads_exactly(tmp_path):
    model = make("pair")
    model.save_pretrained(tmp_path)
    loaded = pp.PolyModel.from_pretrained(build("bart"), tmp_path)
    for name, tensor in model.added_state_dict().items():
        assert torch.equal(loaded.added_state_dict()[name], tensor)


@pytest.mark.parametrize("content, expected", [
    ("5", r"expected a JSON object with keys config .*got int 5"),
    ("null", r"expected a JSON object with keys config .*got NoneType None"),
    ('"abc"', r"expected a JSON object with keys config .*got str 'abc'"),
    ('{"config": null, "base_model": {}}', r"'config' holds None; expected a JSON object there"),
    ('{"config": 5, "base_model": {}}', r"'config' holds 5; expected a JSON object there"),
    ('{"config": {"method": "lms", "languages": ["en"]}, "base_model": null}', r"'base_model' holds None; expected"),
    ("{", r"not valid JSON"),
])
def test_a_damaged_save_config_names_the_file_and_what_was_expected(tmp_path, content, expected):
    make().save_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(content, encoding="utf-8")
    for load in (lambda: pp.PolyModel.from_pretrained(build("bart"), tmp_path), lambda: pp.load_config(tmp_path),
                 lambda: pp.load_config(tmp_path / CONFIG_NAME)):
        with pytest.raises(pp.ConfigError, match=rf"{tmp_path / CONFIG_NAME}: {expected}"):
            load()


@pytest.mark.parametrize("content, expected", [
    ("5", r"expected a method config \(a mapping with 'method' and its fields.*got int 5"),
    ("null", r"expected a method config .*got NoneType None"),
    ('"abc"', r"expected a method config .*got str 'abc'"),
    ('{"method": "lms", "languages": ["en"], "rnak": 2}', r"unknown keys \['rnak'\] for method 'lms'"),
])
def test_a_damaged_method_config_file_names_the_file_and_what_was_expected(tmp_path, content, expected):
    path = tmp_path / "lms.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(pp.ConfigError, match=rf"{path}.*{expected}"):
        pp.load_config_file(str(path))
    with pytest.raises(pp.ConfigError, match=rf"{path}.*{expected}"):
        pp.load_config(path)
