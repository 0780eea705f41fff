"""DoLa: contrast the final layer's next-token distribution with an earlier layer's.

Paper: Chuang, Xie, Luo et al., "DoLa: Decoding by Contrasting Layers Improves Factuality in
Large Language Models", ICLR 2024. Released code: github.com/voidism/DoLa (its transformers
fork: ``LlamaForCausalLM.forward``'s ``early_exit_layers``, ``generation/utils.py``'s
``relative_top_filter`` and ``dola_greedy_decode``); the same algorithm as transformers'
``generate(dola_layers=…)`` (``_dola_select_contrast``, ``_relative_top_filter``).

* **Readouts.** An early layer's logits are its output at the decision position through the
  unembedding, *without* the final norm, as both released codes read ``hidden_states[j]``
  (the embeddings count as the first; here: decoder layer j − 1's output, −1 for the embeddings).
  The final layer's are the model's own logits.
* **Candidates.** ``bucket="low"``: every second layer of the lower half, ``range(0, N/2, 2)``
  in ``hidden_states`` indices (for 32 layers: the embeddings and the outputs of layers 1, 3, …,
  13); ``"high"``: ``range(N/2, N, 2)`` (outputs of 15, 17, …, 29). Models of more than 40
  layers take the 20 below the middle or the last 20, as transformers does. ``layers`` names
  them instead. ``"all"``: every second layer over the whole depth, ``range(0, N, 2)``, the set
  HALC contrasts with (preset ``halc-first-token``: HALC's first answer token is this DoLa step,
  since its focal-view contrast acts only on a completed noun after the first token;
  github.com/BillChan226/HALC, ``run_scripts/pope_eval.py``).
* **Premature layer.** The candidate whose distribution is farthest from the final one by the
  divergence both released codes compute (:func:`selection_divergence`): their comments call it
  the Jensen–Shannon divergence, but ``F.kl_div(log_softmax(z), M)`` is KL(M ‖ P), so they take
  ½·[KL(M‖P_final) + KL(M‖P_j)], M = ½(P_final + P_j) (over the vocabulary size, the same argmax),
  not the JSD's ½·[KL(P_final‖M) + KL(P_j‖M)]. The two agree to second order for near
  distributions but can rank far ones differently (the un-normed early readouts are far). It is
  chosen per question: the released code takes one layer per batch (the mean over it), which
  with its batches of one is the same. The record ``dola_jsd`` is the chosen layer's JSD proper
  (:func:`~.contrast.js_divergence`).
* **Scores.** log p_final − log p_premature on the tokens with p_final ≥ ``cutoff``·max p_final
  (relative top, 0.1); the others are ruled out (−inf). ``dose`` scales the premature term
  (0: the final layer alone). DoLa runs no auxiliary forward; its repetition penalty (1.2 in
  the released generation scripts) has no previous token to act on in a first-token answer.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .catalog import SPECS, DoLaKnobs  # noqa: F401 - DoLaKnobs re-exported
from .contrast import js_divergence, log_probs, plausible
from .decoding import DecodingMethod


def bucket_layers(bucket: str, n_layers: int) -> tuple[int, ...]:
    """The candidate premature layers of a bucket for an ``n_layers`` model (decoder-layer outputs, −1: embeddings)."""
    if bucket == "all":  # HALC's set: every second layer over the whole depth
        return tuple(j - 1 for j in range(0, n_layers, 2))
    if n_layers <= 40:
        hs = range(0, n_layers // 2, 2) if bucket == "low" else range(n_layers // 2, n_layers, 2)
    else:
        hs = range(0, 20, 2) if bucket == "low" else range(n_layers - 20, n_layers, 2)
    return tuple(j - 1 for j in hs)


def selection_divergence(final: torch.Tensor, early: torch.Tensor) -> torch.Tensor:
    """½·[KL(M‖P) + KL(M‖Q)] per row (natural log, float64), P = softmax ``final``, Q = softmax ``early``,
    M = ½(P + Q): what the released codes' ``0.5 * (F.kl_div(log P, M) + F.kl_div(log Q, M))`` sums to (they
    take its mean over the vocabulary, the same argmax), the divergence by which they pick the premature layer."""
    lp, lq = torch.log_softmax(final.double(), -1), torch.log_softmax(early.double(), -1)
    m = 0.5 * (lp.exp() + lq.exp())
    lm = torch.special.xlogy(m, m)  # m·log m, 0 where m underflows
    return 0.5 * ((lm - m * lp).sum(-1) + (lm - m * lq).sum(-1))


class DoLa(DecodingMethod, spec=SPECS["dola"]):
    metrics = {"dola_premature_layer": "DoLa: the premature layer chosen (the decoder layer whose output was read; "
                                       "−1: the embeddings)",
               "dola_jsd": "DoLa: Jensen–Shannon divergence of the final and the chosen layer's distributions (nats)"}

    cutoff_knob = "cutoff"

    def rules(self) -> list:
        from .decoding_rules import dola_rules

        return dola_rules()

    def readout_layers(self, n_layers: int) -> tuple[int, ...]:
        if self.knobs.layers is None:
            return bucket_layers(self.knobs.bucket, n_layers)
        bad = [i for i in self.knobs.layers if not -1 <= i < n_layers - 1]
        if bad:
            raise UserError(f"layers {bad} out of range: DoLa's premature layers are −1 (the embeddings) … "
                            f"{n_layers - 2} (the final layer, {n_layers - 1}, is the mature one)")
        return tuple(sorted(set(self.knobs.layers)))

    def readout(self, site) -> None:
        self._candidates = {i: site.layer_logits(i, final_norm=False) for i in self.readout_layers(site.n_layers)}
        super().readout(site)

    def combine(self, site, row, logits, aux, dose):
        """DoLa's contrast log p − dose·log p_early against the premature layer that diverges most from the final one.

        Records the premature layer (``dola_premature_layer``) and its Jensen-Shannon divergence (``dola_jsd``).

        Args:
            site: the ``logits`` readout.
            row: the row combined.
            logits: [vocab] the model's own logits at the row's decision position.
            aux: [vocab] the auxiliary forward's logits for the row (unused: the candidate layers' logits come from
                the readout).
            dose: scales the method (1: as configured).

        Returns:
            ``(scores, keep)``: the [vocab] scores and the bool [vocab] tokens kept (probability ≥ ``cutoff`` × the top
            token's).
        """
        layers = list(self._candidates)
        early = torch.stack([self._candidates[i][row.index].to(logits.device) for i in layers])
        final = logits[None].expand_as(early)
        pick = int(torch.argmax(selection_divergence(final, early)))
        site.record(row, "dola_premature_layer", layers[pick])
        site.record(row, "dola_jsd", float(js_divergence(final[pick], early[pick])))
        return log_probs(logits) - dose * log_probs(early[pick]), plausible(logits, self.knobs.cutoff)
