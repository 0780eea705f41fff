"""The training script runs end to end (a few steps) and is reproducible."""

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration

from mclcbf_diag.zoo.build import build_processor
from mclcbf_diag.zoo.train import TrainConfig, answer_labels, dialogue, train
from mclcbf_diag.zoo.world import sample_scene

TINY = TrainConfig(seed=3, vision_steps=2, steps=3, batch_size=4, warmup=1)


def test_answer_labels_keep_only_answers():
    tok = build_processor().tokenizer
    text = "USER: Is there a dog in the image?\nASSISTANT: Yes\nUSER: Is there a cup in the image?\nASSISTANT: No"
    ids = torch.tensor([tok(text).input_ids])
    labels = answer_labels(ids, tok)
    kept = tok.convert_ids_to_tokens(labels[labels != -100].tolist())
    assert kept == ["Yes", "No"]


def test_dialogue_answers_follow_annotations():
    scene = sample_scene(5, 0)
    text = dialogue(scene, np.random.default_rng(0), caption_p=0.0)
    for turn in text.split("USER: ")[1:]:
        name = turn.split("Is there a ")[1].split(" in")[0]
        answer = turn.rsplit("ASSISTANT: ", 1)[1].strip()
        assert answer == ("Yes" if name in scene.labels else "No")


def test_a_few_steps_train_save_and_reload(tmp_path):
    a = train(tmp_path / "a", TINY)
    b = train(tmp_path / "b", TINY)
    assert a["final_loss"] == b["final_loss"]  # seeded: identical runs
    assert (tmp_path / "a" / "model.safetensors").is_file()
    m1 = LlavaForConditionalGeneration.from_pretrained(tmp_path / "a")
    m2 = LlavaForConditionalGeneration.from_pretrained(tmp_path / "b")
    for (n, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(p1, p2), n
