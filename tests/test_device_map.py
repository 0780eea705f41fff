"""``--device-map``: a model split across device-map entries gives the records of the single-device run.

On a CPU-only machine the entries can only be ``"cpu"`` and ``"disk"``. Several ``"cpu"``
entries alone load the model on one device (transformers dispatches nothing); adding
``"disk"`` entries makes accelerate hook every module, keep the offloaded layers' weights on
the ``meta`` device outside their forward and move inputs to each module's execution device:
the code paths of a model split over GPUs and CPU (look-ahead weights, RoPE, keys and the
probes' tensors each taken from where their layer is). Both go through ``trace``
(:func:`mclcbf_diag.engine.runner.forward`) and ``pope`` (:func:`mclcbf_diag.engine.batch.answer_batch`, the
prefix-reusing pair, and the command line), against the same model loaded without a map.
"""

import importlib.util
import json

import pandas as pd
import pytest
import torch

from mclcbf_diag import barrier as B
from mclcbf_diag import shipped
from mclcbf_diag.data import build_prompt
from mclcbf_diag.embedded.build import QUESTION
from mclcbf_diag.embedded.world import sample_scene
from mclcbf_diag.engine.batch import answer_batch, answer_pair, batch_inputs
from mclcbf_diag.errors import UserError
from mclcbf_diag.experiments.trace import trace_sample
from mclcbf_diag.interventions import MCLCBF
from mclcbf_diag.models import load_model
from mclcbf_diag.models.loading import parse_device_map, prepare_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                reason="--device-map needs accelerate (the test extra installs it)")

LM = "model.language_model"


def split_map(offloaded: str) -> dict:
    """Every module its own entry; layers 1, 2 and the unembedding on ``offloaded``."""
    dm = {f"model.{m}": "cpu" for m in ("vision_tower", "multi_modal_projector")}
    dm |= {f"{LM}.{m}": "cpu" for m in ("embed_tokens", "norm", "rotary_emb")}
    dm |= {f"{LM}.layers.{i}": offloaded if i in (1, 2) else "cpu" for i in range(4)}
    dm["lm_head"] = offloaded
    return dm


@pytest.fixture(scope="module")
def single(saved_tiny_dir):
    return load_model(str(saved_tiny_dir))


@pytest.fixture(scope="module", params=["cpu", "disk"])
def mapped(request, saved_tiny_dir):
    # as a user writes it on the command line: a JSON object
    return request.param, load_model(str(saved_tiny_dir), device_map=json.dumps(split_map(request.param)))


@pytest.fixture(scope="module")
def questions():
    names = ("dog", "cat", "car")
    return [QUESTION.format(name=n) for n in names], [sample_scene(0, i).image() for i in range(len(names))]


STEERED = [("span=detected", "tau=0.99"), ("span=detected", "site=ln1_out", "tau=0.99"),
           ("span=detected", "site=attn_logits", "tau=0.6")]


def test_the_map_is_what_was_asked(mapped):
    kind, lm = mapped
    assert lm.device == torch.device("cpu")
    q = lm.model.get_submodule(f"{LM}.layers.1.self_attn.q_proj").weight
    if kind == "disk":  # accelerate hooked the model; an offloaded layer's weights are not in memory
        assert lm.model.hf_device_map[f"{LM}.layers.1"] == "disk"
        assert q.device.type == "meta" and hasattr(lm.model.get_submodule(f"{LM}.layers.1.self_attn.q_proj"),
                                                   "_hf_hook")
        with lm.onloaded(f"{LM}.layers.1"):
            assert q.device.type == "meta"  # the old reference; the module holds the loaded one now
            assert lm.model.get_submodule(f"{LM}.layers.1.self_attn.q_proj").weight.device.type == "cpu"
        assert lm.layer_weights(1).q_weight.device.type == "cpu"
    else:
        assert q.device.type == "cpu"


