"""What the plain-PyTorch references of the decoding-level methods share: a never-wrapped model copy,
three questions about three images, and the records every such method writes."""

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
