"""HALC's focal views: ground an object word, crop views around its box, contrast the views' answers.

Paper: Chen, Zhao, Luo et al., "HALC: Object Hallucination Reduction via Adaptive Focal-Contrast
Decoding", ICML 2024. Released code: github.com/BillChan226/HALC,
``decoder_zoo/HALC/context_density/halc.py`` (``context_density_embedding``, ``expand_bbox``,
``context_layer_double_multi_contrastive_decoding``); POPE defaults in ``run_scripts/pope_eval.py``:
``context_window 4, expand_ratio 0.6, contrast_weight 0.05, k_candidate_num 4, box_threshold 0.45,
max_handle_box 3``, GroundingDINO (Swin-T OGC) as the detector.

* **Grounding** (:func:`ground`). A :class:`Detector` gives the boxes of an object word in the
  image (normalised ``(x0, y0, x1, y1)``). More than ``max_boxes`` (3): the word is not handled;
  none: the released fallback box ``(0.2, 0.2, 0.8, 0.8)``; else the smallest box.
* **Focal views** (:func:`focal_boxes`). With ``context_window`` n > 1: the box shrunk by
  ``expand_ratio`` (at most 0.8), the box itself, then n − 2 successive expansions of the last by
  ``expand_ratio`` (:func:`expand_box`: each side moves by width·f/2 or height·f/2, clipped to
  the image). Each view is the image cropped to its box (:func:`crop`), given to the model as a
  whole image.
* **Contrast** (:func:`view_contrast`). The views' next-token logits z_0 … z_{n−1}; for every
  pair the divergence the released code computes, ½·[KL(M‖P_i) + KL(M‖P_j)] with ``F.kl_div``'s
  ``batchmean`` (a batch of one: the sum), M = ½(P_i + P_j); the ``k_candidates``/2 pairs of the
  largest divergence (``topk`` of the upper triangle), and for each both directions
  z_j − w·z_i and z_i − w·z_j (w = ``contrast_weight``; the released mask of the base where the
  other is below −1000 changes nothing on finite logits). Each contrast's argmax is a candidate
  token for the position (:func:`focal_step` runs the three on a loaded model).

**The intervention** (``--intervention halc``, :class:`HALC`): the first-token answer of a POPE
question is HALC's focal-view contrast for the object the question names. The object word is read
from the prompt (``Is there a/an WORD in the image?``); the word is grounded, the views' logits at the
decision position come from plain forwards of the same prompt on each crop (``context_window``
auxiliary forwards), and the answer is read from the first contrast :func:`view_contrast` returns
(the most divergent pair, its first direction): z_final − dose·w·z_base, no plausibility cutoff.
The released code instead keeps every contrast's argmax as a candidate and ranks the beams by a
BLIP image-text score, which a one-token Yes/No answer has no use for; the first contrast is this
toolkit's choice, recorded as ``halc_final_view`` / ``halc_base_view``. When the detector finds
nothing (``missing``): the released fallback box's views (``box``, the default) or the model's own
scores (``model``); more than ``max_boxes`` boxes, no object word in the prompt or no image given:
the model's own scores. ``halc_grounding`` records which (1 detected, 0 the fallback box, −1 the
model's own scores) and ``halc_views`` how many views were contrasted (0: none).

What is not here: HALC's generation loop (``halc_dola_beam_search`` in its transformers fork), which
decodes with DoLa, fires this step when a completed word is a noun (spaCy), re-decodes that word
from the candidates and ranks the beams by a BLIP image-text score. Multi-token HALC generation is
out of scope: ``--generate`` under ``halc`` is refused. In the released loop the first answer token
is DoLa's (DoLa's preset ``halc-first-token``), where the focal contrast never fires; ``halc`` applies
the focal contrast at the first token to the question's object instead, which is what a POPE answer
can test.

**The detector is pluggable.** HALC's released code runs GroundingDINO on the image with the word
as its text query, thresholded at 0.45. The embedded model's world knows every object's box, so
it ships :class:`OracleDetector`: the drawn objects' exact boxes, never a false or missed
detection, and no box for an annotated object that is not drawn (a hidden partner). It is not
GroundingDINO. A real detector misses small and faint objects, finds objects that are not there
(its own hallucinations, which HALC then contrasts around), returns several boxes for one word
(over ``max_boxes``: the word is skipped) and depends on ``box_threshold``; with it HALC's views
are as good as its detections, and a figure measured with the oracle is HALC with perfect grounding
(no run here compares it with a real detector's). Any object with ``boxes(image, word)`` plugs in, from Python:
``HALC.from_preset("pope").with_detector(my_detector)`` (or ``HALC(knobs, detector=...)``), passed to
``answer_pair``/``run_jobs`` like any intervention. The detector is part of a run's identity
(:meth:`HALC.components`, :func:`detector_name`: the class's qualified name with the detector's ``name``
attribute; the oracle is left out, the identity HALC runs had before), so runs with different detectors are never
resumed into one folder. Without one,
:class:`HALC` uses the oracle of the shipped POPE images; ``mclcbf-diag pope --intervention halc`` refuses images
the oracle does not know.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from dataclasses import replace as replace_knobs
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .base import Intervention
from .catalog import SPECS, HALCKnobs  # noqa: F401 - HALCKnobs re-exported
from .decoding import DecodingMethod, answer_from

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) as fractions of the width and height
FALLBACK: Box = (0.2, 0.2, 0.8, 0.8)  # the released box when the detector finds nothing


class Detector(Protocol):
    """What grounds an object word: its boxes in the image (empty: not found)."""

    def boxes(self, image, word: str) -> list[Box]:
        """The boxes of ``word`` in ``image`` (a PIL image), normalised to [0, 1]."""


def expand_box(box: Box, factor: float) -> Box:
    """The released ``expand_bbox``: each side moves out by width·factor/2 (height·factor/2), clipped to [0, 1];
    a negative factor shrinks the box."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    return (max(0, x0 - w * factor / 2), max(0, y0 - h * factor / 2), min(1, x1 + w * factor / 2),
            min(1, y1 + h * factor / 2))


