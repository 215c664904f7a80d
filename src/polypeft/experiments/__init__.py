"""What the project measures with the library, not what a user of the library imports.

Here: `flare_recipe` (FLARE's two-stage recipe: an English LoRA merged, then zero-shot, translate-test,
translate-train, X-Mixup (`x_mixup`), input-level fusion, FLARE or FLARE-MT on target-language data), `bible_eval` (verse retrieval and verse
classification on the Bible corpus), `english_centric_lm` (LENS and LRP2 on a causal LM built offline) and
`demo` with its parts (`polypeft demo`). Their material has its own modules: the corpus is
`polypeft.data.bible` (`BibleCorpus`, `BibleSplit`, `BIBLE_VERSIONS`) with `polypeft.data.spm.bible_spm`, and
multilingual-e5's prompts are `polypeft.backbones.e5.QUERY_PREFIX` / `PASSAGE_PREFIX`.
"""
