"""models/anyres.py: LLaVA-NeXT's image-token layout, against the processor's token counts and the model's own
embeddings (a tiny random LlavaNext checkpoint built here: 112-px tiles of 14-px patches, 2 × 2 pinpoints)."""

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)
from transformers.models.llava_next import LlavaNextImageProcessorPil

from mclcbf_diag.embedded.build import CHAT_TEMPLATE, IMAGE_TOKEN, build_tokenizer, padded_vocab_size
from mclcbf_diag.embedded.world import sample_scene
from mclcbf_diag.models.anyres import ImageLayout, anyres_layout, best_resolution, unpadded

TILE, PATCH = 112, 14
PINPOINTS = [[112, 112], [112, 224], [224, 112], [224, 224], [112, 336]]
PROMPT = "USER: <image>\nIs there a dog in the image?\nASSISTANT:"
SIZES = [(336, 336), (100, 200), (200, 100), (90, 333), (401, 157), (112, 112), (57, 300)]  # (height, width)


@pytest.fixture(scope="module")
def next_model():
    tok = build_tokenizer()
    images = LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                        image_grid_pinpoints=PINPOINTS, do_pad=True)
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH, chat_template=CHAT_TEMPLATE,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    text = LlamaConfig(vocab_size=padded_vocab_size(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=TILE, patch_size=PATCH, projection_dim=32)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS,
                             image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2,
                             vision_feature_select_strategy="default", tie_word_embeddings=False)
    torch.manual_seed(0)
    return processor, LlavaNextForConditionalGeneration(config).eval()


def test_layouts_by_hand():
    assert best_resolution((100, 200), PINPOINTS) == (112, 224)  # the 1:2 view keeps every pixel
    assert best_resolution((336, 336), PINPOINTS) == (224, 224)
    assert unpadded((100, 200), (8, 16)) == (8, 16)  # same aspect: nothing removed
    assert unpadded((50, 200), (8, 16)) == (4, 16)  # wider: 2 padding rows above and below
    layout = ImageLayout(base=(2, 2), tiles=(2, 3))
    assert layout.n_tokens == 4 + 2 * 4
    groups = layout.groups()
    assert groups["base"].tolist() == [[0, 1], [2, 3]]
    assert groups["tiles"].tolist() == [[4, 5, 6], [8, 9, 10]] and groups["newline"].tolist() == [7, 11]
    assert ImageLayout(base=(2, 2), tiles=(1, 1), extra=1).groups()["base"].tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize("size", SIZES)
def test_the_token_count_is_the_processors(next_model, size):
    processor, model = next_model
    image = sample_scene(0, 0).image().resize((size[1], size[0]))
    enc = processor(text=PROMPT, images=image, return_tensors="pt")
    count = int((enc["input_ids"][0] == model.config.image_token_id).sum())
    assert anyres_layout(size, PINPOINTS, TILE, PATCH).n_tokens == count
    assert enc["image_sizes"][0].tolist() == list(size)


@pytest.mark.parametrize("size", [(100, 200), (401, 157)])
def test_newline_and_base_positions_hold_what_the_model_puts_there(next_model, size):
    """The model's embeddings at the layout's newline tokens are its image_newline vector; the base tokens are the
    projected base tile's patches, in row-major order."""
    processor, model = next_model
    enc = processor(text=PROMPT, images=sample_scene(2, 1).image().resize((size[1], size[0])), return_tensors="pt")
    seen = {}

    def keep(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"][0].detach()

    hook = model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**enc)
    finally:
        hook.remove()
    first = int(torch.nonzero(enc["input_ids"][0] == model.config.image_token_id)[0])
    groups = anyres_layout(size, PINPOINTS, TILE, PATCH).groups()
    embeds = seen["embeds"]
    newline = model.model.image_newline.detach()
    for pos in groups["newline"]:
        torch.testing.assert_close(embeds[first + pos], newline, rtol=0, atol=0)
    assert not any(torch.equal(embeds[first + int(p)], newline) for p in groups["tiles"].flatten())
    with torch.no_grad():
        tower = model.model.vision_tower(enc["pixel_values"][0, :1], output_hidden_states=True)
        base = model.model.multi_modal_projector(tower.hidden_states[-2][0, 1:])  # CLS dropped ("default")
    torch.testing.assert_close(embeds[first + torch.as_tensor(groups["base"]).flatten()], base, rtol=0, atol=1e-6)