def focal_boxes(box: Box, context_window: int = 4, expand_ratio: float = 0.6) -> list[Box]:
    """The released views' boxes: ``[shrunk, box, expanded, expanded twice …]`` (``context_window`` of them).

    Args:
        box: the grounded box, (x0, y0, x1, y1) as fractions of the width and height.
        context_window: how many views (1: the box alone).
        expand_ratio: each view's expansion of the previous one's box (the first view shrinks the box by it, at most
            0.8).

    Returns:
        The views' boxes, smallest first.
    """
    if context_window == 1:
        return [box]
    out = [expand_box(box, -min(expand_ratio, 0.8)), box]
    for _ in range(1, context_window - 1):
        out.append(expand_box(out[-1], expand_ratio))
    return out


def ground(detector: Detector, image, word: str, max_boxes: int = 3) -> tuple[Box | None, str]:
    """``(box, status)``: the smallest of the detector's boxes, the fallback, or None, as the released code decides.

    Args:
        detector: grounds the word (its boxes, normalised to [0, 1]).
        image: the image (PIL).
        word: the object word.
        max_boxes: more boxes than this is "invalid".

    Returns:
        The smallest box and "detected"; :data:`FALLBACK` and "not-detected" when none is found; None and "invalid"
        when more than ``max_boxes`` are found.
    """
    found = list(detector.boxes(image, word))
    if len(found) > max_boxes:
        return None, "invalid"
    if not found:
        return FALLBACK, "not-detected"
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in found]
    return found[areas.index(min(areas))], "detected"


def crop(image, box: Box):
    """The image cropped to ``box`` (the released absolute coordinates, left/top/right/bottom)."""
    w, h = image.size
    return image.crop((box[0] * w, box[1] * h, box[2] * w, box[3] * h))


