"""The embedded model: a small LLaVA with LLaVA-1.5-7B's token layout.

A small ``LlavaForConditionalGeneration`` trained from scratch on a synthetic scene world,
with llava-hf's token layout for LLaVA-1.5-7B: CLIP at 336 px / patch 14 (576 image
tokens, "default" strategy, ``vision_feature_layer = -2``), a Llama-2-style subword
tokenizer (BOS 1, EOS 2, ``<image>`` and ``<pad>`` after the regular vocabulary, the prompt
``USER: <image>\\n…`` putting the image at positions 5–580) and an 8-layer Llama whose
decision token attends mostly to BOS from layer 2 on, as LLaVA-1.5-7B's does.

Modules: :mod:`.world` (scenes), :mod:`.build` (tokenizer, processor, config),
:mod:`.questions` / :mod:`.data` (POPE-format data), :mod:`.config` (training settings, no
torch), :mod:`.train` (the seeded training stages, the attention-sink prior), :mod:`.evaluate`
(layout, POPE, attention profile). ``weights/`` holds the
trained model (``from_pretrained``-loadable), ``pope/`` the shipped questions and images,
``MODEL_CARD.md`` the measured figures beside published LLaVA-1.5-7B ones.
"""

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"
POPE = Path(__file__).resolve().parent / "pope"
