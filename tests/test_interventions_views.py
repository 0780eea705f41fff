"""The other views of a question: the diffusion noise, the image-free prompt, the pixels of a batch."""

import math

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mclcbf_diag import shipped
from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image
from mclcbf_diag.engine.batch import batch_inputs
from mclcbf_diag.interventions.base import rows_of
from mclcbf_diag.interventions.views import (
    diffusion_noise,
    diffusion_schedule,
    image_free_inputs,
    pixels_of,
    row_inputs,
    shares_image_features,
    with_pixels,
)


def test_the_schedule_is_the_released_sigmoid_one():
    bar = diffusion_schedule()
    betas = [1 / (1 + math.exp(-x)) * (0.5e-2 - 1e-5) + 1e-5 for x in torch.linspace(-6, 6, 1000, dtype=torch.float64)]
    prod = 1.0
    for t, b in enumerate(betas):
        prod *= 1 - b
        if t in (0, 499, 500, 999):
            assert bar[t].item() == prod
    assert bool((bar[1:] < bar[:-1]).all())  # more noise at every step
    assert math.sqrt(bar[500]) == __import__("pytest").approx(0.8630, abs=1e-4)


def test_noise_is_the_forward_process_seeded_per_image():
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = diffusion_noise(x, 500, seed=7)
    bar = diffusion_schedule()[500]
    eps = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(7))
    for b in range(3):  # every image draws the same ε from its own generator: independent of the batch
        expect = math.sqrt(bar) * x[b] + math.sqrt(1 - bar) * eps
        assert torch.allclose(out[b], expect, atol=1e-6)
    assert torch.equal(diffusion_noise(x[1:2], 500, seed=7)[0], out[1])
    assert not torch.equal(diffusion_noise(x, 500, seed=8), out)
    # step 0: almost the image itself (noise of std √β₀ ≈ 0.003)
    assert (diffusion_noise(x, 0, seed=7) - x).abs().max() < 5 * math.sqrt(1 - diffusion_schedule()[0])


def test_the_image_free_prompt_and_the_pixels_of_a_batch(embedded_model):
    lm = embedded_model
    qs = load_pope(shipped.pope_file("adversarial"))[:3]
    prompts = [build_prompt(q.text) for q in qs]
    prompts[1] = prompts[1].replace("?", " at all, anywhere?")
    images = [load_image(resolve_image(q, shipped.IMAGES)) for q in qs]
    inputs = batch_inputs(lm, prompts, images)
    rows = rows_of(inputs["input_ids"], inputs["attention_mask"], lm.tokens.image_token_id)
    free = image_free_inputs(lm, rows)
    for b, r in enumerate(rows):
        real = free["attention_mask"][b].bool()
        assert torch.equal(free["input_ids"][b][real].cpu(), r.ids[~r.image])  # the prompt, image tokens removed
        assert free["position_ids"][b][real].tolist() == list(range(int(real.sum())))
        assert not bool(real[: int((~real).sum())].any())  # padded on the left
    # the plain forward of the image-free prompt is the model reading the text alone
    alone = lm.model(input_ids=rows[0].ids[~rows[0].image][None].to(lm.device)).logits[0, -1]
    with torch.no_grad():
        batched = lm.model(**free).logits[0, -1]
    assert torch.allclose(alone, batched, atol=1e-4)
    # shared image features keep the pixels beside them; row_inputs keeps them per row
    assert "pixel_values" not in inputs and pixels_of(inputs).shape[0] == 3
    plain = batch_inputs(lm, prompts, images, share_images=False)
    assert torch.equal(pixels_of(inputs), plain["pixel_values"])
    sub = row_inputs(inputs, rows[1:])
    assert torch.equal(pixels_of(sub), plain["pixel_values"][1:]) and sub["input_ids"].shape[0] == 2
    assert isinstance(sub["mm_encoder_outputs"]["image"], BaseModelOutputWithPooling)
    # auxiliary rows need the batch's own image features, shared, and no prompt embeddings in their place
    assert shares_image_features(inputs) and shares_image_features(sub) and not shares_image_features(plain)
    assert not shares_image_features({**inputs, "inputs_embeds": torch.zeros(3, 1, 1)})
    swapped = with_pixels(inputs, plain["pixel_values"].flip(0))
    assert "mm_encoder_outputs" not in swapped and torch.equal(swapped["pixel_values"][0], plain["pixel_values"][2])


def test_some_rows_of_a_batch_of_flattened_patches_take_their_own_image():
    """Qwen-VL's pixel_values are every image's patches in a row (image_grid_thw says how many each): the rows of
    prompt 1 alone are its 8 patches, not a tile share of the batch (by hand: 1 × 2 × 2 and 1 × 2 × 4 patches)."""
    ids = torch.tensor([[5, 9, 9, 7], [5, 9, 9, 7]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "position_ids": torch.arange(4).expand(3, 2, 4).clone(),
              "pixel_values": torch.arange(12.0)[:, None].expand(12, 6).clone(),
              "image_grid_thw": torch.tensor([[1, 2, 2], [1, 2, 4]])}
    rows = rows_of(ids, inputs["attention_mask"], 9)
    mine = row_inputs(inputs, rows[1:])
    assert mine["pixel_values"][:, 0].tolist() == [4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    assert mine["image_grid_thw"].tolist() == [[1, 2, 4]] and mine["position_ids"].shape == (3, 1, 4)
