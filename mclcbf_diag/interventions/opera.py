"""OPERA's first step: score the top tokens by how much each, once written, attends to the image.

Paper: Huang, Dong, Zhang et al., "OPERA: Alleviating Hallucination in Multi-Modal Large Language
Models via Over-Trust Penalty and Retrospection-Allocation", CVPR 2024. Released code:
github.com/shikiw/OPERA (``transformers-4.29.2/src/transformers/generation/utils.py``,
``opera_decoding``; POPE: ``--beam 5 --scale_factor 50 --threshold 15 --num_attn_candidates 5
--penalty_weights 1``, eager attention, ``output_attentions=True``).

The released code, at every step of its beam search, for each beam:

* **Candidates.** The ``num_attn_candidates`` tokens c of the highest raw next-token logits z[c].
* **Their attention.** For each candidate the sequence is run one token further (the prompt, then
  c) and the new position's attention row of the *last* decoder layer is kept, max over heads
  (``attentions[-1].max(1)``): a row whose entries no longer sum to 1. It joins the earlier rows
  (``attn_previous``, also max over heads) and every row is renormalised to sum 1
  (``attn_last / attn_last.sum(-1)``); so the candidate's row is maxₕ pₕ[k] / Σ_k' maxₕ pₕ[k'].
  Its sum over the image tokens (``image_start … image_end``, 576 for LLaVA-1.5) is
  ``attn_img(c)`` ∈ [0, 1].
* **Score.** While the response holds at most 10 tokens (``cur_response_lens <= 10``) the
  penalty is −attn_img(c); later it is the over-trust (column) pattern's rollback score
  (``scale_factor``, ``threshold``, the retrospection). The candidate's score is
  z[c] − ``penalty_weights``·penalty = z[c] + weight·attn_img(c); every other token gets −999
  before the beam search's ``log_softmax``.

Here, on a one-token Yes/No answer, the ``logits`` site gets exactly that first step: the top
``candidates`` tokens of the decision position's logits score z[c] + weight·dose·attn_img(c), every
other token is ruled out (−inf rather than −999: no token outside the candidates can win either
way). The column-pattern penalty and the rollback never act on a one-token answer (the first
token's response holds one token, ≤ 10), so ``scale_factor`` and ``threshold`` are knobs of the
beam search alone. OPERA's answer to a POPE question is its beam search's best beam (beam 5, ≤ 10
new tokens), which ``pope --generate N --decoding beam`` runs (:mod:`.opera_beam`); the first-token
reading here is the first step of that search (its scores), not the final beam's answer.

How it is done. :meth:`OPERA.prepare` runs a plain forward of the rows (``use_cache=True``) for
their candidates (in ``pope`` the baseline's own forward and cache serve, :meth:`OPERA.prepare_batched`),
then *one* batched continuation of all rows × candidates by one token each
from that KV cache: every (row, candidate) is a row of the continuation that attends to its
question's cached keys and values, shared rather than copied
(:mod:`mclcbf_diag.models.shared_prefix`), plus its own new key. The last layer's attention is
read by a forward hook on its attention module (eager attention returns the probabilities;
no other layer's is kept). Image tokens are the row's own (:attr:`~.base.Row.image`); pad keys
have probability 0 and are left out of the renormalisation. The candidates come from this
forward's logits, the scores z[c] from the run's (the same model on the same prompt: the same
numbers up to summation order). Cost per batch: one extra forward of the prompts (their
cache; none in ``pope``) and one forward of ``candidates`` one-token rows per prompt over that cache (the
released code: ``candidates`` one-token forwards per step).

``dose`` scales the weight (a dose-response sweeps the image-attention bonus; the candidate
restriction stays). Record (layer −1): ``opera_image_share``, attn_img of the top-scored
candidate.
"""

from __future__ import annotations

import torch

from ..models.adapter import sequence_inputs
from ..models.mrope import embeds_positions
from ..models.shared_prefix import SharedPrefix, continuation_mask, continuing
from .base import Batched, Row, knob_key
from .catalog import SPECS, OPERAKnobs  # noqa: F401 - OPERAKnobs re-exported
from .decoding import DecodingMethod
from .views import row_inputs


