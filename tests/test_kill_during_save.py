"""A writer killed at random moments of save_pretrained + export_lora_routes: the folder a later load reads is
always one whole save, routes.json always lists adapters of one export, and the next write leaves no temporaries."""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import signal
import time

import pytest
import torch

import polypeft as pp
from polypeft.model.card import CARD_NAME
from tiny_models import build

KILLS = 8
LANGS = ["en", "de", "fr"]


def model_of_generation(generation: int) -> pp.PolyModel:
    """Every added weight equals `generation`, so any file tells which write it came from."""
    poly = pp.wrap(build("bart"), pp.LMSConfig(languages=LANGS, rank=2, synthesis="pair"))
    with torch.no_grad():
        for parameter in poly.route_parameters():
            parameter.fill_(generation)
    return poly


def write(poly: pp.PolyModel, generation: int, save, routes) -> None:
    poly.save_pretrained(save, results={"generation": generation})
    pairs = None if generation % 2 else [("en", "de"), ("de", "en")]  # folders come and go between exports
    poly.export_lora_routes(routes, pairs=pairs)


def writer(save, routes, ready) -> None:
    """Saves and exports again and again, each generation with other weights, until it is killed."""
    models = [model_of_generation(g) for g in (1, 2)]
    for generation in range(1, 10_000):
        write(models[generation % 2], generation, save, routes)
        ready.set()


def generation_of_save(save) -> int:
    loaded = pp.PolyModel.from_pretrained(build("bart"), save)  # refuses a folder it cannot trust
    values = {float(v) for p in loaded.route_parameters() for v in p.detach().flatten()}
    assert len(values) == 1, f"weights of several saves in one folder: {values}"
    card = re.search(r'"generation": (\d+)', (save / CARD_NAME).read_text(encoding="utf-8"))
    assert card and int(card.group(1)) % 2 + 1 == int(values.pop()), "the card belongs to another save"
    return int(card.group(1))


def check_export(routes) -> None:
    index = json.loads((routes / "routes.json").read_text(encoding="utf-8"))
    listed = {entry["path"] for entry in index["routes"]}
    assert {p.name for p in routes.iterdir()} == listed | {"routes.json"}, "a folder routes.json does not list"
    values = set()
    for name in listed:
        from safetensors.torch import load_file
        values |= {float(v) for t in load_file(str(routes / name / "adapter_model.safetensors")).values()
                   for v in t.flatten()}
    assert len(values) == 1, f"routes.json lists adapters of several exports: {values}"


def temporaries(folder) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.name.startswith(".") and ".tmp" in p.name)


@pytest.mark.slow
def test_a_writer_killed_at_random_never_leaves_a_mixed_folder(tmp_path):
    save, routes = tmp_path / "save", tmp_path / "routes"
    write(model_of_generation(1), 1, save, routes)
    context, chance = multiprocessing.get_context("fork"), random.Random(27)
    seen = set()
    for _ in range(KILLS):
        ready = context.Event()
        process = context.Process(target=writer, args=(save, routes, ready))
        process.start()
        ready.wait(60)
        time.sleep(chance.uniform(0.0, 0.4))  # somewhere inside a save or an export
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        seen.add(generation_of_save(save))
        check_export(routes)
    assert len(seen) > 1, "the kills all fell at one place"
    write(model_of_generation(1), 1, save, routes)  # the next successful write cleans what the killed ones left
    assert temporaries(tmp_path) == []
