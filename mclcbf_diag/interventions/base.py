"""The seam: what an intervention is, and the sites a runner offers it.

An intervention is a small object with one interface (:class:`Intervention`). It holds its
settings as a frozen dataclass of knobs (:mod:`mclcbf_diag.knobs` parses ``--set`` for any
of them), names the layers it acts on, and fills in whichever site hooks it needs. The
runner (:mod:`mclcbf_diag.engine.runner`) walks the decoder layers in forward order and, at each
layer the intervention targets, calls

* :meth:`Intervention.residual` with the residual stream entering the layer (``x``, edit
  it through :meth:`Site.add`, in place, before the layer runs; :meth:`Site.keys` gives the
  layer's keys for a look-ahead, from the live residual, the cached prefix or the KV cache);
* :meth:`Intervention.attention` with the layer's softmax probabilities (edit the rows of
  chosen queries in place; :meth:`Site.key_mask` and :meth:`Site.query_index` translate a
  row's own positions into the padded batch);
* :meth:`Intervention.pattern` with the layer's attention pattern as the model used it
  (read only; measuring runs only);

and, after the forward, :meth:`Intervention.readout` with the decision position's logits
(the ``logits`` site, :class:`Readout`): a decoding-level method replaces the scores the
answer is read from, combining the model's logits with auxiliary forwards of the same
question (computed in :meth:`Intervention.prepare`, see :mod:`.views`; where the runner can, as
rows of the question's own batched forward or continuations of its cache instead:
:meth:`Intervention.aux_features`, :meth:`Intervention.prepare_batched`) and with earlier
layers' readouts (:meth:`Readout.layer_logits`, for the layers :meth:`Intervention.readout_layers`
names). One intervention may use both kinds of site (PAI edits attention, then contrasts). What it
prepares for a question is keyed by :meth:`Intervention.view_key` (the knobs its auxiliary forwards read),
so a runner of many units of one question prepares it once (:meth:`Intervention.prepared_views`,
:meth:`Intervention.use_views`). A generation loop continues those auxiliary forwards that are plain forwards of
other inputs by KV caches of their own (:meth:`Intervention.decode_views`, :class:`View`) and hands their outputs
at each step to :meth:`Intervention.use_decode_views` instead of preparing again; an intervention prepared from the
prompt alone (:meth:`Intervention.prepares_from_prompt`: VISTA's steering vector) is prepared once and its
intervened forward continues its own cache.

Every site is batched: ``site.rows`` lists the prompts of the batch, each in its own
unpadded coordinates (:class:`Row`), so one implementation serves a single sample (a batch
of one) and a POPE batch alike. A run without steering (the baseline) calls the same hooks
with ``site.steer = False``: the intervention may measure (and :meth:`Site.record` what it
measured, e.g. its own h "before"), never edit. The runner owns what every intervention
shares: the decision token's residuals, attention masses, logit lens and, for whatever an
intervention adds through :meth:`Site.add`, the step's size against ‖x‖, how much of it
survives rounding into the model's dtype, and the Jacobian gains along it.

An intervention also brings its records' glossary (:attr:`Intervention.metrics`), its
diagnosis rules (:meth:`Intervention.rules`) and its counterfactual fixes
(:meth:`Intervention.fixes`: named knob changes that undo one suspected cause each).
"""

from __future__ import annotations

import contextvars
import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import knobs as K
from ..diagnosis.rulebook import fired_by_step
from ..errors import UserError
from ..models.projection import LayerWeights


@dataclass(frozen=True)
class NoKnobs:
    """Settings of an intervention that has none."""


# --------------------------------------------------------------------------- rows
@dataclass(frozen=True, eq=False)
class Row:
    """One prompt of a batch in its own coordinates: position 0 is its first real token."""

    index: int  # row in the batch
    pad: int  # left padding in the batch
    ids: torch.Tensor  # [length] its input ids (CPU)
    image: torch.Tensor  # bool [length]: image tokens detected from the ids

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])

    @property
    def decision(self) -> int:
        """The last prompt token, whose next-token logits give the answer."""
        return self.length - 1

    @property
    def last_image(self) -> int:
        return int(torch.nonzero(self.image).max())

    def after_image(self) -> torch.Tensor:
        """Positions of every text token after the image (the decision token included)."""
        pos = torch.arange(self.last_image + 1, self.length)
        return pos if pos.numel() else torch.tensor([self.decision])


