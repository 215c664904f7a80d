"""What a PEFT user does without thinking: load a save with no base, load for inference or training, keywords
refused by name, PEFT's adapter names answered the polypeft way, and several tasks on one base."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

import polypeft as pp
from hub_cache import lay_out_hub_cache
from polypeft.model.peft_conveniences import MISSING_NAMES
from tiny_models import build, output_of, random_batch, randomize_added

LANGS = ["en", "de", "fr"]
ROUTES = dict(lang=["de", "fr"])


def saved_base(folder, seed: int = 0):
    """A tiny Llama written with save_pretrained and read back, so transformers records where it came from."""
    build("llama", seed).float().save_pretrained(folder)
    return tf.LlamaForCausalLM.from_pretrained(folder)


def trained_routes(base, seed: int = 3, **wrap_options) -> pp.PolyModel:
    poly = pp.wrap(base, pp.LMSConfig(languages=LANGS, rank=4, synthesis="language"), **wrap_options)
    randomize_added(poly, seed=seed)
    return poly.eval()


# ---- the base the save recorded ------------------------------------------------------------------------
def test_a_save_loads_without_a_base_from_the_recorded_local_folder(tmp_path, monkeypatch):
    poly = trained_routes(saved_base(tmp_path / "base"))
    batch = random_batch("llama", 2)
    expected = output_of(poly, batch, **ROUTES)
    poly.save_pretrained(tmp_path / "routes")
    monkeypatch.chdir(tmp_path / "routes")  # the recorded path is absolute: another working folder still finds it
    loaded = pp.PolyModel.from_pretrained(tmp_path / "routes")
    assert type(loaded.base_model) is tf.LlamaForCausalLM
    torch.testing.assert_close(output_of(loaded, batch, **ROUTES), expected, rtol=0, atol=0)


def test_a_hub_save_loads_its_recorded_base_at_the_recorded_revision_offline(tmp_path, offline_hub):
    build("llama", 0).float().save_pretrained(tmp_path / "base-main")
    build("llama", 5).float().save_pretrained(tmp_path / "base-v1")
    lay_out_hub_cache(offline_hub, "org/base", {"main": ("a" * 40, tmp_path / "base-main"),
                                                "v1": ("b" * 40, tmp_path / "base-v1")})
    base = tf.LlamaForCausalLM.from_pretrained("org/base", revision="v1")
    poly = trained_routes(base, revision="v1")
    batch = random_batch("llama", 2)
    expected = output_of(poly, batch, **ROUTES)
    poly.save_pretrained(tmp_path / "routes")
    lay_out_hub_cache(offline_hub, "org/routes", {"main": ("c" * 40, tmp_path / "routes")})
    loaded = pp.PolyModel.from_pretrained("org/routes")
    torch.testing.assert_close(output_of(loaded, batch, **ROUTES), expected, rtol=0, atol=0)
    # the main revision's base would give other outputs: the revision was followed, not the default branch
    main = pp.PolyModel.from_pretrained(tf.LlamaForCausalLM.from_pretrained("org/base"), "org/routes")
    assert (output_of(main, batch, **ROUTES) - expected).abs().max() > 1e-3
    # transformers' loading options go to the base polypeft loads
    half = pp.PolyModel.from_pretrained("org/routes", dtype=torch.bfloat16)
    assert half.base_model.dtype == torch.bfloat16


def test_a_base_built_in_memory_must_be_passed(tmp_path):
    trained_routes(build("llama").float()).save_pretrained(tmp_path)
    with pytest.raises(pp.ConfigError, match=r"records no base model name or path.*pass the base"):
        pp.PolyModel.from_pretrained(tmp_path)


def test_a_recorded_base_folder_that_is_gone_is_named(tmp_path):
    import shutil

    trained_routes(saved_base(tmp_path / "base")).save_pretrained(tmp_path / "routes")
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(FileNotFoundError, match=rf"saved on the base at {tmp_path / 'base'}, which no longer exists"):
        pp.PolyModel.from_pretrained(tmp_path / "routes")


def test_a_given_base_is_still_checked(tmp_path):
    trained_routes(saved_base(tmp_path / "base")).save_pretrained(tmp_path / "routes")
    with pytest.raises(pp.ConfigError, match="does not fit"):
        pp.PolyModel.from_pretrained(build("bart"), tmp_path / "routes")


# ---- inference unless asked ---------------------------------------------------------------------------
def test_a_loaded_model_is_for_inference_unless_is_trainable(tmp_path):
    trained_routes(build("llama").float()).save_pretrained(tmp_path)
    frozen = pp.PolyModel.from_pretrained(build("llama").float().train(), tmp_path)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    trainable = pp.PolyModel.from_pretrained(build("llama").float(), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        f"base_model.{name}" for name in trainable.added_state_dict()}
    batch = random_batch("llama", 2)
    optimizer = torch.optim.SGD([p for p in trainable.parameters() if p.requires_grad], lr=0.5)
    before = trainable(**batch, labels=batch["input_ids"], lang="de").loss
    before.backward()
    optimizer.step()
    assert trainable(**batch, labels=batch["input_ids"], lang="de").loss < before


def test_keywords_are_refused_by_name(tmp_path):
    trained_routes(build("llama").float()).save_pretrained(tmp_path)
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) \['adapter_name', 'definitely_not_an_option'\]"
                                        r".*adapter_name: .*chosen per call"):
        pp.PolyModel.from_pretrained(build("llama"), tmp_path, is_trainable=False, adapter_name="de",
                                     definitely_not_an_option=1)
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) \['definitely_not_an_option'\]; it takes"):
        pp.PolyModel.from_pretrained(build("llama"), tmp_path, definitely_not_an_option=1)
    with pytest.raises(TypeError, match=r"\['dtype'\] together with a base model"):
        pp.PolyModel.from_pretrained(build("llama"), tmp_path, dtype=torch.float16)
    with pytest.raises(TypeError, match="is_trainable='yes' must be True or False"):
        pp.PolyModel.from_pretrained(build("llama"), tmp_path, is_trainable="yes")
    with pytest.raises(TypeError, match="revision=3 must be a string"):
        pp.wrap(build("llama"), pp.LMSConfig(languages=LANGS), revision=3)


# ---- PEFT's names --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MISSING_NAMES))
def test_peft_names_answer_the_polypeft_way(name):
    poly = trained_routes(build("llama"))
    with pytest.raises(AttributeError, match=rf"'PolyModel' object has no attribute '{name}'") as caught:
        getattr(poly, name)
    assert "version of PEFT" not in str(caught.value) and "LlamaForCausalLM" not in str(caught.value)
    assert "`" in str(caught.value)  # names what to use instead
    assert not hasattr(poly, name)  # tools that probe for peft (Trainer, loggers) see no PEFT model


def test_peft_config_points_at_poly_config():
    with pytest.raises(AttributeError, match=r"model\.poly_config"):
        trained_routes(build("llama")).peft_config


# ---- several tasks on one base ---------------------------------------------------------------------------
def test_two_tasks_swap_on_one_base_object_exactly(tmp_path):
    """The recommended way instead of named adapters: unload one save, load the other onto the same base."""
    base = build("llama").float()
    task_a = trained_routes(base, seed=3)
    batch = random_batch("llama", 2)
    expected_a = output_of(task_a, batch, **ROUTES)
    task_a.save_pretrained(tmp_path / "a")
    base = task_a.unload()
    task_b = pp.wrap(base, pp.LMSConfig(languages=["en", "de"], rank=2, synthesis="language"))
    randomize_added(task_b, seed=7)
    expected_b = output_of(task_b, batch, lang="de")
    task_b.save_pretrained(tmp_path / "b")
    base = task_b.unload()
    weights = {name: p.data_ptr() for name, p in base.named_parameters()}
    again_a = pp.PolyModel.from_pretrained(base, tmp_path / "a")
    torch.testing.assert_close(output_of(again_a, batch, **ROUTES), expected_a, rtol=0, atol=0)
    again_b = pp.PolyModel.from_pretrained(again_a.unload(), tmp_path / "b")
    torch.testing.assert_close(output_of(again_b, batch, lang="de"), expected_b, rtol=0, atol=0)
    # the base's tensors were never copied: only the added weights moved
    assert {name: p.data_ptr() for name, p in again_b.unload().named_parameters()} == weights


@pytest.mark.parametrize("call", ["set_adapter", "load_adapter"])
def test_named_adapter_calls_say_how_to_switch_tasks(call):
    with pytest.raises(pp.UnsupportedCallError, match=r"unload\(\).*from_pretrained\(base, folder_or_repo_id\)"):
        getattr(trained_routes(build("llama")), call)("task_b")


# ---- configs on their own ------------------------------------------------------------------------------
def every_method_config():
    from polypeft.methods.registry import registered_methods

    for name, entry in sorted(registered_methods().items()):
        languages = [] if entry.config_class.language_agnostic else LANGS
        yield entry.config_class(languages=languages, modules_to_save=["lm_head"], keep_base_dtype=True)


@pytest.mark.parametrize("config", list(every_method_config()), ids=lambda c: c.method)
def test_every_method_config_saves_and_loads_alone(config, tmp_path):
    path = config.save_pretrained(tmp_path / "config")
    assert path.name == "polypeft_config.json"
    loaded = type(config).from_pretrained(tmp_path / "config")
    assert loaded == config and type(loaded) is type(config)
    assert pp.load_config(tmp_path / "config") == config
    with pytest.raises(pp.ConfigError, match="holds a config alone.*pp.wrap"):
        pp.PolyModel.from_pretrained(build("llama"), tmp_path / "config")


def test_a_config_loads_from_a_whole_save_and_a_hub_id(tmp_path, offline_hub):
    poly = trained_routes(build("llama"))
    poly.save_pretrained(tmp_path / "save")
    assert pp.LMSConfig.from_pretrained(tmp_path / "save") == poly.poly_config
    assert pp.LMSConfig.from_pretrained(tmp_path / "save" / "polypeft_config.json") == poly.poly_config
    lay_out_hub_cache(offline_hub, "org/routes", {"main": ("d" * 40, tmp_path / "save")})
    assert pp.LMSConfig.from_pretrained("org/routes") == poly.poly_config
    with pytest.raises(pp.ConfigError, match="holds a whole save"):
        poly.poly_config.save_pretrained(tmp_path / "save")


def test_a_config_of_another_method_or_a_damaged_file_is_named(tmp_path):
    pp.LoRAConfig(rank=4).save_pretrained(tmp_path)
    with pytest.raises(pp.ConfigError, match=r"holds a 'lora' config, not 'lms' \(LMSConfig\): load it with pp.load_config"):
        pp.LMSConfig.from_pretrained(tmp_path)
    (tmp_path / "polypeft_config.json").write_text('{"config": {"method": "lms", "languages": ["en"], "rnak": 4}}')
    with pytest.raises(pp.ConfigError, match=r"polypeft_config.json: unknown keys \['rnak'\]"):
        pp.LMSConfig.from_pretrained(tmp_path)
    (tmp_path / "polypeft_config.json").write_text("[1, 2]")
    with pytest.raises(pp.ConfigError, match="expected a polypeft config file"):
        pp.LMSConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a local folder or file nor a Hub repo id"):
        pp.LMSConfig.from_pretrained(str(tmp_path / "missing" / "deeper"))
