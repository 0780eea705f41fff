"""Unit tests for the embedded model's training pieces, on tiny configs."""

import numpy as np
import torch

from mclcbf_diag.embedded import train as T
from mclcbf_diag.embedded.build import build_processor
from mclcbf_diag.embedded.world import CLASS_NAMES, DRAW_SIZE, IMAGE_SIZE, sample_scene

TINY = {"text_layers": 2, "hidden": 32, "heads": 2, "intermediate": 64, "vision_hidden": 32, "vision_layers": 2}


def test_world_is_seeded_and_336px():
    a, b = sample_scene(3, 0), sample_scene(3, 0)
    assert a == b
    img = a.image()
    assert img.size == (IMAGE_SIZE, IMAGE_SIZE) and IMAGE_SIZE % DRAW_SIZE == 0
    assert np.array_equal(np.asarray(img), np.asarray(b.image()))


def test_dialogue_answers_follow_annotations_and_mask_covers_answers():
    proc = build_processor()
    t = T.Tokens(proc.tokenizer)
    scene = sample_scene(5, 0)
    text = T.dialogue(scene, np.random.default_rng(0), T.TrainConfig(caption_p=0.0))
    assert text.startswith("USER: <image>\nIs there a ")
    for turn in text.split("</s>")[:-1]:
        name = turn.split("Is there a ")[1].split(" in the")[0]
        assert turn.endswith("Yes") == (name in scene.labels)
    row = t.encode(text)
    mask = T.answer_mask(row, t)
    picked = proc.tokenizer.convert_ids_to_tokens([r for r, m in zip(row, mask) if m])
    assert set(picked) <= {"▁Yes", "▁No", "</s>"} and picked.count("</s>") == text.count("</s>")
    batch = T.make_batch([row, row[:-5]], t)
    assert batch["input_ids"].shape[1] in T.BUCKETS


def test_text_dialogue_is_image_free():
    text = T.text_dialogue(sample_scene(2, 0), np.random.default_rng(1))
    assert "<image>" not in text and "ASSISTANT: " in text


def test_tiny_training_runs_and_saves(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = T.TrainConfig(pool=8, vision_steps=1, vision_batch=4, text_steps=1, text_batch=4, steps=2,
                        batch_size=2, text_mix=2, warmup=1)
    summary = T.train(tmp_path, cfg, device="cpu", say=lambda m: None, sizes=TINY)
    assert summary["parameters"] > 0 and (tmp_path / "model.safetensors").exists()
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    assert model.config.text_config._attn_implementation == "eager"
    assert AutoProcessor.from_pretrained(tmp_path).tokenizer.pad_token_id == model.config.pad_token_id
    assert len(CLASS_NAMES) == 10


def test_sink_prior_equals_eager_bos_mass():
    """SinkPrior's BOS probability equals HF eager attention's, so the hinge loss does too."""
    from mclcbf_diag.embedded.build import N_IMAGE_TOKENS, build_model

    proc = build_processor()
    model = build_model(proc.tokenizer, seed=0, **TINY).eval()
    model.set_attn_implementation("eager")
    t = T.Tokens(proc.tokenizer)
    row = t.encode(T.dialogue(sample_scene(1, 0), np.random.default_rng(0), T.TrainConfig(caption_p=0.0)))
    ids = torch.tensor([row])
    prior = T.SinkPrior(model, from_layer=1)
    with torch.no_grad():
        out = model.model.language_model(input_ids=ids, output_attentions=True)
        rows = torch.zeros_like(ids, dtype=torch.bool)
        rows[:, N_IMAGE_TOKENS + 5:] = True
        got = prior.loss(rows, target=0.9)
    prior.close()
    bos = torch.stack([a[0, :, N_IMAGE_TOKENS + 5:, 0].mean(0) for a in out.attentions[1:]])
    want = torch.relu(np.log(0.9) - bos.log()).mean()
    assert torch.allclose(got, want, atol=1e-6), (got, want)
    assert not prior.seen and all(not a._forward_pre_hooks for a in prior.attn.values())
