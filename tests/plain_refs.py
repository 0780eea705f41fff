"""What the plain-PyTorch references share: a never-wrapped model copy, three questions about three images, the
records every decoding-level method writes, and a family's plain forward with the checks of trace and the overlay
against it."""

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from mclcbf_diag import shipped
from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image

DECODING = ("decoding_model_margin", "decoding_aux_margin", "decoding_contrast_margin", "decoding_cut_yes",
            "decoding_cut_no")

_PLAIN = {}


def plain_model(lm):
    """A fresh copy of the model from its checkpoint, never wrapped by nnsight (plain PyTorch)."""
    if lm.source not in _PLAIN:
        _PLAIN[lm.source] = LlavaForConditionalGeneration.from_pretrained(
            lm.source, dtype=torch.float32, attn_implementation="eager", local_files_only=True).eval()
    return _PLAIN[lm.source]


def three_questions():
    """Three questions of three lengths about three different images: (prompts, images)."""
    qs = load_pope(shipped.pope_file("adversarial"))[20:38:6]
    texts = [qs[0].text, qs[1].text.replace(" in the image", ""), qs[2].text.replace("?", " in the picture?")]
    images = [load_image(resolve_image(q, shipped.IMAGES)) for q in qs]
    assert len({q.image for q in qs}) == 3
    return [build_prompt(t) for t in texts], images


def assert_scores(got, want, atol=1e-5):
    """The package's scores against a reference's: the same tokens ruled out (−inf), the others within ``atol``."""
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got.float()), finite)
    assert (got[~finite] == -torch.inf).all()
    assert int(finite.sum()) >= 1
    torch.testing.assert_close(got.float()[finite], want[finite], rtol=0, atol=atol)


def plain_forward(lm, prompt: str, image):
    """A plain transformers forward of one prompt with the processor's own inputs: ``(inputs, outputs, every
    decoder layer's output by index)``, attentions and hidden states included (the families' reference)."""
    inputs = lm.inputs(prompt, image)
    layer_out: dict[int, torch.Tensor] = {}

    def keep(i):
        return lambda module, args, out: layer_out.__setitem__(i, (out[0] if isinstance(out, tuple) else out).detach())

    hooks = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(lm.adapter.decoder_layers(lm.model))]
    try:
        with torch.no_grad():
            out = lm.model(**inputs, output_attentions=True, output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs, out, layer_out


def yes_no_margin(lm, logits) -> float:
    """Logit Yes − No of one position's logits."""
    return float(logits[lm.tokens.yes_id] - logits[lm.tokens.no_id])


def assert_trace_equals_plain(lm, result, inputs, out, layer_out, tol: float) -> float:
    """``trace``'s baseline records against :func:`plain_forward`'s at every layer: the decision token's image mass
    (mean over heads) and the look-ahead h, the residual norms entering and leaving the layer, then the last layer's
    logit lens and the final margin, and no look-ahead miss reported. Returns the plain Yes − No margin."""
    r = result.records
    base = r[(r.condition == "baseline") & (r["head"] == -1) & (r.phase == "prefill")]
    per = {m: dict(zip(g.layer, g.value)) for m, g in base.groupby("metric")}
    image = inputs["input_ids"][0] == lm.tokens.image_token_id
    margin = yes_no_margin(lm, out.logits[0, -1])
    for i in range(lm.n_layers):
        want = float(out.attentions[i][0, :, -1, image].sum(-1).mean())
        assert per["attn_image_mass"][i] == pytest.approx(want, rel=0, abs=tol)
        assert per["barrier_h"][i] == pytest.approx(want, rel=0, abs=tol)
        assert per["resid_pre_norm"][i] == pytest.approx(float(out.hidden_states[i][0, -1].norm()), rel=tol)
        assert per["resid_post_norm"][i] == pytest.approx(float(layer_out[i][0, -1].norm()), rel=tol)
    assert per["logit_lens_margin"][lm.n_layers - 1] == pytest.approx(margin, rel=0, abs=tol)
    assert result.value("final_margin", "baseline") == pytest.approx(margin, rel=0, abs=tol)
    assert "lookahead_miss_layers" not in result.summary()
    return margin


def assert_overlay_equals_plain(lm, result, inputs, out, config, map_layer: int, token_layer: int) -> None:
    """The overlay's maps against :func:`plain_forward`'s attentions on the image grid: the decision token's at
    ``map_layer``, and another query token's (two after the image) at ``token_layer`` from the runs the overlay adds."""
    from mclcbf_diag.report.overlay import attention_maps, token_attention_maps

    image = inputs["input_ids"][0] == lm.tokens.image_token_id
    rows, cols = lm.image_grid(inputs)
    maps = attention_maps(result.baseline, lm.grid_mask(result.baseline.detected), shape=(rows, cols))
    want = out.attentions[map_layer][0, :, -1].mean(0)[image].reshape(rows, cols)
    np.testing.assert_allclose(maps[f"layer {map_layer}"], want.numpy(), rtol=0, atol=1e-6)
    q = int(torch.nonzero(image)[-1]) + 2
    got = token_attention_maps(lm, inputs, config, [q], shape=(rows, cols))[q]["baseline"][f"layer {token_layer}"]
    np.testing.assert_allclose(got, out.attentions[token_layer][0, :, q].mean(0)[image].reshape(rows, cols).numpy(),
                               rtol=0, atol=1e-6)
