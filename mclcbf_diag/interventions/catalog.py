"""What each built-in intervention is: its one-line summary, paper, knobs and presets, without torch.

The knob dataclasses and presets of the built-in interventions live here, so that
``mclcbf-diag interventions``, ``--help-knobs`` and the ``--set`` checks read them in a
fraction of a second; each intervention's class takes them from its :class:`Spec`
(``class PAI(Intervention, spec=SPECS["pai"])``), so the listing and the class cannot
disagree. MC-LCBF's knobs stay in :mod:`.mclcbf.config` (torch-free too). Every knob is a
:func:`~mclcbf_diag.knobs.knob` field: its default and its one-line description together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import UserError
from ..knobs import check_choices, knob
from .mclcbf.config import ALIASES, PRESETS, BarrierConfig


@dataclass(frozen=True)
class Spec:
    """An intervention as the listing shows it; the first preset is the default."""

    name: str
    summary: str  # one line: what it edits
    paper: str  # the paper and its released code ("" for a probe)
    Knobs: type
    presets: dict
    aliases: dict = field(default_factory=dict)


LAYERS_HELP = "decoder layers to edit; none: {}"


# --------------------------------------------------------------------------- attention knockout
@dataclass(frozen=True)
class KnockoutKnobs:
    factor: float = knob(0.0, "scale each head's image mass by this (0 removes it, 2 doubles it; capped below 1)")
    target: float | None = knob(None, "set the image mass to this instead of factor × the mass")
    tokens: Literal["decision", "after_image"] = knob("decision", "the queries edited: the decision token, or every "
                                                                  "text token after the image")
    layers: tuple[int, ...] | None = knob(None, LAYERS_HELP.format("every layer"))

    def __post_init__(self):
        check_choices(self)


# --------------------------------------------------------------------------- attention blocking
Group = Literal["image", "question", "last"]


@dataclass(frozen=True)
class BlockKnobs:
    source: Group = knob("image", "the keys whose information is cut off")
    target: Group = knob("last", "the queries that may no longer read them")
    layers: tuple[int, ...] | None = knob(None, LAYERS_HELP.format("every layer"))

    def __post_init__(self):
        check_choices(self)


# --------------------------------------------------------------------------- PAI
@dataclass(frozen=True)
class PAIKnobs:
    alpha: float = knob(0.2, "image-key logit amplification: a ← a + α·|a|")
    layers: tuple[int, ...] | None = knob(None, LAYERS_HELP.format("2–31 of 32, by depth fraction"))
    contrast_gamma: float = knob(1.1, "γ of PAI's image-free contrast γ·(log p − log p_no_image) + log p_no_image "
                                      "(1: the attention edit alone)")
    cutoff: float = knob(0.1, "the contrast's plausibility cutoff: keep tokens with p ≥ cutoff·p_max")

    def __post_init__(self):
        if not self.alpha >= 0:
            raise UserError(f"alpha={self.alpha} must be >= 0")
        _check_cutoff(self.cutoff)


def _check_cutoff(value: float, name: str = "cutoff") -> None:
    if not 0.0 <= value < 1.0:
        raise UserError(f"{name}={value} is a share of the top token's probability; use a value in [0, 1)")


# --------------------------------------------------------------------------- VAF (ClearSight)
@dataclass(frozen=True)
class VAFKnobs:
    alpha: float = knob(1.15, "factor on the text queries' image-key logits (enh_para)")
    beta: float = knob(0.95, "factor on their prefix-key logits (sup_para)")
    layers: tuple[int, ...] | None = knob(None, LAYERS_HELP.format("9–14 of 32, by depth fraction"))
    include_bos: bool = knob(True, "scale BOS with the prefix keys, as the released code does")

    def __post_init__(self):
        for name in ("alpha", "beta"):
            if not getattr(self, name) >= 0:
                raise UserError(f"{name}={getattr(self, name)} must be >= 0")


# --------------------------------------------------------------------------- VISTA
@dataclass(frozen=True)
class VISTAKnobs:
    lam: float = knob(0.01, "λ, the steering strength (POPE: 0.01)")
    similarity: bool = knob(True, "the released full mode's s = 1 + max(0, cos(x, −v)); false: s = 1")
    layers: tuple[int, ...] | None = knob(None, LAYERS_HELP.format("every layer"))
    logits_alpha: float = knob(0.3, "self-logits augmentation (SLA): (1 − α)·logits + α·mean of the readout "
                                    "layers' logits (0: off)")
    logits_layers: tuple[int, ...] | None = knob(None, "SLA's readout layers (their outputs through lm_head); none: "
                                                       "25–30 of 32, by depth fraction")

    def __post_init__(self):
        if not 0.0 <= self.logits_alpha <= 1.0:
            raise UserError(f"logits_alpha={self.logits_alpha} is a mixing weight; use a value in [0, 1]")


# --------------------------------------------------------------------------- VCD
@dataclass(frozen=True)
class VCDKnobs:
    alpha: float = knob(1.0, "contrast strength: (1 + α)·logits − α·logits of the noised image")
    beta: float = knob(0.2, "plausibility cutoff: keep tokens with p ≥ β·p_max on the clean image (0: none)")
    noise_step: int = knob(500, "diffusion step t of the noised image (0 … 999)")
    seed: int = knob(0, "seed of the diffusion noise (each image draws its own from it)")

    def __post_init__(self):
        if not self.alpha >= 0:
            raise UserError(f"alpha={self.alpha} must be >= 0")
        _check_cutoff(self.beta, "beta")
        if not 0 <= self.noise_step < 1000:
            raise UserError(f"noise_step={self.noise_step} is a diffusion step; use 0 … 999 (500: the paper's)")


# --------------------------------------------------------------------------- DoLa
@dataclass(frozen=True)
class DoLaKnobs:
    bucket: Literal["low", "high", "all"] = knob("low", "candidate premature layers: every second layer of the lower "
                                                        "half, the upper half or the whole depth (the embeddings "
                                                        "count as the first)")
    layers: tuple[int, ...] | None = knob(None, "candidate premature layers instead of the bucket: decoder layers "
                                                "whose output is read (−1: the embeddings)")
    cutoff: float = knob(0.1, "relative-top cutoff: keep tokens with p ≥ cutoff·p_max of the final layer")

    def __post_init__(self):
        check_choices(self)
        if self.layers is not None and not self.layers:
            raise UserError("layers=(): DoLa needs at least one candidate premature layer")
        _check_cutoff(self.cutoff)


# --------------------------------------------------------------------------- CausalMM
@dataclass(frozen=True)
class CausalMMKnobs:
    gamma: float = knob(1.0, "contrast strength: (1 + γ)·logits − γ·logits under counterfactual attention")
    epsilon: float = knob(0.6, "plausibility cutoff: keep tokens with p ≥ ε·p_max (0: none)")
    attention: Literal["shuffle", "random", "uniform", "reversed"] = knob(
        "shuffle", "the counterfactual attention map (vision: the tower's feature layer; language: every decoder "
                   "layer's rows)")
    seed: int = knob(0, "seed of the random and shuffled maps")
    level: Literal["vision", "language", "both"] = knob(
        "vision", "where the counterfactual attention is: the vision tower (the released code), the language "
                  "model's self-attention, or both in one counterfactual forward")

    def __post_init__(self):
        check_choices(self)
        if not self.gamma >= 0:
            raise UserError(f"gamma={self.gamma} must be >= 0")
        _check_cutoff(self.epsilon, "epsilon")


# --------------------------------------------------------------------------- OPERA
@dataclass(frozen=True)
class OPERAKnobs:
    candidates: int = knob(5, "top tokens scored (num_attn_candidates); the others are ruled out")
    weight: float = knob(1.0, "penalty weight: a candidate gains weight × its image attention share")
    scale_factor: float = knob(50.0, "beam search (--decoding beam): the generated window's attention is scaled by "
                                     "this before the column products of the over-trust penalty")
    threshold: int = knob(15, "beam search: roll back once the penalty's column has been the top one more than this "
                              "many steps")

    def __post_init__(self):
        if not self.candidates >= 1:
            raise UserError(f"candidates={self.candidates} must be >= 1")
        if not self.scale_factor > 0:
            raise UserError(f"scale_factor={self.scale_factor} must be > 0 (50: the released code's)")
        if not self.threshold >= 0:
            raise UserError(f"threshold={self.threshold} must be >= 0 (15: the released code's)")


# --------------------------------------------------------------------------- HALC
@dataclass(frozen=True)
class HALCKnobs:
    context_window: int = knob(4, "focal views: the box shrunk, the box, then expansions (context_window)")
    expand_ratio: float = knob(0.6, "each view's sides move out by width·ratio/2 (expand_ratio; shrink at most 0.8)")
    k_candidates: int = knob(4, "contrasts: both directions of the k/2 most divergent view pairs (k_candidate_num)")
    weight: float = knob(0.05, "contrast weight w: z_final − w·z_base (contrast_weight)")
    max_boxes: int = knob(3, "more boxes than this for the word: not handled, the model's own answer (max_handle_box)")
    missing: Literal["box", "model"] = knob("box", "the detector finds nothing: the released fallback box "
                                                   "(0.2, 0.2, 0.8, 0.8), or the model's own answer")

    def __post_init__(self):
        check_choices(self)
        if not self.context_window >= 2:
            raise UserError(f"context_window={self.context_window}: HALC contrasts views; use 2 or more (4: released)")
        if not (self.k_candidates >= 2 and self.k_candidates % 2 == 0):
            raise UserError(f"k_candidates={self.k_candidates} must be even and >= 2 (both directions of a pair)")
        if not self.weight >= 0:
            raise UserError(f"weight={self.weight} must be >= 0")
        if not self.expand_ratio > 0:
            raise UserError(f"expand_ratio={self.expand_ratio} must be > 0 (0.6: released)")
        if not self.max_boxes >= 1:
            raise UserError(f"max_boxes={self.max_boxes} must be >= 1 (3: released)")


# --------------------------------------------------------------------------- AD-HH
LLAVA_15_7B_HEADS = ((16, 29), (26, 9), (13, 31), (15, 10), (20, 12), (30, 9), (19, 18), (17, 0), (18, 9), (26, 28),
                     (19, 27), (18, 26), (15, 25), (14, 16), (31, 26), (15, 24), (31, 3), (22, 20), (27, 29), (17, 28))


@dataclass(frozen=True)
class AdHHKnobs:
    heads: tuple[tuple[int, int], ...] | None = knob(None, "hallucination heads as (layer, head); none: found on "
                                                           "the model")
    threshold: float = knob(0.4, "the text attention mass above which a head's text attention is zeroed")
    top_k: int | None = knob(None, "heads to find; none: 20 of every 1024")
    calibration: int = knob(16, "questions used to find the heads")
    renormalise: bool = knob(False, "rescale the row after zeroing (the released code does not)")

    def __post_init__(self):
        if self.heads is not None and not all(isinstance(lh, tuple) and len(lh) == 2 for lh in self.heads):
            raise UserError(f"heads={self.heads!r} must be (layer, head) pairs, e.g. ((16, 29), (26, 9))")
        if not 0.0 <= self.threshold <= 1.0:
            raise UserError(f"threshold={self.threshold} is not a probability mass; use a value in [0, 1]")


# --------------------------------------------------------------------------- VAR
@dataclass(frozen=True)
class VARKnobs:
    p: float = knob(0.6, "share of a sink token's attention kept")
    tau: float = knob(20.0, "sink threshold on |x/rms(x)| in the sink dims")
    rho: float = knob(0.5, "largest sink share of a head's image mass (image-centric heads)")
    summ: float = knob(0.2, "smallest image mass of an image-centric head")
    sink_dims: tuple[int, ...] | None = knob(None, "the residual dims that mark sinks; none: found on BOS")
    n_sink_dims: int = knob(2, "how many sink dims to find when sink_dims is none")
    layers: tuple[int, ...] | None = knob(None, LAYERS_HELP.format("2–30 of 32, by depth fraction"))

    def __post_init__(self):
        if not 0.0 <= self.p <= 1.0:
            raise UserError(f"p={self.p} must be in [0, 1]")


SPECS: dict[str, Spec] = {s.name: s for s in (
    Spec("mclcbf", "a control-barrier step α·θ* on the decision token's residual (or its image-key logits) "
                   "that lifts its image attention mass h to τ",
         "the researcher's MC-LCBF (seed-exp6: experiment 6 knob for knob)", BarrierConfig, PRESETS, ALIASES),
    Spec("knockout", "set the image attention mass of the decision (or after-image) tokens, renormalised", "",
         KnockoutKnobs, {"remove": KnockoutKnobs(0.0), "double": KnockoutKnobs(2.0)}),
    Spec("block", "block attention edges image→question, image→last or question→last (used by flow)",
         "Zhang et al., Cross-modal Information Flow in Multimodal Large Language Models, CVPR 2025", BlockKnobs,
         {"image-to-last": BlockKnobs("image", "last"), "image-to-question": BlockKnobs("image", "question"),
          "question-to-last": BlockKnobs("question", "last")}),
    Spec("pai", "amplify the last query's image-key attention logits, a ← a + α·|a|, then contrast with the "
                "image-free answer",
         "Liu et al., Paying More Attention to Image, ECCV 2024 (github.com/LALBJ/PAI)", PAIKnobs,
         {"paper": PAIKnobs(), "attention-only": PAIKnobs(contrast_gamma=1.0), "strong": PAIKnobs(alpha=0.5)}),
    Spec("vaf", "in middle layers, scale text queries' image-key logits by α and prefix-key logits by β",
         "Yin et al., ClearSight (VAF), CVPR 2025 (github.com/ustc-hyin/ClearSight)", VAFKnobs,
         {"paper": VAFKnobs(), "image-only": VAFKnobs(beta=1.0)}),
    Spec("vista", "add a visual steering vector (residual with image − without) at every layer, norm kept, and "
                  "mix late layers' logits into the answer",
         "Li et al., The Hidden Life of Tokens (VISTA), ICML 2025 (github.com/LzVv123456/VISTA)", VISTAKnobs,
         {"pope": VISTAKnobs(), "steering-only": VISTAKnobs(logits_alpha=0.0),
          "simple": VISTAKnobs(similarity=False), "strong": VISTAKnobs(lam=0.1)}),
    Spec("adhh", "zero the text attention of hallucination heads whose text mass passes a threshold",
         "Yang et al., Understanding and Mitigating Hallucinations in LVLMs via Modular Attribution and "
         "Intervention, ICLR 2025 (github.com/TianyunYoung/Hallucination-Attribution)", AdHHKnobs,
         {"paper": AdHHKnobs(), "llava-1.5-7b": AdHHKnobs(heads=LLAVA_15_7B_HEADS)}),
    Spec("var", "move attention from sink tokens to the other image tokens in image-centric heads",
         "Kang et al., See What You Are Told: Visual Attention Sink in LMMs, ICLR 2025 (github.com/seilk/VisAttnSink)",
         VARKnobs, {"paper": VARKnobs(), "llama-2-7b-dims": VARKnobs(sink_dims=(1415, 2533))}),
    Spec("vcd", "contrast the answer with the same question on a diffusion-noised image (a decoding-level method)",
         "Leng et al., Visual Contrastive Decoding, CVPR 2024 (github.com/DAMO-NLP-SG/VCD)", VCDKnobs,
         {"pope": VCDKnobs(), "driver": VCDKnobs(beta=0.1)}),
    Spec("dola", "contrast the final layer's answer with the earlier layer it differs from most (a decoding-level "
                 "method)",
         "Chuang et al., DoLa: Decoding by Contrasting Layers, ICLR 2024 (github.com/voidism/DoLa)", DoLaKnobs,
         {"low": DoLaKnobs(), "high": DoLaKnobs(bucket="high"), "halc-first-token": DoLaKnobs(bucket="all")}),
    Spec("causalmm", "contrast the answer with the one under counterfactual attention, in the vision tower and/or "
                     "the language model (a decoding-level method)",
         "Zhou et al., Mitigating Modality Prior-Induced Hallucinations in MLLMs via Deciphering Attention Causality, "
         "ICLR 2025 (github.com/The-Martyr/CausalMM)", CausalMMKnobs,
         {"pope": CausalMMKnobs(), "random": CausalMMKnobs(attention="random"),
          "uniform": CausalMMKnobs(attention="uniform"), "reversed": CausalMMKnobs(attention="reversed"),
          "language": CausalMMKnobs(level="language"), "both": CausalMMKnobs(level="both")}),
    Spec("opera", "score the top tokens by how much each, once written, attends to the image (OPERA's first step)",
         "Huang et al., OPERA: Alleviating Hallucination via Over-Trust Penalty and Retrospection-Allocation, CVPR "
         "2024 (github.com/shikiw/OPERA)", OPERAKnobs, {"paper": OPERAKnobs()}),
    Spec("halc", "contrast focal views (crops around the grounded box) of the object the question names (a "
                 "decoding-level method; first token)",
         "Chen et al., HALC: Object Hallucination Reduction via Adaptive Focal-Contrast Decoding, ICML 2024 "
         "(github.com/BillChan226/HALC)", HALCKnobs,
         {"pope": HALCKnobs(), "model-fallback": HALCKnobs(missing="model")}),
)}


def preset_changes(spec: Spec) -> list[tuple[str, str | None, list[tuple[str, object]]]]:
    """Each preset as ``(name, alias_of, changes)``: the first is the default (no changes); an alias names the
    earlier preset it equals; the others list ``(knob, value)`` where they differ from the first."""
    from ..knobs import changed

    first_name, first = next(iter(spec.presets.items()))
    out, seen = [], {}
    for name, value in spec.presets.items():
        same = None if name == first_name else next((n for n, v in seen.items() if v == value), None)
        changes = [] if name == first_name or same else [(k, getattr(value, k)) for k in changed(value, first)]
        seen.setdefault(name, value)
        out.append((name, same, changes))
    return out


def spec_of(cls) -> Spec:
    """The :class:`Spec` of an intervention class (a registered user class: from its attributes; its summary
    defaults to the first line of its docstring)."""
    summary = getattr(cls, "summary", "") or (cls.__dict__.get("__doc__") or "").strip().split("\n")[0]
    return Spec(cls.name, summary, getattr(cls, "paper", ""), cls.Knobs, dict(cls.presets),
                dict(getattr(cls, "aliases", {})))
