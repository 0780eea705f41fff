"""VISTA: a visual steering vector (with image − without) added at every layer, norm preserved.

Paper: Li et al., "The Hidden Life of Tokens: Reducing Hallucination of Large
Vision-Language Models via Visual Information Steering", ICML 2025. Released code:
github.com/LzVv123456/VISTA (``steering_vector.py``: ``obtain_vsv``; ``llm_layers.py``:
``VSVLayer``, ``add_vsv_layers``; ``run_pope.sh``: ``--vsv --vsv-lambda 0.01 --logits-aug
--logits-alpha 0.3``).

* **Vector.** Per sample, two plain forwards: the prompt with its image ("pos") and the same
  prompt with the image removed ("neg": BOS + text before + text after the image). v_ℓ =
  h_pos,ℓ − h_neg,ℓ at the last token. (The released code passes the one difference through
  a rank-1 PCA, ``direction = component + mean``; with a single sample the centred data is
  zero, the component is an arbitrary unit vector over all layers and the mean is the
  difference itself, so the direction is the difference up to that artefact: we use the
  difference.) Where the runner kept the baseline's forward (``pope``), "pos" is that forward and
  "neg" continues its cache from the first image token on (:meth:`VISTA.prepare_batched`).
* **Edit** (``VSVLayer``, "full" mode, the default): for every token x,
  ``s = 1 + max(0, cos(x, −v))``, ``x' = ‖x‖ · normalize(x̂ + λ·s·v̂)`` (hats: unit vectors),
  at every position, in the prefill and at every generated token; ``similarity=False`` is
  the released "simple" mode (s = 1).
* **Generation** (``pope_eval.py``'s ``main``: ``obtain_vsv`` on the prompt, then ``add_vsv_layers``, then
  ``generate(use_cache=True, output_hidden_states=logits_aug)``). The vector is computed **once, from the prompt**
  (its last token), and kept for every generated token; ``VSVLayer`` steers whatever positions each forward
  computes: the whole prompt in the prefill, then the one new position of each cached step. As the edit of a
  position reads only that position's residual and the fixed vector, a position's steered residual, keys and values
  never change as the sequence grows, so continuing the steered forward's own KV cache is what re-running the whole
  sequence steered gives. :mod:`mclcbf_diag.engine.decode`'s loop does exactly this
  (:meth:`VISTA.prepares_from_prompt`): the vector's two forwards on the prompt, the steered prompt once with its
  cache kept, then one steered position per step, and SLA read from that step's steered forward (its layers' outputs
  at the new position, as the released forward reads ``hidden_states`` of each ``generate`` step). ``pope
  --generate`` runs this loop under both presets (``steering-only``: without SLA); the runner's traced ``generate``
  (``trace --max-new-tokens`` under ``steering-only``) steers every step the same way
  (``tests/test_engine_decode_vista.py``).
* **Where.** The released code wraps each layer's *MLP* and steers its output with the
  layer-output difference. The seam offers the residual entering a layer, not the MLP
  output, so here x is the residual entering layer ℓ and v_ℓ the difference of the residuals
  entering layer ℓ (``output_hidden_states[ℓ]``), layers 0 … L−1 (v₀ = 0 at the last token:
  the embeddings of the same token; the last layer's output is not reachable). Because ‖x‖
  of the residual exceeds that of an MLP output, the same λ is a larger absolute step here:
  a documented deviation, not the released placement.
* **Self-logits augmentation** (SLA; ``llava_llama.py``'s forward, ``--logits-aug
  --logits-alpha 0.3 --logits-layers 25,30``), on the answer's distribution (the ``logits``
  site): scores = (1 − α)·ℓ + α·mean_k lm_head(h_k), h_k the output of decoder layer k at the
  decision position for k = 25 … 30 of 32 (by depth fraction here), read through the
  unembedding without the final norm, as the released code reads ``hidden_states[1:][k]``; raw
  logits mixed, no softmax, no cutoff. ``logits_alpha=0`` is the steering alone (the
  ``steering-only`` preset); ``dose`` scales λ and α together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.adapter import sequence_inputs
from ..models.mrope import embeds_positions
from .base import Batched, Intervention, Readout, Row, Site
from .catalog import SPECS, VISTAKnobs  # noqa: F401 - VISTAKnobs re-exported
from .decoding import WithLogitPart, answer_from
from .layers import published_layers
from .views import image_free_continuation, image_free_inputs, row_inputs


def steering_vectors(lm, inputs: dict, rows: list[Row]) -> torch.Tensor:
    """v [B, L, d] (float32): residuals entering each layer at the last token, with image − without.

    Args:
        lm: the loaded model.
        inputs: the batch's model inputs.
        rows: the rows measured (the image-free prompt is built from each).

    Returns:
        [len(rows), L, d] float32.
    """
    inputs = row_inputs(inputs, rows)
    feed = {k: v for k, v in inputs.items() if k != "inputs_embeds"}
    if "inputs_embeds" in inputs:
        feed = {"inputs_embeds": inputs["inputs_embeds"], "attention_mask": inputs["attention_mask"],
                **sequence_inputs(inputs),  # Gemma 3's image tokens
                **embeds_positions(lm, inputs)}
    L = lm.n_layers
    with torch.no_grad():
        pos = lm.model(**feed, output_hidden_states=True, logits_to_keep=1).hidden_states
        pos = torch.stack([pos[i][:, -1].float() for i in range(L)], dim=1)
        neg = lm.model(**image_free_inputs(lm, rows), output_hidden_states=True, logits_to_keep=1).hidden_states
        neg = torch.stack([neg[i][:, -1].float() for i in range(L)], dim=1)
    return pos - neg


def steer(x: torch.Tensor, v: torch.Tensor, lam: float, similarity: bool) -> torch.Tensor:
    """x' = ‖x‖·normalize(x̂ + λ·s·v̂) for residuals x [n, d] and a vector v [d] (float32).

    Args:
        x: the residuals [n, d].
        v: the steering vector [d].
        lam: λ, the step's weight.
        similarity: s = 1 + max(0, cos(x, −v)) per residual; False: s = 1.

    Returns:
        The steered residuals [n, d] float32, each with its own norm.
    """
    x = x.float()
    norm = x.norm(dim=-1, keepdim=True)
    s = 1.0 + F.cosine_similarity(x, -v[None], dim=-1).clamp(min=0).unsqueeze(-1) if similarity else 1.0
    return F.normalize(F.normalize(x, dim=-1) + lam * s * F.normalize(v, dim=-1)[None], dim=-1) * norm


class VISTA(WithLogitPart, Intervention, spec=SPECS["vista"]):
    metrics = {"vista_vector_norm": "VISTA: ‖v_ℓ‖ (residual with image − without, decision token)",
               "vista_similarity": "VISTA: s = 1 + max(0, cos(x, −v)) at the decision token"}
    sites = frozenset({"residual"})

    def layers(self, n_layers: int) -> tuple[int, ...]:
        return published_layers(self.knobs.layers, n_layers, 0, 32)

    logit_knob, logit_off = "logits_alpha", 0.0  # α = 0: the steering alone

    def readout_layers(self, n_layers: int) -> tuple[int, ...]:
        if not self.logit_part_on:
            return ()
        # a model too shallow for 25–30 of 32 to hold a layer reads the one at 25/32 of its depth
        return published_layers(self.knobs.logits_layers, n_layers, 25, 31) or (25 * n_layers // 32,)

    def readout(self, site: Readout) -> None:
        layers = self.readout_layers(site.n_layers)
        mean = torch.stack([site.layer_logits(i, final_norm=False) for i in layers]).mean(0)
        for row in site.rows:
            alpha = self.knobs.logits_alpha * site.dose_of(row)
            logits = site.logits[row.index]
            early = mean[row.index].to(logits.device)
            answer_from(site, row, (1 - alpha) * logits + alpha * early, None, self._yes_no, early)

    def first_edited(self, row: Row) -> int | None:
        return 0

    def auxiliary_forwards(self) -> int | None:
        # its edit of every position needs a whole forward beside the baseline's (which, in pope, is also the vector's
        # prompt with the image), and the prompt without the image continues the baseline's cache; SLA reads the run's
        # own layers. Without SLA it has no logit part.
        return 2 if self.logit_part_on else None

    def prepare(self, lm, inputs: dict, rows: list[Row]) -> None:
        # a row's vector at its own index: ``rows`` may be some rows of the batch (a mix's)
        self.use_views(lm, rows, list(steering_vectors(lm, inputs, rows)))

    def prepare_batched(self, lm, inputs: dict, rows: list[Row], batched: Batched) -> None:
        """The steering vector from the baseline's own forward and the image-free prompt continuing its cache.

        ``batched.states`` is the prompt with its image; the image-free prompt continues ``batched.cache``
        (:func:`~.views.image_free_continuation`). Both are used where the runner kept them for every row of the batch;
        else :meth:`prepare`.

        Args:
            lm: the loaded model.
            inputs: the batch's model inputs.
            rows: the batch rows prepared.
            batched: what the runner kept of the batch's own forwards (its ``states`` and ``cache``).
        """
        if batched.states is None or batched.cache is None or len(rows) != batched.states.shape[0]:
            return self.prepare(lm, inputs, rows)
        L = lm.n_layers
        with torch.no_grad():
            neg = image_free_continuation(lm, rows, batched.cache, inputs["attention_mask"], hidden_states=True)
            neg = torch.stack([neg.hidden_states[i][:, -1].float() for i in range(L)], dim=1)
        self._v = batched.states.to(neg.device) - neg
        self._yes_no = (int(lm.tokens.yes_id), int(lm.tokens.no_id))

    def prepares_from_prompt(self) -> bool:
        """The released code's generation: the vector is the prompt's (``obtain_vsv`` before ``generate``), and the
        edit of each position reads that position's residual and the vector only, so a generation loop prepares once
        and continues the steered forward's own cache (see the module docstring, "Generation")."""
        return True

    def view_key(self):
        """The steering vector reads no knob: one per question."""
        return (type(self),)

    def prepared_views(self, rows: list[Row]) -> list:
        """Each row's steering vector [L, d] (float32)."""
        return [self._v[r.index] for r in rows]

    def use_views(self, lm, rows: list[Row], views: list) -> None:
        v = (torch.zeros(max(r.index for r in rows) + 1, *views[0].shape, dtype=views[0].dtype, device=views[0].device)
             if rows else None)
        for r, view in zip(rows, views):
            v[r.index] = view
        self._v = v
        self._yes_no = (int(lm.tokens.yes_id), int(lm.tokens.no_id))

    def residual(self, site: Site) -> None:
        k = self.knobs
        for row in site.rows:
            v = self._v[row.index, site.layer].to(site.tensor.device)
            if not bool(v.norm() > 0):
                continue
            pos = site.positions(row)
            x = site.tensor[row.index, site.query_index(row, pos)].float()
            new = steer(x, v, k.lam * site.dose, k.similarity)
            site.add(row, pos, new - x)
            last = x[-1:]
            s = 1.0 + float(F.cosine_similarity(last, -v[None], dim=-1).clamp(min=0)) if k.similarity else 1.0
            site.record(row, "vista_vector_norm", float(v.norm()))
            site.record(row, "vista_similarity", s)
