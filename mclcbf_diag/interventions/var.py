"""VAR: visual attention redistribution from sink tokens to the other image tokens, in image-centric heads.

Paper: Kang et al., "See What You Are Told: Visual Attention Sink in Large Multimodal
Models", ICLR 2025. Released code: github.com/seilk/VisAttnSink (``src/logic/logic.py``:
``DimProspector``, ``HeadFork``, ``VARProcessor``; ``A_exps/lv1.5_7b.yml``: ``tau 20, rho
0.5, p 0.6, summ 0.2, except_last_layer 1``; ``src/logic/constants.py``: sink dims of
Llama-2-7B ``[2533, 1415]``).

* **Sink tokens** (``DimProspector``, prefill, layers 2 … L−1): from the residual x entering
  the layer, ``r = |x / rms(x)|`` (no weight, eps 1e-6); a token is a sink if
  ``max_{d ∈ sink dims} r_d > τ``. Sinks found in the prefill are reused at generated tokens.
  ``sink_dims=None`` finds the model's own dims: the ``n_sink_dims`` dims with the largest
  mean r of the BOS token over layers 2 … L−1 (one forward of BOS alone; BOS at position 0
  is the same in every prompt).
* **Image-centric heads** (``HeadFork``, post-softmax, per head and query): image mass
  ``m = Σ_img p ≥ summ`` and sink share ``Σ_{img sinks} p / Σ_img (p + 1e-6) ≤ ρ``; only when
  the image holds at least one sink.
* **Redistribution** (``VARProcessor.attn_redist``), for those heads at the text queries after
  the image (prefill) and the new token (decode): every sink key's probability (image and
  text sinks alike) is multiplied by p; the removed mass ``(1 − p)·Σ_sinks p`` is added to
  the image keys in proportion to their non-sink probabilities. Rows still sum to one.
* **Layers** 2–30 of 32 (sinks from layer 2 on, last layer excepted), by depth fraction.

Sink detection reads the whole prompt's residual, so the batched path re-runs the prompt
(:meth:`VAR.first_edited` is None).
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .base import Intervention, Site
from .catalog import SPECS, VARKnobs  # noqa: F401 - VARKnobs re-exported
from .layers import depth_fraction, published_layers

_DIMS: dict = {}


def sink_dims(lm, n: int) -> tuple[int, ...]:
    """The ``n`` dims with the largest mean |x/rms(x)| of BOS over layers 2 … L−1 (cached per model).

    Args:
        lm: the loaded model (one forward of its BOS token alone).
        n: how many dims.

    Returns:
        The dims, ascending.

    Raises:
        UserError: the tokenizer has no BOS token (VAR's ``sink_dims`` must then be set).
    """
    key = (id(lm.model), n)
    if key not in _DIMS:
        bos = lm.processor.tokenizer.bos_token_id
        if bos is None:
            raise UserError("the tokenizer has no BOS token; set VAR's sink_dims explicitly")
        with torch.no_grad():
            hs = lm.model(input_ids=torch.tensor([[bos]], device=lm.device), output_hidden_states=True).hidden_states
        first = min(2, lm.n_layers - 1)
        r = torch.stack([_rms_ratio(hs[i][0, 0]) for i in range(first, lm.n_layers)]).mean(0)
        _DIMS[key] = tuple(int(d) for d in torch.topk(r, n).indices.sort().values)
    return _DIMS[key]


def _rms_ratio(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).abs()


def redistribute(p: torch.Tensor, image: torch.Tensor, sinks: torch.Tensor, keep: float, rho: float,
                 summ: float) -> tuple[torch.Tensor, torch.Tensor]:
    """VAR on softmax rows p [H, n, K] with bool key masks: (new rows, selected [H, n]).

    Args:
        p: [H, n, K] post-softmax rows (heads, queries, keys).
        image: bool [K] the image keys.
        sinks: bool [K] the sink keys (image and text).
        keep: the factor on every sink key's probability in a selected row (the paper's p, after the dose).
        rho: a row is selected when the image sinks' share of its image mass is at most this (ρ).
        summ: … and its image mass is at least this.

    Returns:
        ``(rows, selected)``: the rows, redistributed where selected, in ``p``'s dtype, and bool [H, n] which
        were (never one without an image sink or without non-sink image mass).
    """
    pf = p.float()
    vis_sink = image & sinks
    img_mass = pf[..., image].sum(-1)
    share = pf[..., vis_sink].sum(-1) / (pf[..., image] + 1e-6).sum(-1)
    chosen = (share <= rho) & (img_mass >= summ) & bool(vis_sink.any())
    budget = (1 - keep) * pf[..., sinks].sum(-1, keepdim=True)
    rest = torch.where((image & ~vis_sink)[None, None], pf, torch.zeros_like(pf))
    total = rest.sum(-1, keepdim=True)
    chosen = chosen & (total[..., 0] > 0)
    new = torch.where(sinks[None, None], pf * keep, pf) + budget * rest / total.clamp(min=1e-30)
    return torch.where(chosen[..., None], new, pf).to(p.dtype), chosen


class VAR(Intervention, spec=SPECS["var"]):
    metrics = {"var_image_sinks": "VAR: image tokens detected as visual sinks (entering the layer)",
               "var_heads": "VAR: heads whose decision-query row was redistributed"}
    sites = frozenset({"residual", "attention"})

    def layers(self, n_layers: int) -> tuple[int, ...]:
        if self.knobs.layers is None:
            return tuple(layer for layer in depth_fraction(2, 32, n_layers) if layer < n_layers - 1)
        return published_layers(self.knobs.layers, n_layers, 2, 31)

    def open_sites(self, steer: bool) -> frozenset[str]:
        return self.sites if steer else frozenset()

    def prepare(self, lm, inputs, rows):
        self._dims = self.knobs.sink_dims or sink_dims(lm, self.knobs.n_sink_dims)
        if max(self._dims) >= lm.text_config.hidden_size:
            raise UserError(f"sink_dims {self._dims} out of range for hidden size {lm.text_config.hidden_size}")

    def begin(self, rows, n_layers):
        self._sinks: dict[tuple[int, int], torch.Tensor] = {}

    def residual(self, site: Site) -> None:
        if site.phase == "decode":
            return  # the prefill's sinks are reused
        for row in site.rows:
            pos = site.positions(row)
            x = site.tensor[row.index, site.query_index(row, pos)]
            r = _rms_ratio(x)[:, list(self._dims)].amax(-1)
            sinks = torch.zeros(row.length, dtype=torch.bool)
            sinks[pos] = (r > self.knobs.tau).cpu()
            self._sinks[(row.index, site.layer)] = sinks
            site.record(row, "var_image_sinks", int((sinks & row.image).sum()))

    def attention(self, site: Site) -> None:
        k = self.knobs
        for row in site.rows:
            q = torch.tensor([site.current(row)]) if site.phase == "decode" else row.after_image()
            p = site.tensor[row.index][:, site.query_index(row, q)]
            keep = min(max(1 - (1 - k.p) * site.dose, 0.0), 1.0)
            new, chosen = redistribute(p, site.key_mask(row, row.image),
                                       site.key_mask(row, self._sinks[(row.index, site.layer)]), keep, k.rho, k.summ)
            if bool(chosen.any()):
                site.set_rows(row, q, new)
            site.record(row, "var_heads", int(chosen[:, -1].sum()))