@pytest.mark.parametrize("overrides", STEERED)
def test_trace_records_equal_the_single_device_run(mapped, single, questions, overrides):
    iv = MCLCBF(B.apply_overrides(B.get_preset("seed-exp6"), list(overrides)))
    text, image = questions[0][0], questions[1][0]
    want = trace_sample(single, text, image, iv).records
    got = trace_sample(mapped[1], text, image, iv).records
    assert (got[got.metric == "barrier_active"].value > 0).any() or "attn_logits" in overrides[1]
    # exact: "cpu" and "disk" entries only move tensors and weights (float32, bit for bit) between modules: every
    # figure is the same kernel on the same inputs as in the single-device run (a GPU split would need the floors)
    pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_pope_batches_equal_the_single_device_run(mapped, single, questions):
    texts, images = questions
    prompts = [build_prompt(t) for t in texts]
    iv = MCLCBF(B.apply_overrides(B.get_preset("seed-exp6"), ["span=detected", "tau=0.99"]))
    for steer in (False, True):  # exact, as the records above: the same kernels on the same inputs
        assert answer_batch(mapped[1], prompts, images, iv, steer) == answer_batch(single, prompts, images, iv, steer)
    # the prefix-reusing pair (baseline cache, then the steered suffix), as `pope` runs it
    got = answer_pair(mapped[1], prompts, images, iv, inputs=batch_inputs(mapped[1], prompts, images))
    assert got == answer_pair(single, prompts, images, iv, inputs=batch_inputs(single, prompts, images))


def test_pope_command_with_a_device_map(saved_tiny_dir, tmp_path):
    from mclcbf_diag.cli import build_parser
    from mclcbf_diag.cli import pope as pope_cli

    argv = ["pope", "--model", str(saved_tiny_dir), "--split", "random", "--limit", "3", "--batch-size", "2",
            "--pope-file", str(shipped.pope_file("random")), "--image-dir", str(shipped.IMAGES),
            "--set", "span=detected", "--set", "tau=0.99"]
    dm = tmp_path / "map.json"
    dm.write_text(json.dumps(split_map("disk")), encoding="utf-8")
    for out, extra in ((tmp_path / "one", []), (tmp_path / "split", ["--device-map", str(dm)])):
        assert pope_cli.cmd_pope(build_parser().parse_args([*argv, "--out", str(out), *extra])) == 0
    rows = [[json.loads(line) for line in (tmp_path / d / "answers.jsonl").read_text().splitlines()]
            for d in ("one", "split")]
    keep = ("question_id", "baseline_margin", "steered_margin", "baseline_answer", "steered_answer", "layers_fired")
    assert len(rows[0]) == 3
    assert [{k: r[k] for k in keep} for r in rows[1]] == [{k: r[k] for k in keep} for r in rows[0]]  # exact, as above


def test_device_map_spellings(tmp_path):
    assert parse_device_map(None) is None
    assert parse_device_map(" auto ") == "auto" and parse_device_map("cuda:1") == "cuda:1"
    assert parse_device_map('{"model": "cpu", "lm_head": 0}') == {"model": "cpu", "lm_head": 0}
    path = tmp_path / "m.json"
    path.write_text('{"model": "disk", "lm_head": "cpu"}', encoding="utf-8")
    assert parse_device_map(str(path)) == {"model": "disk", "lm_head": "cpu"}
    for bad, what in (('{"model": cpu}', "not valid JSON"), ("{}", "non-empty"), ('{"model": true}', "entries"),
                      (str(tmp_path / "missing.json"), "cannot read"), ("", "empty")):
        with pytest.raises(UserError, match=what):
            parse_device_map(bad)


def test_an_incomplete_map_is_a_user_error(saved_tiny_dir):
    with pytest.raises(UserError, match="--device-map.*every module"):
        load_model(str(saved_tiny_dir), device_map={f"{LM}.layers.0": "cpu", "lm_head": "disk"})


def test_without_accelerate_the_map_is_refused_before_loading(saved_tiny_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(UserError, match="accelerate"):
        prepare_model(str(saved_tiny_dir), device_map="auto")