def rows_of(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int) -> list[Row]:
    """The rows of a left-padded batch; a UserError if a prompt holds no image token."""
    pads = (attention_mask == 0).sum(-1).tolist()
    ids, real = input_ids.cpu(), attention_mask.cpu().bool()
    image = ids == image_token_id  # the whole batch at once: a population batch holds ~1000 rows
    missing = (~(image & real).any(-1)).tolist()
    rows = []
    for b, p in enumerate(pads):
        if missing[b]:
            raise UserError(f"no image token (id {image_token_id}) in the prompt; every prompt must contain "
                            "<image> (e.g. 'USER: <image>\\n{question}\\nASSISTANT:')")
        rows.append(Row(b, int(p), ids[b, p:], image[b, p:]))
    return rows


# --------------------------------------------------------------------------- sites
class Site:
    """One place in one forward where an intervention may act (see the module docstring).

    ``tensor`` is the live value: the residual ``[B, S, d]`` (kind ``"residual"``) or the
    softmax probabilities ``[B, H, S, K]`` (``"attention"``, ``"pattern"``). Its S query
    positions are the padded positions ``start … start+S−1``; in the decode phase (one new
    token per forward, ``decode_step`` k ≥ 1) S = 1 and ``start`` is the number of cached positions.
    """

    def __init__(self, run, kind: str, layer: int, tensor: torch.Tensor):
        self._run, self.kind, self.layer, self.tensor = run, kind, layer, tensor
        self.phase, self.decode_step, self.rows = run.phase, run.decode_step, run.rows
        self.steer, self.dose, self.start = run.steer, run.dose, run.start
        self.doses: dict[int, float] | None = None  # per-row doses (see Intervention.row_doses)

    # -- coordinates -----------------------------------------------------------------
    @property
    def seq(self) -> int:
        return self.tensor.shape[-2]  # [B, S, d] residual or [B, H, S, K] probabilities: S either way

    def positions(self, row: Row) -> torch.Tensor:
        """The row's own positions present in ``tensor`` (pad positions excluded)."""
        lo = max(self.start, row.pad)
        return torch.arange(lo, self.start + self.seq) - row.pad

    def current(self, row: Row) -> int:
        """The row's last position in this forward: the decision token, or the new token."""
        return self.start + self.seq - 1 - row.pad

    def query_index(self, row: Row, positions) -> torch.Tensor:
        """Indices into ``tensor``'s query axis of the row's own ``positions``."""
        return torch.as_tensor(positions, dtype=torch.long) + row.pad - self.start

    def key_mask(self, row: Row, mask: torch.Tensor) -> torch.Tensor:
        """A bool mask over the row's own positions → over ``tensor``'s key axis."""
        n_keys = self.tensor.shape[-1]
        out = torch.zeros(n_keys, dtype=torch.bool, device=self.tensor.device)
        m = mask.to(self.tensor.device).reshape(-1)[: n_keys - row.pad]
        out[row.pad: row.pad + m.numel()] = m
        return out

    def dose_of(self, row: Row) -> float:
        """The dose of ``row``: its own where the runner gave the rows theirs, else :attr:`dose`."""
        return self.dose if self.doses is None else self.doses[row.index]

    # -- what a look-ahead needs (residual sites) ------------------------------------
    @property
    def weights(self) -> LayerWeights:
        return self._run.layer_weights(self.layer)

    def rotary(self, row: Row, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE ``(cos, sin)`` [n, hd] at the row's own ``positions`` (present in ``tensor``)."""
        cos, sin = self._run.rotary
        idx = self.query_index(row, positions).to(cos.device)
        return cos[row.index, idx].to(self.tensor.device), sin[row.index, idx].to(self.tensor.device)

    def keys(self, row: Row) -> torch.Tensor:
        """The layer's keys [KV, n, hd] for the row's own positions ``0 … n−1``.

        Prefill: keys of any cached prefix, then keys projected from the live residual (as
        the layer will compute them). Decode: the KV cache before the new token (what the
        attention's cache holds when the layer starts), then the new token's own key, projected
        from the live residual.
        """
        return self._run.keys(self, row)

    # -- acting and recording ----------------------------------------------------------
    def add(self, row: Row, positions, vector: torch.Tensor, *, after_norm: bool = False) -> None:
        """Add ``vector`` [n, d] to the residual at the row's own ``positions``.

        ``after_norm=True`` adds it to the layer's normalised input instead (the input norm's
        output), still before attention. The runner measures the step (see the module
        docstring). Only in steering runs.
        """
        if not self.steer:
            raise RuntimeError("a measuring (baseline) run must not edit the model")  # programming error
        self._run.add(self, row, torch.as_tensor(positions, dtype=torch.long), vector, after_norm)

    def set_rows(self, row: Row, positions, probs: torch.Tensor) -> None:
        """Replace the softmax rows of the row's queries at ``positions`` (attention sites)."""
        if not self.steer:
            raise RuntimeError("a measuring (baseline) run must not edit the model")  # programming error
        self.tensor[row.index][:, self.query_index(row, positions)] = probs.to(self.tensor.dtype)

    def record(self, row: Row, metric: str, value) -> None:
        """A scalar record of the row at this layer (the metric must be in the glossary)."""
        self._run.record(row, self.layer, metric, value)

    def record_heads(self, row: Row, metric: str, values: torch.Tensor) -> None:
        """A per-head record [H] of the row at this layer."""
        self._run.record_heads(row, self.layer, metric, values)

    def recorded(self, row: Row, metric: str):
        """A value recorded earlier in this forward at this layer (None if none)."""
        return self._run.recorded(row, self.layer, metric)


class Readout:
    """The ``logits`` site: the decision position's next-token scores of a batch, after its forward.

    ``logits`` [B, vocab] float32 are the model's final logits in this forward (any activation
    edit included); ``scores`` start as a copy and are what the answer is read from: a
    decoding-level method replaces a row's with :meth:`set` (−inf: a token it rules out). Rows,
    ``steer`` and the doses are the run's, as at a :class:`Site`.
    """

    kind = "logits"
    layer = -1

    def __init__(self, run, logits: torch.Tensor, layer_outputs: dict):
        self._run, self.rows, self.steer, self.dose = run, run.rows, run.steer, run.dose
        self.phase, self.decode_step, self.n_layers = run.phase, run.decode_step, run.lm.n_layers
        self.doses: dict[int, float] | None = None
        self.logits = logits.detach().float()
        self.scores = self.logits.clone()
        self._outputs = layer_outputs

    def dose_of(self, row: Row) -> float:
        return self.dose if self.doses is None else self.doses[row.index]

    def layer_logits(self, layer: int, *, final_norm: bool) -> torch.Tensor:
        """[B, vocab] float32: the residual leaving decoder ``layer`` at the decision position (−1: the embeddings)
        through the unembedding, after the final norm with ``final_norm`` (the logit lens) or without it (as DoLa's
        and VISTA's released code read early layers); only layers :meth:`Intervention.readout_layers` named."""
        return self._run.layer_logits(self._outputs, layer, final_norm)

    def set(self, row: Row, scores: torch.Tensor) -> None:
        """The row's scores [vocab] the answer is read from."""
        if not self.steer:
            raise RuntimeError("a measuring (baseline) run must not edit the model")  # programming error
        self.scores[row.index] = scores.to(self.scores)

    def record(self, row: Row, metric: str, value) -> None:
        """A whole-model scalar record of the row (layer −1); the metric must be in the glossary."""
        self._run.record(row, -1, metric, value)


@dataclass(frozen=True)
class Batched:
    """What a runner computed for an intervention's preparation in the batch's own forwards
    (:meth:`Intervention.prepare_batched`), instead of the separate forwards :meth:`Intervention.prepare` runs.

    ``aux_logits`` [len(rows), vocab] float32: the last-position logits of the auxiliary rows of
    :meth:`Intervention.aux_features`, computed as rows of the same batched forward as the main rows (None: not
    batched); ``cache``: the KV cache of the main rows' plain forward over their whole prompts (None: none kept);
    ``logits`` [B, vocab]: that forward's last-position logits, a row's at ``row.index`` of the whole batch;
    ``states`` [B, layers, d] float32: the residual entering each decoder layer at the last position in that forward,
    indexed the same way (None: not kept).
    """

    aux_logits: torch.Tensor | None = None
    cache: object = None
    logits: torch.Tensor | None = None
    states: torch.Tensor | None = None


@dataclass(frozen=True)
class View:
    """An auxiliary forward that a generation loop may continue by a KV cache of its own
    (:meth:`Intervention.decode_views`): a plain forward of other model inputs of the same rows, whose next
    position, at each generated token, is that token (the view's prompt forward once, then one position per step).

    ``inputs``: the model inputs of the rows' view of the prompt (left-padded, row b for ``rows[b]``); ``states``:
    also keep the residual entering each decoder layer at the last position (:attr:`ViewOutput.states`); ``probed``:
    the view is the question with an image (the same image tokens), which ``trace`` measures as it measures the
    baseline (condition ``view:NAME``, :meth:`Intervention.views`).
    """

    inputs: dict
    states: bool = False
    probed: bool = False


@dataclass(frozen=True)
class ViewOutput:
    """What one step's forward of a :class:`View` gives the intervention (:meth:`Intervention.use_decode_views`):
    ``logits`` [B, vocab] float32 at the last position, and with ``View.states`` ``states`` [B, layers, d] float32,
    the residual entering each decoder layer there (else None)."""

    logits: torch.Tensor
    states: torch.Tensor | None = None


# --------------------------------------------------------------------------- the seam
class Intervention:
    """Base class: fill in what your intervention does; every default does nothing.

    Class attributes: ``name`` (the CLI's ``--intervention``), ``Knobs`` (a frozen dataclass),
    ``presets`` (name → knobs; the first is the default), ``aliases`` (short knob names that
    set several fields), ``metrics`` (glossary of the records it adds), ``sites`` (the hooks
    the runner must open; ``"residual"``, ``"attention"``, ``"pattern"``, ``"logits"``), and for the listing
    (``mclcbf-diag interventions``) ``summary`` (one line; default: the docstring's first line)
    and ``paper``. A built-in takes ``name``, ``Knobs``, ``presets``, ``aliases``, ``summary``
    and ``paper`` from its torch-free :class:`~mclcbf_diag.interventions.catalog.Spec`:
    ``class PAI(Intervention, spec=SPECS["pai"])``.
    """

    name: ClassVar[str] = "none"
    Knobs: ClassVar[type] = NoKnobs
    presets: ClassVar[dict] = {"default": NoKnobs()}
    aliases: ClassVar[dict[str, tuple[str, ...]]] = {}
    metrics: ClassVar[dict[str, str]] = {}
    sites: ClassVar[frozenset[str]] = frozenset()
    # True: one site may hold rows of different doses (each read with Site.dose_of), so a batch
    # of doses (a dose-response) is one call per site instead of one per dose
    row_doses: ClassVar[bool] = False
    # True: ``prepare`` reads the prompt's pixels (an auxiliary view distorts the image); batched runs that continue
    # a shared prefix hand them over only then (copying every row's pixels costs as much as a forward)
    reads_pixels: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    # causes whose evidence is where along the depth the change is made and cancelled: for these, explain
    # localises the intervention by patching (mclcbf_diag.experiments.attribute.localise) and cites it
    localised_causes: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, spec=None, **kwargs):
        super().__init_subclass__(**kwargs)
        if spec is not None:
            cls.name, cls.Knobs, cls.presets, cls.aliases = spec.name, spec.Knobs, spec.presets, spec.aliases
            cls.summary, cls.paper = spec.summary, spec.paper

    def __init__(self, knobs=None):
        self.knobs = next(iter(self.presets.values())) if knobs is None else knobs
        if not isinstance(self.knobs, self.Knobs):
            raise TypeError(f"{type(self).__name__} takes {self.Knobs.__name__}, not {type(self.knobs).__name__}")

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset: str | None = None, overrides=()) -> "Intervention":
        """The named preset (default: the first) with ``knob=value`` overrides applied."""
        name = preset or next(iter(cls.presets))
        if name not in cls.presets:
            raise UserError(f"unknown preset {name!r} for {cls.name}; valid presets: {', '.join(cls.presets)}")
        return cls(K.apply_overrides(cls.presets[name], list(overrides), cls.aliases))

    def replace(self, **changes) -> "Intervention":
        """The same intervention with some knobs changed."""
        return type(self)(dataclasses.replace(self.knobs, **changes))

    def describe(self) -> dict:
        """What identifies this intervention in a run's configuration."""
        return {"intervention": self.name, "knobs": K.to_dict(self.knobs)}

    def components(self) -> dict[str, str]:
        """Parts besides the knobs that change its answers (a grounding detector, say), by name → a description, for
        a run's identity (``run.json``, built by ``cli.pope.run_identity``: two runs with different parts are never
        resumed into one folder). {} (the default): none, and the identity names the knobs alone, as it always has."""
        return {}

    def model_type_problem(self, model_type: str | None) -> str | None:
        """Why it cannot run on a model whose config.json names ``model_type``, with what to use instead; None: it
        can, as far as config.json tells. The default: a method whose view is built from each image's pixel tensor
        (:attr:`reads_pixels`) cannot run on a family whose processor gives none
        (:attr:`~mclcbf_diag.models.families.Family.flat_pixels`). The command line refuses with it before the
        model loads."""
        from ..models.families import FAMILIES, family_of

        family = family_of(model_type) if self.reads_pixels else None
        if family is None or not family.flat_pixels:
            return None
        fits = ", ".join(f.name for f in FAMILIES if not f.flat_pixels)
        return (f"it builds its view from each image's pixel tensor, but {family.name} gives {family.flat_pixels}; "
                f"use a model of another family ({fits}) or an intervention that builds no image view from the pixels")

    # -- where it acts ------------------------------------------------------------------
    def layers(self, n_layers: int) -> tuple[int, ...]:
        """The decoder layers whose sites are opened (validated against ``n_layers``)."""
        return ()

    def open_sites(self, steer: bool) -> frozenset[str]:
        """The hooks the runner opens in a steering (``steer``) or a measuring run."""
        return self.sites

    def first_edited(self, row: Row) -> int | None:
        """The row's earliest own position this intervention may change (None: unknown).

        Positions before it are identical with and without the intervention, so a batched
        run may continue from the baseline's cached prefix there.
        """
        return None

    def auxiliary_forwards(self) -> int | None:
        """How many forwards besides the question's own a decoding-level method runs for its answer, for the cost
        bound ``(1 + this) × a bare forward, plus 10%`` (``benchmarks/intervention_throughput.py``). Auxiliary rows
        of the question's own forward count as one forward, and so does a continuation of its cached prefix; reading
        earlier layers of the run itself counts none. None: not a decoding-level method (no bound)."""
        return None

    def readout_layers(self, n_layers: int) -> tuple[int, ...]:
        """Layers whose output the ``logits`` site reads through the final norm (−1: the embeddings)."""
        return ()

    def activation_part(self) -> "Intervention | None":
        """The intervention without its decoding-level half (what patching can localise), or None when it
        changes no activation at all; itself when it has no such half."""
        return self

    def steers_decode(self) -> bool:
        """Whether generated tokens (the decode phase) are steered too."""
        return True

    # -- the hooks (see the module docstring) ----------------------------------------------
    def prepare(self, lm, inputs: dict, rows: list[Row]) -> None:
        """Called once per run before the trace, with the model: room for auxiliary forwards.

        An intervention whose edit depends on other runs of the model (a steering vector from
        the prompt with and without its image, say) computes it here, with plain forwards of
        ``lm.model`` under ``torch.no_grad()``. ``inputs`` are the run's model inputs.
        """

    def sources(self, prompts: list[str], images: list) -> None:
        """Called before :meth:`prepare` with the batch's prompts and decoded images (PIL), row b's at ``[b]``, for a
        method whose auxiliary views are built from the image itself (HALC's crops); the default ignores them."""

    def aux_features(self, lm, inputs: dict, rows: list[Row]):
        """Image features of an auxiliary view that differs from the question in its image features only (the same
        tokens, positions and mask), per row of ``rows`` as the family's merge step takes them (a list, or Gemma 3's
        stacked tensor); a runner may then run that view as extra rows of the main rows' own batched forward and
        hand their logits to :meth:`prepare_batched`. None: no such view (the default)."""
        return None

    def prepare_batched(self, lm, inputs: dict, rows: list[Row], batched: Batched) -> None:
        """:meth:`prepare`, given what the runner already computed in the batch's own forwards (:class:`Batched`);
        the default ignores it and runs :meth:`prepare`."""
        self.prepare(lm, inputs, rows)

    def view_key(self):
        """What this intervention prepares for a question (:meth:`prepare`: its auxiliary views' logits, a steering
        vector …) depends on besides the question, as a hashable key; None (the default): not shared.

        Two interventions with equal keys prepare the same for the same question, so a runner of many units of one
        question (explain's :mod:`~mclcbf_diag.engine.units`: the traced run, the dose-response, the counterfactuals)
        prepares each (question, key) once and hands it to every unit (:meth:`prepared_views`, :meth:`use_views`)
        instead of running :meth:`prepare` for each batch of units. The key holds every knob the preparation reads
        (VCD's noise step and seed, say) and the class; a dose, which only scales the combination, never enters it.
        :func:`knob_key` builds one from the knobs."""
        return None

    def prepared_views(self, rows: list[Row]) -> list:
        """After :meth:`prepare` or :meth:`prepare_batched` of ``rows``: what it computed for each, in order, for
        :meth:`use_views` to restore (only with a :meth:`view_key`)."""
        raise NotImplementedError(f"{type(self).__name__} has a view_key but no prepared_views")  # programming error

    def use_views(self, lm, rows: list[Row], views: list) -> None:
        """Prepared for ``rows`` from ``views`` (one per row: what :meth:`prepared_views` gave for the same
        questions under the same :meth:`view_key`) instead of running :meth:`prepare`."""
        raise NotImplementedError(f"{type(self).__name__} has a view_key but no use_views")  # programming error

    def decode_views(self, lm, inputs: dict, rows: list[Row]) -> dict[str, View] | None:
        """The auxiliary forwards :meth:`prepare` runs, as views a generation loop continues by their own KV caches
        (:mod:`mclcbf_diag.engine.decode`): name → :class:`View` of the prompt's ``rows``, each a plain forward of
        other inputs whose later positions are the generated tokens. ``{}``: it runs none; None (the default): they
        cannot be continued (an edit inside the model, a view that changes with the generated text, a preparation
        that is more than the views' outputs), and the loop runs :meth:`prepare` on the whole sequence at every
        step."""
        return None

    def prepares_from_prompt(self) -> bool:
        """Whether, under generation, what :meth:`prepare` computes is the prompt's alone and kept for every generated
        step, and the edit of each position reads only that position and it (VISTA's steering vector: built once from
        the prompt and added at every position, as its released code does under ``generate(use_cache=True)``).

        A position's edited residuals then never change as the sequence grows, so a generation loop
        (:mod:`mclcbf_diag.engine.decode`) prepares on the prompt only, runs no auxiliary view after it, and
        continues the intervened forward's own KV cache one position per step: what re-running the whole sequence
        under the same preparation gives. False (the default): the loop prepares for each step's sequence."""
        return False

    def use_decode_views(self, lm, rows: list[Row], outputs: dict) -> None:
        """Prepared for the sequence ``rows`` hold from ``outputs`` (name → :class:`ViewOutput` of each view of
        :meth:`decode_views` at the sequence's last position) instead of running :meth:`prepare`; only for an
        intervention whose :meth:`decode_views` is not None."""
        raise NotImplementedError(f"{type(self).__name__} has decode_views, no use_decode_views")  # programming error

    def views(self, lm, inputs: dict, rows: list[Row]) -> dict:
        """The auxiliary forwards a decoding-level method contrasts with, by name → their model inputs (each with
        the image tokens' ``input_ids``), for ``trace`` to record them as conditions ``view:NAME``; {}: none."""
        return {}

    def begin(self, rows: list[Row], n_layers: int) -> None:
        """Called once per run before the first forward, with the batch's rows."""

    def bind(self, settings: dict) -> None:
        """Per-row settings for a batch whose rows differ (row index → setting), before :meth:`begin`.

        An intervention that takes one (the graded sweep's edit, say) keeps them; the others ignore them.
        """

    def residual(self, site: Site) -> None:
        """Act on (or measure) the residual entering ``site.layer``."""

    def attention(self, site: Site) -> None:
        """Act on (or measure) the softmax probabilities of ``site.layer``."""

    def pattern(self, site: Site) -> None:
        """Read the attention pattern the model used at ``site.layer`` (measuring runs)."""

    def readout(self, site: Readout) -> None:
        """Replace (or, measuring, only record) the scores the answer is read from (the ``logits`` site)."""

    # -- what it brings to a diagnosis -------------------------------------------------------
    def fixes(self) -> dict[str, dict]:
        """Named counterfactual fixes: ``{name: {knob: corrected value}}``."""
        return {}

    def cause_fix(self, cause_id: str) -> str | None:
        """The fix (a key of :meth:`fixes`) that undoes a diagnosed cause (None: none does)."""
        return None

    def fix_applies(self, name: str, model_dtype) -> str | None:
        """Why fix ``name`` cannot change anything on a model of ``model_dtype`` (None: it can)."""
        return None

    def rules(self) -> list:
        """Diagnosis rules specific to this intervention (:class:`mclcbf_diag.diagnosis.rulebook.Rule`)."""
        return []

    def layer_sets(self, evidence) -> tuple[list[int], list[int], list[int]]:
        """(steered, active, fired) layers of a diagnosis, from its records (see the rulebook)."""
        return fired_by_step(evidence)

    def no_step_explained_by(self) -> tuple[str, ...]:
        """Rule ids whose detection explains why no step was applied (not_applied yields to them)."""
        return ()

    def trace_summary(self, steered, baseline) -> dict:
        """Its own figures of a traced question for the summary, from the intervened and the measuring
        baseline run's records at prefill (frames: layer × metric, head −1)."""
        return {}

    def decode_summary(self, baselines: dict) -> dict:
        """Its own figures of the generated tokens for the summary, from the measuring baseline run's records at
        each decode step (``{decode_step: frame}``, frames as in :meth:`trace_summary`); empty without
        ``--generate``."""
        return {}

    def summary_lines(self, summary: dict) -> list[str]:
        """Lines ``trace`` and ``explain`` print under the outcome, from :meth:`trace_summary`'s fields."""
        return []

    def headline(self, summary: dict, records) -> list[str]:
        """Sentences for a page's outcome section, from :meth:`trace_summary`'s fields and the records."""
        return []

    def summary_rows(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """Rows the page's summary table adds: ``(name, key)`` pairs shown before and after (``key`` with
        ``{}`` for before/after), and single values."""
        return [], []

    def figures(self, records, *, phase: str, decode_step: int, question_id, steered) -> dict:
        """Figures of its own for the trace page (slug → plotly figure or ``NoFigure``), from the records."""
        return {}

    def idle_reason(self, records) -> str:
        """Why the intervened run equals the baseline, in words (the records show nothing changed)."""
        return "the intervention changed nothing at the decision token in any layer"

    def dose_fields(self, layer_metrics: list[dict], k: float) -> dict:
        """Its own figures of a run at dose ``k`` for the dose-response curve, from the run's records per
        layer (``{metric: value}``); e.g. the step's size."""
        return {}

    def dose_detail(self, at: dict) -> str:
        """The run at the dose-response's k* in words (``at``: that point of the curve)."""
        return f"margin {at['margin']:+.3g}"

    def row_records(self, row: Row) -> dict[str, float]:
        """Whole-model records of a row (layer −1), e.g. how a configured span fits the image."""
        return {}

    def row_summary(self, per_layer: dict[int, dict[str, float]]) -> dict:
        """A few numbers per question for batched runs, from the row's records per layer."""
        return {}


def knob_key(iv: Intervention, leave_out: tuple[str, ...] = ()):
    """A :meth:`Intervention.view_key` of ``iv``'s class and knobs, but those named in ``leave_out`` (knobs only its
    combination reads); None where a knob's value cannot be a key (unhashable)."""
    key = (type(iv), tuple((f.name, getattr(iv.knobs, f.name)) for f in dataclasses.fields(iv.knobs)
                           if f.name not in leave_out))
    try:
        hash(key)
    except TypeError:
        return None
    return key


class AttentionEditBase(Intervention):
    """An intervention that only edits attention rows, in ``knobs.layers`` (None: every layer).

    A measuring run opens no site (there is nothing to measure before an edit).
    """

    sites = frozenset({"attention"})

    def layers(self, n_layers: int) -> tuple[int, ...]:
        if self.knobs.layers is None:
            return tuple(range(n_layers))
        return tuple(layer for layer in self.knobs.layers if 0 <= layer < n_layers)

    def open_sites(self, steer: bool) -> frozenset[str]:
        return self.sites if steer else frozenset()


# --------------------------------------------------------------------------- auxiliary forwards
_AUXILIARY = contextvars.ContextVar("mclcbf_diag_auxiliary_forward", default=False)


@contextmanager
def auxiliary_forward():
    """Marks the model forwards run inside as a method's auxiliary ones (a counterfactual forward, a view's), so that
    an observer of the question's own forwards skips them: ``pope``'s records take the baseline's image masses and
    time from the baseline forward, not from a counterfactual of the same length run after it."""
    token = _AUXILIARY.set(True)
    try:
        yield
    finally:
        _AUXILIARY.reset(token)


def in_auxiliary_forward() -> bool:
    """Whether the forward running now is an auxiliary one (:func:`auxiliary_forward`)."""
    return _AUXILIARY.get()
