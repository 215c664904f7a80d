"""Texts translated by a trained `polypeft mmt` run: what translate-test and FLARE's machine-translated English read.

The run is its folder, or the recipe file `polypeft mmt build` trained under the cache root. A folder that is not
such a run, or a language it was not trained on, is refused by name before anything loads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ...core.config import ConfigError
from ...data.parallel import ParallelExample
from .compare import WEIGHTS_NAME
from .evaluate import translate
from .run import MMTRecipe, load_translation_model, read_run_recipe


def translation_run_folder(run: str | Path, setting: str = "translation_run") -> Path:
    """The run folder `run` names: the folder itself, or for a recipe file (.yaml) the folder `polypeft mmt build`
    trained it into under the cache root, refused by name until that build has finished."""
    if Path(run).suffix not in (".yaml", ".yml"):
        return Path(run)
    from .cached import cached_recipe

    if not Path(run).is_file():
        raise ConfigError(f"{setting}={str(run)!r}: no such recipe file")
    folder = cached_recipe(MMTRecipe.from_yaml(run)).run_dir
    if not (folder / WEIGHTS_NAME).is_file():
        raise ConfigError(f"{setting}={str(run)!r} is a recipe whose build has not finished (its folder: {folder}); "
                          f"run `polypeft mmt build {run}` first, or give the folder of a build made with --set "
                          "changes (they change the folder)")
    return folder


def translation_run_recipe(run_dir: str | Path, setting: str = "translation_run",
                           languages: Sequence[str] = (), pivot: Optional[str] = "en",
                           built: bool = True) -> MMTRecipe:
    """The recipe of the translation run in `run_dir` (a folder, or a built recipe file), checked to translate into
    `pivot` (None: any) and from every one of `languages`; a ConfigError names `setting=run_dir` otherwise.
    With built=False a recipe file is read as written, whether or not its build has finished (its split is known)."""
    if not built and Path(run_dir).suffix in (".yaml", ".yml") and Path(run_dir).is_file():
        recipe = MMTRecipe.from_yaml(run_dir)
        return checked_recipe(recipe, repr(str(run_dir)), setting, languages, pivot)
    folder = translation_run_folder(run_dir, setting)
    named = repr(str(run_dir)) + ("" if folder == Path(run_dir) else f" (built in {folder})")
    try:
        recipe = read_run_recipe(folder)
    except FileNotFoundError as error:
        raise ConfigError(f"{setting}={named} is not a trained `polypeft mmt` run: {error}") from None
    except ConfigError as error:
        raise ConfigError(f"{setting}={named} is not a `polypeft mmt` run: its recipe.json is not a "
                          f"translation recipe ({error})") from None
    return checked_recipe(recipe, named, setting, languages, pivot)


def checked_recipe(recipe: MMTRecipe, named: str, setting: str, languages: Sequence[str],
                   pivot: Optional[str]) -> MMTRecipe:
    """`recipe`, refused by name unless it translates into `pivot` (None: any) from every one of `languages`."""
    if pivot is not None and recipe.pivot != pivot:
        raise ConfigError(f"{setting}={named} translates into its pivot {recipe.pivot!r}, not into "
                          f"{pivot!r}: choose a run whose pivot is {pivot!r}")
    check_languages(recipe, named, setting, languages)
    return recipe


def check_languages(recipe: MMTRecipe, named: str, setting: str, languages: Sequence[str]) -> None:
    """Refuse languages the run was not trained on; `named` is how the run was given, quoted."""
    unknown = [lang for lang in languages if lang not in recipe.languages]
    if unknown:
        raise ConfigError(f"{setting}={named} was trained on {recipe.languages}, not on {unknown}: "
                          "choose a run that translates from that language")


class Translator:
    """A trained translation run, loaded once, turning texts of one language into its pivot (`into`, English by
    default; a run with another pivot is refused by name before it loads).

    FD runs translate on their shared route (FD-Share, the headline of `polypeft mmt eval`), other runs on each
    text's own route; beam, length penalty and maximum length are the run's own.
    """

    def __init__(self, run_dir: str | Path, batch_size: int = 32, setting: str = "translation_run",
                 into: str = "en"):
        self.run_dir = translation_run_folder(run_dir, setting)
        translation_run_recipe(self.run_dir, setting, pivot=into)
        self.recipe, self.tokenizer, self.model = load_translation_model(self.run_dir)
        self.batch_size, self.setting = batch_size, setting

    def __call__(self, texts: Sequence[str], source_lang: str, target_lang: Optional[str] = None) -> list[str]:
        """Each text translated from `source_lang` into `target_lang` (the run's pivot by default), in order."""
        target_lang = target_lang or self.recipe.pivot
        check_languages(self.recipe, repr(str(self.run_dir)), self.setting, [source_lang, target_lang])
        examples = [ParallelExample(source_lang, target_lang, text, "", str(number))
                    for number, text in enumerate(texts)]
        route = "shared" if self.recipe.uses_fd else None
        return translate(self.model, self.tokenizer, examples, beam=self.recipe.beam,
                         length_penalty=self.recipe.length_penalty, batch_size=self.batch_size, route=route,
                         max_source_length=self.recipe.max_length, max_new_tokens=self.recipe.max_length,
                         progress=len(examples) > self.batch_size)
