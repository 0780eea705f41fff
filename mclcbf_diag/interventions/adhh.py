"""AD-HH: adaptive deactivation of hallucination heads: zero their text attention above a threshold.

Paper: Yang, Li, Cao, Xu, "Understanding and Mitigating Hallucinations in Large
Vision-Language Models via Modular Attribution and Intervention", ICLR 2025. Released code:
github.com/TianyunYoung/Hallucination-Attribution.

* **Edit** (``LLaVA/llava/model/language_model/modeling_llama.py``, after the softmax): for
  every listed head of the layer, the last query row (the decision token, then each new
  token): ``if Σ attn[h, -1, img_end:] >= adhh_threshold: attn[h, -1, img_end:] = 0`` — the
  text keys after the image, the query itself included, are zeroed and the row is *not*
  renormalised (``renormalise=True`` rescales the rest to sum 1 instead). Threshold 0.4
  (``bash_scripts/decoding.sh``).
* **Heads** (``eval_scripts/identify_attention_head.py``, ``eval_utils/head_attribution.py``):
  each head is zero-ablated in turn (its slice of the ``o_proj`` input set to 0) and its
  influence is ``p(token) − p_ablated(token)`` on the generated token; hallucination heads
  are the top-k by mean influence on hallucinated tokens minus mean influence on correct
  ones (CHAIR on COCO captions). 20 heads for LLaVA-1.5-7B (listed in
  ``eval_caption_adhh.py``; preset ``llava-1.5-7b``). :func:`find_hallucination_heads`
  applies the criterion to POPE questions, where both tokens are known at the decision token
  (an accurate model rarely answers wrongly, so wrong answers alone are too few): score =
  mean over questions of the ablation influence on the hallucinated answer (the one opposite
  the label) minus that on the correct answer; k = 20 of 1024 heads by fraction (≥ 1). This
  adaptation is ours; the paper contrasts hallucinated and correct caption tokens.
  ``heads=None`` (preset ``paper``) calibrates on the model once, in :meth:`AdHH.prepare`, on
  the embedded POPE adversarial split's first ``calibration`` questions (or call the function
  with your own questions), cached per process. That is one baseline forward per question and
  L·H ablated rows, batched (:func:`head_influence`); on the real 7B model prefer the
  released list.
* Head indices do not depend on the prompt layout; positions do: the text keys here are
  those after the detected image.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..models.adapter import sequence_inputs
from ..models.mrope import embeds_positions
from .base import Intervention, Row, Site
from .catalog import LLAVA_15_7B_HEADS, SPECS, AdHHKnobs  # noqa: F401 - AdHHKnobs re-exported

_FOUND: dict = {}


def head_influence(lm, questions, images) -> torch.Tensor:
    """``[layers, heads]``: the mean over questions of the zero-ablation influence on the hallucinated answer minus
    that on the correct one (module docstring).

    Per question the baseline runs once; then every head's ablation is one row of a batched forward from the language
    model's input embeddings (the vision tower runs once), each row's head zeroed by an ``o_proj`` pre-hook. Rows are
    batched up to about 128 M residual numbers per forward.

    Args:
        lm: the loaded model.
        questions: the POPE questions (their labels say which answer is correct).
        images: their images, one per question.

    Returns:
        [layers, heads] float.
    """
    from ..data import build_prompt

    cfg, L = lm.text_config, lm.n_layers
    H = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    o_projs = [lm.adapter.layer_part(lm.model, i, "layer_o_proj") for i in range(L)]
    language_model = lm.adapter.get(lm.model, lm.adapter.language_model)
    pairs = [(i, h) for i in range(L) for h in range(H)]
    score = torch.zeros(L, H, dtype=torch.float64)

    def ablating(rows_heads):
        def hook(module, args):
            x = args[0].clone()
            for r, h in rows_heads:
                x[r, ..., h * hd:(h + 1) * hd] = 0
            return (x,)
        return hook

    with torch.no_grad():
        for q, image in zip(questions, images):
            inputs = lm.inputs(build_prompt(q.text), image)
            right, wrong = ((lm.tokens.yes_id, lm.tokens.no_id) if q.label == "yes"
                            else (lm.tokens.no_id, lm.tokens.yes_id))
            got = {}

            def keep(module, args, kwargs):
                got["embeds"] = kwargs.get("inputs_embeds")

            grab = language_model.register_forward_pre_hook(keep, with_kwargs=True)
            try:
                p0 = lm.model(**inputs, logits_to_keep=1).logits[0, -1].float().softmax(-1)
            finally:
                grab.remove()
            embeds = got["embeds"]
            chunk = max(1, min(len(pairs), 2**27 // (embeds.shape[1] * embeds.shape[2])))
            for c in range(0, len(pairs), chunk):
                part = pairs[c:c + chunk]
                by_layer: dict[int, list] = {}
                for r, (i, h) in enumerate(part):
                    by_layer.setdefault(i, []).append((r, h))
                handles = [o_projs[i].register_forward_pre_hook(ablating(rh)) for i, rh in by_layer.items()]
                try:
                    feed = {"inputs_embeds": embeds.expand(len(part), -1, -1),
                            "attention_mask": inputs["attention_mask"].expand(len(part), -1),
                            **{k: v.expand(len(part), -1) for k, v in sequence_inputs(inputs).items()},
                            **{k: v.expand(*v.shape[:-2], len(part), -1)  # Qwen-VL: its 3-D positions
                               for k, v in embeds_positions(lm, inputs).items()}}
                    p1 = lm.model(**feed, logits_to_keep=1).logits[:, -1].float().softmax(-1)
                finally:
                    for handle in handles:
                        handle.remove()
                for r, (i, h) in enumerate(part):
                    score[i, h] += float((p0[wrong] - p1[r, wrong]) - (p0[right] - p1[r, right])) / len(questions)
    return score


def find_hallucination_heads(lm, questions=None, images=None, top_k: int | None = None,
                             n: int = 16) -> tuple[tuple[int, int], ...]:
    """Top-k heads by :func:`head_influence` (on ``questions``, or the embedded split's first ``n``).

    Args:
        lm: the loaded model.
        questions: the POPE questions measured (None: the first ``n`` of the shipped adversarial split).
        images: their images, one per question (loaded here when ``questions`` is None).
        top_k: how many heads (None: 20 per 1024 heads of the model, rounded, at least 1).
        n: the shipped questions used when ``questions`` is None.

    Returns:
        The ``(layer, head)`` pairs, the most influential first.
    """
    from ..data import load_image, load_pope, resolve_image

    if questions is None:
        from .. import shipped

        questions = load_pope(shipped.pope_file("adversarial"))[:n]
        images = [load_image(resolve_image(q, shipped.IMAGES)) for q in questions]
    L, H = lm.n_layers, lm.text_config.num_attention_heads
    k = top_k or max(1, round(20 * L * H / 1024))
    top = torch.topk(head_influence(lm, questions, images).flatten(), k).indices
    return tuple((int(t) // H, int(t) % H) for t in top)


class AdHH(Intervention, spec=SPECS["adhh"]):
    metrics = {"adhh_heads_fired": "AD-HH: hallucination heads whose text mass ≥ threshold "
                                   "(their text attention zeroed)",
               "adhh_text_mass": "AD-HH: the decision query's attention mass on the text after the image, per head"}
    sites = frozenset({"attention"})

    def layers(self, n_layers: int) -> tuple[int, ...]:
        if self.knobs.heads is None:
            return tuple(range(n_layers))  # the heads are found in prepare
        bad = [lh for lh in self.knobs.heads if not 0 <= lh[0] < n_layers]
        if bad:
            raise UserError(f"heads {bad} out of range: the model has layers 0..{n_layers - 1} "
                            "(the llava-1.5-7b preset lists LLaVA-1.5-7B's heads; "
                            "use preset paper to find this model's)")
        return tuple(sorted({layer for layer, _ in self.knobs.heads}))

    def open_sites(self, steer: bool) -> frozenset[str]:
        return self.sites if steer else frozenset()

    def first_edited(self, row: Row) -> int | None:
        return row.decision

    def prepare(self, lm, inputs, rows):
        k = self.knobs
        if k.heads is not None:
            heads = k.heads
        else:
            key = (id(lm.model), k.top_k, k.calibration)
            if key not in _FOUND:
                _FOUND[key] = find_hallucination_heads(lm, top_k=k.top_k, n=k.calibration)
            heads = _FOUND[key]
        n_heads = lm.text_config.num_attention_heads
        if any(not 0 <= h < n_heads for _, h in heads):
            raise UserError(f"heads {heads}: the model has heads 0..{n_heads - 1} per layer")
        self.found = heads
        self._by_layer: dict[int, list[int]] = {}
        for layer, h in heads:
            self._by_layer.setdefault(layer, []).append(h)

    def attention(self, site: Site) -> None:
        heads = self._by_layer.get(site.layer)
        if not heads:
            return
        for row in site.rows:
            q = [site.current(row)]
            p = site.tensor[row.index][:, site.query_index(row, q)].clone()  # [H, 1, K]
            text = torch.zeros(site.current(row) + 1, dtype=torch.bool)
            text[row.last_image + 1:] = True
            mask = site.key_mask(row, text)
            every = p[..., mask].float().sum(-1)[:, 0]  # [H]
            fire = [h for h in heads if float(every[h]) >= self.knobs.threshold]
            site.record_heads(row, "adhh_text_mass", every)
            site.record(row, "adhh_heads_fired", len(fire))
            if not fire:
                continue
            for h in fire:
                p[h][..., mask] *= max(0.0, 1.0 - site.dose)
                if self.knobs.renormalise:
                    p[h] = p[h] / p[h].sum(-1, keepdim=True)
            site.set_rows(row, q, p)
