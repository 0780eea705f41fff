"""Unit tests for the embedded model's training pieces, on tiny configs."""

import floors
import numpy as np
import torch

from mclcbf_diag.embedded import train as T
from mclcbf_diag.embedded.build import build_processor
from mclcbf_diag.embedded.world import CLASS_NAMES, DRAW_SIZE, IMAGE_SIZE, sample_scene
from mclcbf_diag.measurements import noise

TINY = {"text_layers": 2, "hidden": 32, "heads": 2, "intermediate": 64, "vision_hidden": 32, "vision_layers": 2}


def test_world_is_seeded_and_336px():
    a, b = sample_scene(3, 0), sample_scene(3, 0)
    assert a == b
    img = a.image()
    assert img.size == (IMAGE_SIZE, IMAGE_SIZE) and IMAGE_SIZE % DRAW_SIZE == 0
    assert np.array_equal(np.asarray(img), np.asarray(b.image()))


def test_questions_follow_annotations():
    scene = sample_scene(5, 0)
    asked = T.questions(scene)
    assert [q for q, _ in asked[:-1]] == [f"Is there a {n} in the image?" for n in CLASS_NAMES]
    assert all((a == "Yes") == (n in scene.labels) for n, (_, a) in zip(CLASS_NAMES, asked))
    assert asked[-1][1].rstrip(".").split(" and ") == sorted(set(scene.labels), key=CLASS_NAMES.index)


def test_pixel_values_equal_the_processor():
    proc = build_processor()
    scenes = [sample_scene(i, 3) for i in range(3)]
    want = proc.image_processor([s.image() for s in scenes], return_tensors="pt")["pixel_values"]
    # rescale, subtract the mean, divide by the std: three float32 roundings (noise.floor), the first two at a
    # scale of at most 1 carried through the division as 1/std, the last at the values' own scale
    scale = max(1 / min(proc.image_processor.image_std), float(want.abs().max()))
    tol = noise.floor(torch.float32, scale, 3)
    assert torch.allclose(T.pixel_values(proc, scenes), want, rtol=0, atol=tol)


def test_branches_equal_one_prompt_per_question():
    """Every branch of a row computes what the question's own single-turn prompt computes
    (eager attention, causal, no cache), and its targets are that prompt's next tokens."""
    from mclcbf_diag.embedded.build import PROMPT, build_model

    proc = build_processor()
    t = T.Tokens(proc.tokenizer)
    model = build_model(proc.tokenizer, seed=0, **TINY).eval()
    scenes = [sample_scene(1, 0), sample_scene(2, 0)]
    branches = T.Branches(t)
    batch = branches.batch(scenes)
    assert batch["input_ids"].shape[1] in T.BUCKETS
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        packed = model.model.language_model(input_ids=batch["input_ids"], attention_mask=batch["visible"][:, None],
                                            position_ids=batch["position_ids"]).last_hidden_state
    model.set_attn_implementation("eager")
    names = proc.tokenizer.convert_ids_to_tokens
    for i, scene in enumerate(scenes):
        branch = batch["branch"][i]
        for b, (q, a) in enumerate(T.questions(scene)):
            ids = t.encode(PROMPT.format(question=q) + f" {a}</s>")
            with torch.no_grad():
                alone = model.model.language_model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            at = ((branch == -1) | (branch == b)).nonzero()[:, 0]
            assert batch["input_ids"][i, at].tolist() == ids
            assert batch["position_ids"][i, at].tolist() == list(range(len(ids)))
            # the final-normed state after the text layers, packed (sdpa) and alone (eager): its floor
            tol = noise.propagation_floor(torch.float32, float(alone.norm(dim=-1).max()), TINY["text_layers"],
                                          final_norm=True)
            assert torch.allclose(packed[i, at], alone, rtol=0, atol=tol)
            answer = [names(ids[k + 1]) for k, j in enumerate(at[:-1].tolist()) if batch["answer"][i, j]]
            assert answer == names(t.encode(f"ASSISTANT: {a}</s>")[-len(answer):]) and answer[-1] == "</s>"
            assert all(bool(batch["yes"][i, j]) == (a == "Yes") for j in at[T.PREFIX_LEN:-1].tolist())
        assert not batch["predict"][i, branch[1:] == -2].any()  # padding predicts nothing


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
    batch = T.Branches(t).batch([sample_scene(1, 0)])
    ids, visible = batch["input_ids"], batch["visible"]
    prior = T.SinkPrior(model, from_layer=1)
    mask = torch.zeros(visible.shape, dtype=torch.float32).masked_fill(~visible, torch.finfo(torch.float32).min)
    with torch.no_grad():
        out = model.model.language_model(input_ids=ids, attention_mask=mask[:, None],
                                          position_ids=batch["position_ids"], output_attentions=True)
        rows = torch.zeros_like(ids, dtype=torch.bool)
        rows[:, N_IMAGE_TOKENS + 5:] = batch["branch"][:, N_IMAGE_TOKENS + 5:] != -2
        got = prior.loss(rows, target=0.9, visible=visible)
    prior.close()
    keep = rows[0]
    bos = torch.stack([a[0, :, keep, 0].mean(0) for a in out.attentions[1:]])
    want = torch.relu(np.log(0.9) - bos.log()).mean()
    # log p_BOS moves by δp/p: each BOS mass's floor (floors.mass_floors) relative to it, averaged like the loss
    tol = float((floors.mass_floors(bos) / bos.double()).mean())
    assert torch.allclose(got, want, rtol=0, atol=tol), (got, want, tol)
    assert not prior.seen and all(not a._forward_pre_hooks for a in prior.attn.values())