def image_shares(probs: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """OPERA's attn_img: the image share of attention rows ``probs`` [n, H, K] after the max over heads.

    ``image`` bool [n, K] marks each row's image keys. The max over heads is renormalised over the
    keys (as the released code renormalises ``attn_last``); float32, [n].
    """
    row = probs.float().amax(1)
    return (row * image.to(row.device)).sum(-1) / row.sum(-1)


def prompt_cache(lm, inputs: dict) -> tuple[torch.Tensor, object]:
    """``(last-position logits [B, vocab] float32, KV cache)`` of a plain forward of ``inputs``' prompts."""
    feed = {**inputs, **embeds_positions(lm, inputs)}  # Qwen-VL: its 3-D positions, explicitly
    if "inputs_embeds" in feed:  # prompt embeddings a run kept: the vision tower is not run again
        feed = {**{k: feed[k] for k in ("inputs_embeds", "attention_mask", "position_ids") if k in feed},
                **sequence_inputs(feed)}  # Gemma 3's token_type_ids: its image tokens attend to each other
    with torch.no_grad():
        out = lm.model(**feed, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float(), lm.adapter.output_cache(lm.model, out)


class OPERA(DecodingMethod, spec=SPECS["opera"]):
    metrics = {"opera_image_share": "OPERA: the last layer's image attention share (max over heads, renormalised) of "
                                    "the top-scored candidate token, once written"}

    def auxiliary_forwards(self) -> int | None:
        return 1  # the candidates' one-token continuation of the question's cache

    def prepare_batched(self, lm, inputs: dict, rows: list[Row], batched: Batched) -> None:
        """The candidates' image shares, continuing the main rows' own cache where the runner kept it.

        The runner's ``batched.cache`` and ``batched.logits`` are continued when it kept them and ``rows`` are every
        row of the batch; else a forward of the rows' prompts makes them.

        Args:
            lm: the loaded model.
            inputs: the batch's model inputs.
            rows: the batch rows prepared.
            batched: what the runner kept of the batch's own forwards (its ``cache`` and ``logits``).
        """
        super().prepare_batched(lm, inputs, rows, batched)
        self._candidates: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if not rows:
            return
        mine = row_inputs(inputs, rows)
        if batched.cache is not None and batched.logits is not None and mine is inputs:
            logits, cache = batched.logits.float(), batched.cache
        else:  # Qwen-VL's 3-D positions computed once, for the prompt's forward and the candidates' continuation
            mine = {**mine, **embeds_positions(lm, mine)}
            logits, cache = prompt_cache(lm, mine)
        tokens, shares = self.candidate_shares(lm, mine, rows, logits, cache)
        self._candidates = {r.index: (tokens[b], shares[b]) for b, r in enumerate(rows)}

    def view_key(self):
        """Its candidates and their image shares read the number of candidates only: the penalty's weight (which a
        dose scales) is the combination's, the scale factor and threshold are the beam search's."""
        return knob_key(self, ("weight", "scale_factor", "threshold"))

    def prepared_views(self, rows: list[Row]) -> list:
        """Each row's ``(tokens, image shares)`` of its candidates."""
        return [self._candidates[r.index] for r in rows]

    def use_views(self, lm, rows: list[Row], views: list) -> None:
        self._yes_no = (int(lm.tokens.yes_id), int(lm.tokens.no_id))
        self._aux, self._candidates = {}, {r.index: v for r, v in zip(rows, views)}

    def candidate_shares(self, lm, inputs: dict, rows: list[Row], logits: torch.Tensor,
                         cache) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens, attn_img)``: each row's top raw-logit tokens and their image shares.

        Each (row, candidate) continues its row's cached prompt by the candidate token; the share is the last layer's
        attention of that new position on the row's image tokens.

        Args:
            lm: the loaded model (eager attention).
            inputs: the rows' model inputs, row b for ``rows[b]``.
            rows: the rows.
            logits: [B, vocab] a plain forward's last logits of those prompts (:func:`prompt_cache`).
            cache: that forward's KV cache.

        Returns:
            ``(tokens, attn_img)``, each [len(rows), candidates] on the CPU.
        """
        mask = inputs["attention_mask"]
        B, T = mask.shape
        inputs = {**inputs, **embeds_positions(lm, inputs)}  # Qwen-VL: its 3-D positions, explicitly
        k = min(self.knobs.candidates, logits.shape[-1])
        tokens = logits.topk(k, dim=-1).indices  # [B, k], sorted as the released code's topk
        # every (row, candidate) continues its row's cached prompt by the candidate
        owner = torch.arange(B).repeat_interleave(k)
        prefix = SharedPrefix([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers], T,
                              owner)
        embed = lm.model.get_input_embeddings()
        new = embed(tokens.reshape(-1, 1).to(embed.weight.device))  # [B·k, 1, d]
        seen = torch.cat([mask.repeat_interleave(k, 0), mask.new_ones(B * k, 1)], -1)  # [B·k, T + 1]
        if "position_ids" in inputs:  # the next position: [B·k, 1], or Qwen-VL's [3, B·k, 1] after the image's
            position = (inputs["position_ids"][..., -1:] + 1).repeat_interleave(k, -2)
        else:  # the model counted positions from 0 over the padded prompt
            position = torch.full((B, 1), T, dtype=torch.long, device=mask.device).repeat_interleave(k, 0)
        got: list[torch.Tensor] = []

        def keep(module, args, output):
            got.append(output[1][:, :, -1].detach())  # [B·k, H, T + 1]: the new position's row

        attention = lm.adapter.layer_part(lm.model, lm.n_layers - 1, "layer_attention")
        hook = attention.register_forward_hook(keep)
        try:
            with torch.no_grad(), continuing(lm, prefix):
                lm.model(inputs_embeds=new, attention_mask=continuation_mask(seen, T, new.dtype),
                         position_ids=position, use_cache=False, logits_to_keep=1)
        finally:
            hook.remove()
        if len(got) != 1 or got[0] is None:
            raise RuntimeError("the last layer returned no attention probabilities (OPERA needs eager attention)")
        image = torch.zeros(B, T + 1, dtype=torch.bool)
        for b, r in enumerate(rows):
            image[b, r.pad: r.pad + r.length] = r.image
        shares = image_shares(got[0], image.repeat_interleave(k, 0))
        return tokens.cpu(), shares.reshape(B, k).cpu()

    def combine(self, site, row, logits, aux, dose):
        """OPERA's candidates' scores: each raw logit plus ``weight``·dose × its image share.

        Records the image share of the best candidate (``opera_image_share``).

        Args:
            site: the ``logits`` readout.
            row: the row combined.
            logits: [vocab] the model's own logits at the row's decision position.
            aux: [vocab] the auxiliary forward's logits for the row (unused).
            dose: scales the method (1: as configured).

        Returns:
            ``(scores, keep)``: the [vocab] scores and the bool [vocab] tokens kept (the candidates only).
        """
        tokens, shares = self._candidates[row.index]
        tokens = tokens.to(logits.device)
        scores = logits.clone()
        scores[tokens] = logits[tokens] + self.knobs.weight * dose * shares.to(logits.device)
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep[tokens] = True
        site.record(row, "opera_image_share", float(shares[int(scores[tokens].argmax())]))
        return scores, keep