def pair_divergence(a: torch.Tensor, b: torch.Tensor) -> float:
    """The released pair score ½·[KL(M‖P_a) + KL(M‖P_b)] of two [vocab] logits (float64)."""
    a, b = a.double()[None], b.double()[None]
    m = 0.5 * (F.softmax(a, -1) + F.softmax(b, -1))
    return float(0.5 * (F.kl_div(F.log_softmax(a, -1), m, reduction="batchmean")
                        + F.kl_div(F.log_softmax(b, -1), m, reduction="batchmean")))


def view_contrast(logits: torch.Tensor, k_candidates: int = 4,
                  weight: float = 0.05) -> list[tuple[int, int, torch.Tensor]]:
    """The released double multi-contrast of the views' logits.

    For each of the ``k_candidates``/2 most divergent view pairs (by Jensen-Shannon divergence), largest first, both
    directions: a view's logits less ``weight`` × the other's.

    Args:
        logits: the views' logits [n, vocab].
        k_candidates: contrasts kept (even: two per pair).
        weight: how much of the other view's logits a contrast subtracts.

    Returns:
        ``(final view, base view, scores [vocab])`` per contrast.

    Raises:
        ValueError: an odd ``k_candidates``.
    """
    if k_candidates % 2:
        raise ValueError("k_candidates must be even")  # the knob's check
    n = logits.shape[0]
    jsd = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            jsd[i, j] = pair_divergence(logits[i], logits[j])
    top = torch.topk(jsd.flatten(), min(k_candidates // 2, n * (n - 1) // 2)).indices
    out = []
    for flat in top.tolist():
        i, j = divmod(flat, n)
        z_i, z_j = logits[i].float(), logits[j].float()
        out.append((j, i, z_j - weight * z_i))
        out.append((i, j, z_i - weight * z_j))
    return out


@dataclass
class FocalStep:
    """What :func:`focal_step` found for one object word."""

    status: str  # "detected", "not-detected" (the fallback box) or "invalid" (too many boxes: not handled)
    boxes: list[Box] = field(default_factory=list)  # the views' boxes
    logits: torch.Tensor | None = None  # [views, vocab] float32
    contrasts: list = field(default_factory=list)  # (final view, base view, scores [vocab]) per candidate
    candidates: list[int] = field(default_factory=list)  # each contrast's argmax


def focal_step(lm, prompt: str, image, word: str, detector: Detector, generated: torch.Tensor | None = None, *,
               context_window: int = 4, expand_ratio: float = 0.6, k_candidates: int = 4, weight: float = 0.05,
               max_boxes: int = 3, grounded: tuple | None = None) -> FocalStep:
    """HALC's focal-view contrast for ``word`` at the next position of ``prompt``.

    Ground the word, run the model on each view (the image cropped to its box, a whole image to the processor; the
    views are the rows of one forward, :func:`view_logits`), contrast the views' last logits (:func:`view_contrast`)
    and take each contrast's argmax.

    Args:
        lm: the loaded model.
        prompt: the question's prompt.
        image: the image (PIL).
        word: the object word grounded.
        detector: grounds the word.
        generated: [n] token ids already written after the prompt (None: none).
        context_window: how many views (:func:`focal_boxes`).
        expand_ratio: each view's expansion of the previous one's box.
        k_candidates: contrasts kept, two per divergent view pair (even).
        weight: how much of the other view's logits each contrast subtracts.
        max_boxes: more detected boxes than this is "invalid".
        grounded: :func:`ground`'s ``(box, status)`` where the caller already has it (the detector runs once).

    Returns:
        The :class:`FocalStep`; only its status ("invalid") when the detector found more than ``max_boxes``.
    """
    box, status = grounded if grounded is not None else ground(detector, image, word, max_boxes)
    if box is None:
        return FocalStep(status)
    boxes = focal_boxes(box, context_window, expand_ratio)
    logits = view_logits(lm, [prompt] * len(boxes), [crop(image, b) for b in boxes], generated)
    return contrasted(status, boxes, logits, k_candidates, weight)


def contrasted(status: str, boxes: list[Box], logits: torch.Tensor, k_candidates: int, weight: float) -> FocalStep:
    """The :class:`FocalStep` of views ``boxes`` whose last logits are ``logits`` [views, vocab] float32.

    Args:
        status: :func:`ground`'s status.
        boxes: the views' boxes.
        logits: [views, vocab] float32, one row per box.
        k_candidates: contrasts kept (:func:`view_contrast`).
        weight: how much of the other view's logits each contrast subtracts.

    Returns:
        The step: the contrasts and each one's argmax.
    """
    contrasts = view_contrast(logits, k_candidates, weight)
    return FocalStep(status, boxes, logits, contrasts, [int(c.argmax()) for _, _, c in contrasts])


def view_logits(lm, prompts: list[str], images: list, generated: torch.Tensor | None = None) -> torch.Tensor:
    """The last-position logits of plain forwards of ``prompts[i]`` on ``images[i]``, as the rows of one forward.

    The forward is left-padded: each row at the positions it has alone, its padding masked
    (:func:`~mclcbf_diag.models.processing.padded_inputs`), so a row's logits are its own forward's up to the
    summation order of batched matmuls.

    Args:
        lm: the loaded model.
        prompts: whole prompts, one per row.
        images: each row's own image.
        generated: [n] token ids following every prompt (None: none).

    Returns:
        [len(prompts), vocab] float32.
    """
    from ..models.mrope import position_ids
    from ..models.processing import padded_inputs

    inputs = padded_inputs(lm, prompts, images)
    if generated is not None and generated.numel():
        ids = inputs["input_ids"]
        tail = generated.reshape(1, -1).to(ids).expand(ids.shape[0], -1)
        grown = {"input_ids": torch.cat([ids, tail], -1), "attention_mask": torch.cat(
            [inputs["attention_mask"], torch.ones_like(tail)], -1)}
        for key, value in inputs.items():  # per-token types (Gemma 3's, Qwen-VL's): a written token is text
            if key not in grown and torch.is_tensor(value) and value.shape == ids.shape:
                grown[key] = torch.cat([value, torch.zeros_like(tail).to(value)], -1)
        inputs = {**inputs, **grown}
        inputs["position_ids"] = position_ids(lm, inputs)
    with torch.no_grad():
        return lm.model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].float()


def _pixels_key(image) -> str:
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


class OracleDetector:
    """The embedded world's detector: every drawn object's exact box, found from the image's own pixels.

    ``scenes``: the scenes whose images it will be asked about (:func:`shipped_scenes` for the shipped POPE set);
    an image is recognised by its pixels (its rendering), so any copy of a shipped PNG is found. A word matches a
    class name, singular or with a plural ``s`` (as the released code strips one).
    """

    name = "oracle"  # in a run's identity (detector_name)

    def __init__(self, scenes):
        from ..embedded.world import DRAW_SIZE

        self.size = DRAW_SIZE
        self.scenes = {_pixels_key(scene.image()): scene for scene in scenes}

    def boxes(self, image, word: str) -> list[Box]:
        scene = self.scenes.get(_pixels_key(image))
        if scene is None:
            return []  # an image the world did not draw: nothing is known about it
        word = word.strip(".,'[]()").lower()
        names = {word, word[:-1]} if word.endswith("s") else {word}
        s = float(self.size)
        return [(max(0.0, (o.cx - o.size) / s), max(0.0, (o.cy - o.size) / s), min(1.0, (o.cx + o.size) / s),
                 min(1.0, (o.cy + o.size) / s)) for o in scene.objects if o.drawn and o.name in names]


def detector_name(detector: Detector | None) -> str:
    """A detector's name in a run's identity: ``oracle`` for the embedded world's (None: the shipped images' oracle);
    else its class's ``__qualname__``, with its ``name`` attribute where it has one (``GroundingDINO (swint-ogc, 0.45)``
    for a class ``GroundingDINO`` whose ``name`` is ``"swint-ogc, 0.45"``): give a detector a ``name`` that tells its
    settings apart (weights, threshold)."""
    if detector is None or type(detector) is OracleDetector:
        return OracleDetector.name
    name = getattr(detector, "name", None)
    qualname = type(detector).__qualname__
    return qualname if name in (None, "") else f"{qualname} ({name})"


def shipped_scenes(names: list[str]) -> list:
    """The scenes of the shipped POPE images ``names`` (``emb_000123.png``: scene 123 at the evaluation seed)."""
    from ..embedded.config import EVAL_SEED
    from ..embedded.world import sample_scene

    return [sample_scene(int(name.split("_")[1].split(".")[0]), EVAL_SEED) for name in names]


def shipped_oracle() -> OracleDetector:
    """The oracle of every shipped POPE image (the embedded world's evaluation scenes)."""
    from .. import shipped

    return OracleDetector(shipped_scenes(sorted(p.name for p in shipped.IMAGES.glob("emb_*.png"))))


SHIPPED_NAME = re.compile(r"emb_\d{6}\.png")
FIX = ("run on the shipped POPE (drop --pope-file/--image-dir), or pass your own detector from Python: "
       "HALC.from_preset('pope').with_detector(d)")


def oracle_for(paths: list) -> OracleDetector:
    """The oracle of the images at ``paths`` (before any model loads); a one-line UserError for an image it does not
    know: one that is not a shipped POPE image, pixel for pixel."""
    from ..data import load_image
    from ..errors import UserError
    from ..storage import show

    paths = list(dict.fromkeys(paths))
    strange = next((p for p in paths if not SHIPPED_NAME.fullmatch(p.name)), None)
    if strange is not None:
        raise UserError(f"--intervention halc: its oracle detector knows the embedded world's shipped images only, "
                        f"not {show(strange)}; {FIX}")
    oracle = OracleDetector(shipped_scenes([p.name for p in paths]))
    for p in paths:
        if _pixels_key(load_image(p, None)) not in oracle.scenes:
            raise UserError(f"--intervention halc: {show(p)} is not the shipped image of that name (its pixels "
                            f"differ), so the oracle detector knows no box in it; {FIX}")
    return oracle


QUESTION = re.compile(r"Is there an? (.+?) in the image\?", re.IGNORECASE)


def object_word(prompt: str) -> str | None:
    """The object a POPE question names (``Is there a/an WORD in the image?``), or None."""
    found = QUESTION.search(prompt)
    return found.group(1).strip() if found else None


class HALC(DecodingMethod, spec=SPECS["halc"]):
    """HALC's focal-view contrast as a first-token answer (see the module docstring); ``detector`` grounds the
    question's object (None: the oracle of the shipped POPE images)."""

    metrics = {"halc_grounding": "HALC: 1 the detector found the object, 0 not found (the fallback box's views), "
                                 "−1 the model's own scores (too many boxes, not found with missing=model, no "
                                 "object word or no image)",
               "halc_views": "HALC: focal views contrasted (0: none, the model's own scores)",
               "halc_final_view": "HALC: the chosen contrast's final view (0: the shrunk box, 1: the box, 2…: "
                                  "expansions)",
               "halc_base_view": "HALC: the chosen contrast's base view (its logits × w are subtracted)",
               "halc_box_area": "HALC: the grounded box's area (a share of the image)"}

    def __init__(self, knobs=None, detector: Detector | None = None):
        super().__init__(knobs)
        self.detector = detector
        self._sources: tuple[list, list] = ([], [])
        self._first = False

    def replace(self, **changes) -> "HALC":
        return type(self)(replace_knobs(self.knobs, **changes), self.detector)

    def with_detector(self, detector: Detector) -> "HALC":
        """The same HALC grounding words with ``detector`` (any object with ``boxes(image, word)``)."""
        return type(self)(self.knobs, detector)

    def auxiliary_forwards(self) -> int | None:
        return self.knobs.context_window  # one forward per view

    def components(self) -> dict[str, str]:
        """The detector grounding the words (:func:`detector_name`), where it is not the oracle: runs with different
        detectors differ, and the oracle's (which ``pope`` always installs) is the identity HALC runs had before
        detectors were named, so their folders resume."""
        name = detector_name(self.detector)
        return {} if name == OracleDetector.name else {"detector": name}

    def sources(self, prompts: list[str], images: list) -> None:
        self._sources, self._first = (list(prompts), list(images)), True

    # prepared before the baseline's forward (the default of Intervention): its crop forwards are whole prompts of
    # one row, which pope's records must never take for the baseline's
    prepare_batched = Intervention.prepare_batched

    def prepare(self, lm, inputs: dict, rows) -> None:
        """Each row's :class:`FocalStep` for its question's object, from forwards of its prompt on the crops: the
        batch's crops of one view are the rows of one left-padded forward (:func:`view_logits`), so a batch costs
        ``context_window`` forwards of at most its own size."""
        self._yes_no = (int(lm.tokens.yes_id), int(lm.tokens.no_id))
        self._aux, self._steps = {}, {}
        if self.detector is None:
            self.detector = shipped_oracle()
        # prepared again for each generated token (engine.decode): only the first token's answer is HALC's here, the
        # later ones are the model's own (HALC's generation loop is out of scope)
        prompts, images = self._sources if self._first else ([], [])
        self._first = False
        k = self.knobs
        grounded = {}  # row index → (status, the views' boxes)
        for row in rows:
            word = object_word(prompts[row.index]) if row.index < len(prompts) else None
            if word is None or row.index >= len(images):
                self._steps[row.index] = FocalStep("no-source")
                continue
            box, status = ground(self.detector, images[row.index], word, k.max_boxes)
            if box is None or (status == "not-detected" and k.missing == "model"):
                self._steps[row.index] = FocalStep(status)
                continue
            grounded[row.index] = (status, focal_boxes(box, k.context_window, k.expand_ratio))
        if not grounded:
            return
        order = list(grounded)
        views = torch.stack([view_logits(lm, [prompts[i] for i in order],
                                         [crop(images[i], grounded[i][1][v]) for i in order])
                             for v in range(k.context_window)], dim=1)  # [rows, views, vocab]
        for i, logits in zip(order, views):
            self._steps[i] = contrasted(*grounded[i], logits, k.k_candidates, k.weight)

    def readout(self, site) -> None:
        for row in site.rows:
            logits = site.logits[row.index]
            step = self._steps.get(row.index, FocalStep("no-source"))
            if step.logits is None:  # the model's own scores
                site.record(row, "halc_grounding", -1.0)
                site.record(row, "halc_views", 0.0)
                answer_from(site, row, logits, None, self._yes_no)
                continue
            final, base, _ = step.contrasts[0]
            views = step.logits.to(logits.device)
            scores = views[final] - site.dose_of(row) * self.knobs.weight * views[base]
            box = step.boxes[1]
            site.record(row, "halc_grounding", 1.0 if step.status == "detected" else 0.0)
            site.record(row, "halc_views", float(len(step.boxes)))
            site.record(row, "halc_final_view", float(final))
            site.record(row, "halc_base_view", float(base))
            site.record(row, "halc_box_area", (box[2] - box[0]) * (box[3] - box[1]))
            answer_from(site, row, scores, None, self._yes_no, views[base])

    def row_summary(self, per_layer: dict[int, dict[str, float]]) -> dict:
        own = per_layer.get(-1, {})
        return {k: own[k] for k in ("halc_grounding", "halc_views", "halc_final_view", "halc_base_view")
                if k in own}

    def idle_reason(self, records) -> str:
        return "the focal-view contrast gives the model's own answer (or no object was grounded)"
