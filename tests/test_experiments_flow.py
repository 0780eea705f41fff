"""Attention blocking and the information-flow map, against a pre-softmax −∞ mask in HF's own attention."""


import floors
import pytest
import torch
from transformers.models.llama import modeling_llama

from mclcbf_diag import shipped
from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image
from mclcbf_diag.engine.runner import forward
from mclcbf_diag.experiments.flow import EDGES, default_window, flow_summary, information_flow
from mclcbf_diag.interventions.block import AttentionBlock, BlockKnobs, block_rows
from mclcbf_diag.models import load_model

POPE = shipped.POPE


@pytest.fixture(scope="module")
def sample():
    q = load_pope(shipped.pope_file("adversarial"))[25]
    return q, load_image(resolve_image(q, shipped.IMAGES))


def _masked_logits(lm, inputs, source, target, layers, monkeypatch):
    """Reference: HF eager attention with −∞ added to the blocked (query, key) scores."""
    ids = inputs["input_ids"][0]
    image = (ids == lm.tokens.image_token_id).nonzero().flatten()
    n, last_img = ids.shape[0], int(image.max())
    groups = {"image": image, "question": torch.arange(last_img + 1, n - 1), "last": torch.tensor([n - 1])}
    real = modeling_llama.eager_attention_forward

    def masked(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        if module.layer_idx in layers:
            extra = torch.zeros(query.shape[-2], key.shape[-2])
            extra[groups[target][:, None], groups[source][None, :]] = float("-inf")
            attention_mask = extra if attention_mask is None else attention_mask + extra
        return real(module, query, key, value, attention_mask, scaling, dropout, **kw)

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", masked)
    fresh = load_model()  # never wrapped by nnsight, whose rewritten forwards keep the original function
    with torch.no_grad():
        return fresh.model(**inputs).logits[0, -1]


@pytest.mark.parametrize("source,target", EDGES)
def test_blocking_equals_a_minus_infinity_mask(embedded_model, sample, source, target, monkeypatch):
    lm = embedded_model
    q, image = sample
    inputs = lm.inputs(build_prompt(q.text), image)
    layers = (1, 2)
    cap = forward(lm, inputs, AttentionBlock(BlockKnobs(source, target, layers))).captures[0]
    ref = _masked_logits(lm, inputs, source, target, layers, monkeypatch)
    torch.testing.assert_close(cap.steps[0].final_logits, ref.float(), rtol=0, atol=floors.logit_floor(lm))
    unblocked = forward(lm, inputs, None).captures[0].steps[0].final_logits
    assert (cap.steps[0].final_logits - unblocked).abs().max() > 1e-4  # the edit did something


def test_block_rows_renormalises_over_the_rest():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    out = block_rows(p, torch.tensor([False, True, False, True]))
    torch.testing.assert_close(out, torch.tensor([[0.25, 0.0, 0.75, 0.0]]))


def test_flow_command_writes_page_and_table(tmp_path, capsys):
    from mclcbf_diag.cli import main

    assert main(["flow", "--sample", "25", "--window", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "question→last" in out and (tmp_path / "flow-26.html").is_file() and (tmp_path / "flow-26.csv").is_file()
    assert main(["flow", "--sample", "25", "--window", "0", "--out", str(tmp_path)]) == 2


def test_flow_map_rows_and_summary(embedded_model, sample):
    q, image = sample
    flow = information_flow(embedded_model, q, image, window=2)
    n = embedded_model.n_layers
    assert len(flow) == 3 * (n - 2 + 1)
    assert set(flow.edge) == {"image→question", "image→last", "question→last"}
    assert (flow.p_base > 0).all() and flow.change.between(-1, 1e6).all()
    lines = flow_summary(flow)
    assert len(lines) == 3 and all("the largest effect is in layers" in line for line in lines)
    for line, (edge, g) in zip(lines, flow.groupby("edge", sort=False)):
        top = g.loc[g.change.abs().idxmax()]
        assert line.startswith(edge) and ("lowers" in line) == (top.change < 0)
        assert f"{100 * abs(top.change):.1f}%" in line
    assert default_window(32) == 9 and default_window(4) == 1
