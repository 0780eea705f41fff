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
