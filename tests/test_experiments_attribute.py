"""Direct logit attribution, activation patching and attribution patching on real models
(mclcbf_diag.experiments.attribute).

References never go through the code under test: the model's own logits (the margin the DLA must
sum to), plain HF forwards with ``register_forward_pre_hook`` / ``register_forward_hook`` written
here (one forward per patch, the whole prompt, the activation replaced), and a planted model built
here in which one head alone copies a "Yes" feature from the image. Models: the shipped embedded
model, a tiny random LLaVA of the embedded shape and one with grouped-query attention.

Tolerances: the DLA sum against the model's margin is the issue's 1e-5 and, where smaller, the
margin's float32 floor (``floors.margin_floor``); a patched margin against a hooked full forward is
two routes to one logit difference (``floors.margin_floor``).
"""

from __future__ import annotations

import floors
import pandas as pd
import pytest
import torch
from PIL import Image

from mclcbf_diag.data import build_prompt
from mclcbf_diag.embedded.world import sample_scene
from mclcbf_diag.engine.runner import Keep, activations_forward, forward
from mclcbf_diag.errors import UserError
from mclcbf_diag.experiments.attribute import (
    Grid,
    activation_patching,
    agreement,
    attribution_patching,
    dla,
    dla_records,
    local_records,
    local_summary,
    localisation,
    paired_inputs,
)
from mclcbf_diag.interventions import resolve
from mclcbf_diag.interventions.base import Intervention
from mclcbf_diag.measurements import attribution as A
from mclcbf_diag.models import load_model
from mclcbf_diag.records import documented

QUESTION = "Is there a dog in the image?"


@pytest.fixture(scope="module", params=["embedded", "tiny", "tiny_gqa"])
def lm(request):
    if request.param == "tiny":
        return load_model(str(request.getfixturevalue("saved_tiny_dir")))
    if request.param == "embedded":
        return request.getfixturevalue("embedded_model")
    return request.getfixturevalue("tiny_gqa_model")


def _inputs(lm, image, question=QUESTION):
    return lm.inputs(build_prompt(question), image)


def _blank():
    return Image.new("RGB", (336, 336), (128, 128, 128))


def _margin_of(lm, logits):
    return float(logits[lm.tokens.yes_id] - logits[lm.tokens.no_id])


# ------------------------------------------------------------------------------------------- DLA
def _dla_bound(lm) -> float:
    return min(1e-5, floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id))


@pytest.mark.parametrize("which", ["baseline", "mclcbf", "pai"])
def test_dla_sums_to_the_models_own_margin(lm, which):
    iv = None
    if which == "mclcbf":  # a residual step large enough to matter (DESIGN §8: α 50; τ above a random model's h)
        iv = resolve("mclcbf", None, [f"layers=1:{lm.n_layers}", "span=detected", "alpha=50", "tau=0.999"])
    elif which == "pai":
        iv = resolve("pai", None, [])
    image = sample_scene(0, 0).image()
    inputs = _inputs(lm, image)
    att = dla(lm, forward(lm, inputs, iv, keep=Keep(components=True)).captures[0])
    # the margin of the run's own logits (the intervened forward's, when there is an intervention)
    assert abs(att.total - att.margin) <= _dla_bound(lm), (att.total, att.margin)
    if iv is None:
        with torch.no_grad():
            reference = _margin_of(lm, lm.model(**inputs).logits[0, -1].float())  # plain HF forward
        assert abs(att.margin - reference) <= floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)
    # each head's split by source sums to the head (z = Σ p v; the two routes' float32 floor)
    scale = float(att.heads.abs().max())
    split = sum(att.sources.values())
    assert torch.allclose(split, att.heads, rtol=0, atol=max(floors.margin_floor(lm, lm.tokens.yes_id,
                                                                                 lm.tokens.no_id), 1e-6 * scale))
    if which == "mclcbf":
        assert float(att.step.abs().sum()) > 0  # the intervention's own part is counted
    else:
        assert float(att.step.abs().sum()) == 0


def test_dla_heads_equal_a_hooked_forward(embedded_model):
    """Each head's contribution from its output before o_proj read by a plain hook, the final norm's
    scale and lm_head's rows read from the modules here."""
    lm = embedded_model
    inputs = _inputs(lm, sample_scene(3, 0).image())
    layers = lm.model.model.language_model.layers
    z, post = {}, {}
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: z.__setitem__(i, a[0][0, -1]))
             for i, layer in enumerate(layers)]
    hooks.append(layers[-1].register_forward_hook(lambda m, a, out: post.__setitem__("x", out[0, -1])))
    with torch.no_grad():
        lm.model(**inputs)
    for h in hooks:
        h.remove()
    x = post["x"]
    norm = lm.model.model.language_model.norm
    r = torch.sqrt(x.pow(2).mean() + norm.variance_epsilon)
    w = lm.model.lm_head.weight
    u = norm.weight * (w[lm.tokens.yes_id] - w[lm.tokens.no_id]) / r
    att = dla(lm, forward(lm, inputs, keep=Keep(components=True)).captures[0])
    H = lm.text_config.num_attention_heads
    for i, layer in enumerate(layers):
        ref = torch.stack([u @ layer.self_attn.o_proj.weight[:, h * 32:(h + 1) * 32] @ z[i][h * 32:(h + 1) * 32]
                           for h in range(H)]).detach()
        torch.testing.assert_close(att.heads[i], ref, atol=_dla_bound(lm), rtol=0)


def test_dla_records_are_tidy_and_documented(embedded_model):
    lm = embedded_model
    inputs = _inputs(lm, sample_scene(0, 0).image())
    base = dla(lm, forward(lm, inputs, keep=Keep(components=True)).captures[0])
    iv = resolve("mclcbf", None, ["span=detected", "alpha=50", "tau=0.9"])
    steered = dla(lm, forward(lm, inputs, iv, keep=Keep(components=True)).captures[0])
    rec = dla_records(steered, question_id="q", condition="steered", base=base)
    assert len({len(v) for v in rec.values()}) == 1
    assert all(documented(m) for m in set(rec["metric"]))
    d = {(layer, head): v for layer, head, m, v in zip(rec["layer"], rec["head"], rec["metric"], rec["value"])
         if m == "d_dla_head"}
    assert d[(5, 1)] == pytest.approx(float(steered.heads[5, 1] - base.heads[5, 1]))


# ------------------------------------------------------------------------------ activation patching
def _hooked_margin(lm, inputs, *, resid=None, head=None, mlp=None):
    """One plain forward of ``inputs`` with one activation replaced by a hook: ``resid = (layer, positions,
    values [n, d])``, ``head = (layer, h, positions, values [n, hd])``, ``mlp = (layer, positions, values)``."""
    layers = lm.model.model.language_model.layers
    hooks = []
    if resid is not None:
        L, pos, vals = resid

        def pre(m, args, kwargs):
            x = args[0].clone()
            x[0, pos] = vals
            return (x, *args[1:]), kwargs

        hooks.append(layers[L].register_forward_pre_hook(pre, with_kwargs=True))
    hooks += _component_hooks(layers, head, mlp)
    try:
        with torch.no_grad():
            return _margin_of(lm, lm.model(**inputs).logits[0, -1].float())
    finally:
        for h in hooks:
            h.remove()


def _component_hooks(layers, head=None, mlp=None, length=None) -> list:
    """Hooks that write ``values`` over a head's output (o_proj's input slice) or the MLP's output at ``positions``;
    with ``length``, only in a forward of that many positions (not in an intervention's own preparatory ones)."""
    hooks = []
    if head is not None:
        L, h, pos, vals = head
        hd = vals.shape[-1]

        def pre_o(m, args):
            if length is not None and args[0].shape[1] != length:
                return None
            z = args[0].clone()
            z[0, pos, h * hd:(h + 1) * hd] = vals
            return (z,)

        hooks.append(layers[L].self_attn.o_proj.register_forward_pre_hook(pre_o))
    if mlp is not None:
        L, pos, vals = mlp

        def post(m, args, out):
            if length is not None and out.shape[1] != length:
                return None
            out = out.clone()
            out[0, pos] = vals
            return out

        hooks.append(layers[L].mlp.register_forward_hook(post))
    return hooks


@pytest.fixture(scope="module")
def pair(embedded_model):
    lm = embedded_model
    scene = sample_scene(0, 0)
    assert "dog" in scene.visible
    return _inputs(lm, scene.image()), _inputs(lm, _blank())


@pytest.fixture(scope="module")
def grid(embedded_model, pair):
    return activation_patching(embedded_model, *pair)


def test_the_full_patch_recovers_one_and_no_patch_zero(embedded_model, grid):
    """The residual at every image token entering layer 0 is all the clean and corrupted inputs differ
    in (the text is the same): patching it recovers 1 (denoising) or 0 (noising); and the grid is
    normalised by its own unpatched rows. The patched row and the reference row have the same inputs,
    so they agree to rounding order (bit for bit on this machine)."""
    lm = embedded_model
    tol = floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id) / abs(grid.gap)
    assert abs(grid.gap) > 1  # the blank image flips the answer
    assert abs(float(grid.resid["denoise"][0, 0]) - 1) <= tol
    assert abs(float(grid.resid["noise"][0, 0])) <= tol
    # the text tokens entering layer 0 are the same in both inputs: patching them changes nothing
    for g in (1, 2):
        assert abs(float(grid.resid["denoise"][0, g])) <= tol
        assert abs(float(grid.resid["noise"][0, g]) - 1) <= tol
    # the decision token leaving the last layer... entering it, is everything the answer reads after the
    # last layer's own work; the unpatched margins are the plain forward's
    for ref, plain in zip((grid.clean, grid.corrupted), grid.plain):
        assert abs(ref - plain) <= floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)


def test_the_clean_input_on_both_sides_leaves_nothing_to_recover(embedded_model, pair):
    lm = embedded_model
    g = activation_patching(lm, pair[0], pair[0])
    floor = floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)
    for kind in ("resid", "heads", "mlp"):
        for d in ("denoise", "noise"):
            assert torch.isnan(getattr(g, kind)[d]).all()  # 0/0: no gap beyond rounding
            assert (g.margins[f"{kind}:{d}"] - g.clean).abs().max() <= floor


@pytest.mark.parametrize("L", [0, 3, 6])
def test_patched_margins_equal_hooked_full_forwards(embedded_model, pair, grid, L):
    lm = embedded_model
    clean, corrupted = pair
    both = paired_inputs(lm, clean, corrupted)
    acts = activations_forward(lm, both)
    ids = clean["input_ids"][0]
    pos = A.group_positions(ids == lm.tokens.image_token_id)
    T = len(ids)
    text = torch.arange(int(pos["image"].max()) + 1, T)
    floor = floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)
    for d, (dst, src) in (("denoise", (1, 0)), ("noise", (0, 1))):
        dest = (clean, corrupted)[dst]
        for j, g in enumerate(A.GROUPS):
            ref = _hooked_margin(lm, dest, resid=(L, pos[g], acts.resid[L][src, pos[g]]))
            assert abs(float(grid.margins[f"resid:{d}"][L, j]) - ref) <= floor, (d, g)
        for h in (0, 1, 3):
            z = acts.z[L][src, text].reshape(len(text), 4, -1)[:, h]
            ref = _hooked_margin(lm, dest, head=(L, h, text, z))
            assert abs(float(grid.margins[f"heads:{d}"][L, h]) - ref) <= floor, (d, h)
        ref = _hooked_margin(lm, dest, mlp=(L, text, acts.mlp[L][src, text]))
        assert abs(float(grid.margins[f"mlp:{d}"][L]) - ref) <= floor


@pytest.mark.parametrize("L", [0, 5])
def test_components_patched_at_the_decision_token_equal_hooked_full_forwards(embedded_model, pair, L):
    """components_at="decision": heads and MLPs patched at the decision token only (a batch of one position)."""
    lm = embedded_model
    clean, corrupted = pair
    grid = activation_patching(lm, clean, corrupted, components_at="decision")
    at = attribution_patching(lm, clean, corrupted, components_at="decision")
    acts = activations_forward(lm, paired_inputs(lm, clean, corrupted))
    T = clean["input_ids"].shape[1]
    last = torch.tensor([T - 1])
    floor = floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)
    for d, (dst, src) in (("denoise", (1, 0)), ("noise", (0, 1))):
        dest = (clean, corrupted)[dst]
        for h in range(4):
            z = acts.z[L][src, last].reshape(1, 4, -1)[:, h]
            ref = _hooked_margin(lm, dest, head=(L, h, last, z))
            assert abs(float(grid.margins[f"heads:{d}"][L, h]) - ref) <= floor, (d, h)
        ref = _hooked_margin(lm, dest, mlp=(L, last, acts.mlp[L][src, last]))
        assert abs(float(grid.margins[f"mlp:{d}"][L]) - ref) <= floor
    assert A.rank_of(grid.heads["denoise"], (5, 1)) == 1 and A.rank_of(at.heads["denoise"], (5, 1)) == 1
    with pytest.raises(ValueError, match="components_at"):
        activation_patching(lm, clean, corrupted, components_at="image")


def test_patching_refuses_two_prompts(embedded_model):
    lm = embedded_model
    a = _inputs(lm, _blank())
    b = _inputs(lm, _blank(), "Is there a car in the image?")
    with pytest.raises(UserError, match="same prompt"):
        activation_patching(lm, a, b)


def test_attribution_patching_agrees_with_activation_patching(embedded_model, pair, grid):
    """Gradient × difference ranks the patches as activation patching does (Spearman over every head, MLP
    and token group) except where the linearisation fails: a head whose patch moves the margin by more
    than the corrupted run's softmax can follow to first order (head 5.1 here)."""
    at = attribution_patching(embedded_model, *pair)
    for kind in ("heads", "mlp", "resid"):
        rho = A.spearman(at.__dict__[kind]["denoise"], grid.__dict__[kind]["denoise"])
        assert rho > 0.7, (kind, rho)
    # both rank head 5.1 first; its size is where the first order fails
    assert A.rank_of(at.heads["denoise"], (5, 1)) == 1 and A.rank_of(grid.heads["denoise"], (5, 1)) == 1
    assert float(at.heads["denoise"][5, 1]) < 0.5 < float(grid.heads["denoise"][5, 1])
    agree = agreement(at, grid)
    assert (5, 1) in agree["heads:denoise"]["failures"]
    assert agree["heads:denoise"]["spearman"] == A.spearman(at.heads["denoise"], grid.heads["denoise"])


# ---------------------------------------------------------------------------------- planted model
PLANTED_HEAD = (0, 2)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_processor):
    """A tiny random LLaVA in which head 0.2 alone copies a feature of the image into the Yes − No margin.

    The head attends uniformly (its queries are zero), so at the decision token its output is its value of
    the mean normalised input over every key. Its value reads a direction g chosen so that this mean is
    0 for the blank image and positive for the clean one (g: the clean − blank difference of the means,
    made orthogonal to the blank mean), and its o_proj slice writes that value along w_Yes − w_No, at
    three times the size of the clean residual there. Every other weight is the random initialisation.
    """
    from conftest import TINY_SIZES
    from transformers import LlavaForConditionalGeneration

    from mclcbf_diag.embedded.build import build_config

    config = build_config(tiny_processor.tokenizer, **TINY_SIZES)
    torch.manual_seed(3)
    model = LlavaForConditionalGeneration(config)
    out = tmp_path_factory.mktemp("planted")
    model.save_pretrained(out)
    tiny_processor.save_pretrained(out)
    lm = load_model(str(out))
    clean, corrupted = _inputs(lm, sample_scene(0, 0).image()), _inputs(lm, _blank())
    acts = activations_forward(lm, paired_inputs(lm, clean, corrupted))
    L, h = PLANTED_HEAD
    layer = lm.model.model.language_model.layers[L]
    with torch.no_grad():
        means = layer.input_layernorm(acts.resid[L]).mean(1)  # [2, d]: the uniform average over every key
    f = means[0] - means[1]
    blank = means[1] / means[1].norm()
    g = f - (f @ blank) * blank
    z_clean = float(g @ means[0])
    hd = lm.text_config.head_dim
    w = lm.model.lm_head.weight
    yes_no = (w[lm.tokens.yes_id] - w[lm.tokens.no_id]).detach()
    size = 3 * float(acts.resid[-1][0, -1].norm())
    with torch.no_grad():
        rows = slice(h * hd, (h + 1) * hd)
        layer.self_attn.q_proj.weight[rows] = 0
        layer.self_attn.v_proj.weight[rows] = 0
        layer.self_attn.v_proj.weight[h * hd] = g
        layer.self_attn.o_proj.weight[:, rows] = 0
        layer.self_attn.o_proj.weight[:, h * hd] = size * yes_no / yes_no.norm() / z_clean
    return lm, clean, corrupted


def test_a_planted_head_ranks_first_in_dla_and_both_patchings(planted):
    lm, clean, corrupted = planted
    a_clean, a_corr = (dla(lm, forward(lm, x, keep=Keep(components=True)).captures[0]) for x in (clean, corrupted))
    diff = torch.cat([(a_clean.heads - a_corr.heads).reshape(-1), a_clean.mlp - a_corr.mlp])
    H = lm.text_config.num_attention_heads
    first = PLANTED_HEAD[0] * H + PLANTED_HEAD[1]
    assert A.rank_of(diff, first) == 1
    assert float(a_clean.sources["image"][PLANTED_HEAD] - a_corr.sources["image"][PLANTED_HEAD]) == pytest.approx(
        float(diff[first]), rel=0.05)  # it reads the image (576 of its ~590 uniformly attended keys)
    grid = activation_patching(lm, clean, corrupted)
    assert abs(grid.gap) > 1
    at = attribution_patching(lm, clean, corrupted, directions=("denoise", "noise"))
    for g in (grid, at):
        den = torch.cat([g.heads["denoise"].reshape(-1), g.mlp["denoise"]])
        noi = torch.cat([g.heads["noise"].reshape(-1), g.mlp["noise"]]) - 1
        assert A.rank_of(den, first) == 1 and A.rank_of(noi, first) == 1



# ------------------------------------------------------------------------------------ localisation
class AddAtDecision(Intervention):
    """Adds ``vector`` to the residual entering ``layer`` at the decision token."""

    name = "test-add-at-decision"
    sites = frozenset({"residual"})

    def __init__(self, layer: int, vector: torch.Tensor):
        super().__init__()
        self.layer, self.vector = layer, vector

    def layers(self, n_layers):
        return (self.layer,)

    def first_edited(self, row):
        return row.decision

    def residual(self, site):
        for row in site.rows:
            site.add(row, [site.current(row)], self.vector[None], after_norm=False)


def test_localisation_finds_the_layer_and_token_of_a_residual_edit(embedded_model):
    """A vector added at the decision token entering layer 3: patching the intervened residual into the
    baseline recovers all of the change at the decision token from layer 3 on (it carries the edit and
    nothing after it is edited), none before, and none at the image or question tokens; each patched
    margin equals a plain forward with the same activation put in by a hook."""
    lm = embedded_model
    inputs = _inputs(lm, sample_scene(0, 0).image())
    w = lm.model.lm_head.weight
    vec = -20.0 * (w[lm.tokens.yes_id] - w[lm.tokens.no_id]).detach()  # toward No
    iv = AddAtDecision(3, vec)
    grid = localisation(lm, inputs, iv)
    with torch.no_grad():
        base = _margin_of(lm, lm.model(**inputs).logits[0, -1].float())
    floor = floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)
    assert abs(grid.corrupted - base) <= floor and grid.clean < base - 1  # the edit moves the margin
    tol = floor / abs(grid.gap)
    rec, back = grid.resid["denoise"], grid.resid["noise"]
    assert set(grid.resid) == {"denoise", "noise"}
    for L in range(lm.n_layers):
        # the patched residual is what the layer used: the edit is in it from layer 3 on, both ways
        assert abs(float(rec[L, 2]) - (1.0 if L >= 3 else 0.0)) <= tol, (L, rec[L])
        assert abs(float(back[L, 2]) - (0.0 if L >= 3 else 1.0)) <= tol, (L, back[L])
        assert abs(float(rec[L, 0])) <= tol and abs(float(rec[L, 1])) <= tol
        assert abs(float(back[L, 0]) - 1) <= tol and abs(float(back[L, 1]) - 1) <= tol
    # the summary: the change enters the decision token's residual at layer 3, from both sides
    found = local_summary(grid)
    assert found.measurable and found.gap == grid.gap
    assert {(e.site, e.layer, e.direction) for e in found.enters} == {("resid_decision", 3, "denoise"),
                                                                      ("resid_decision", 3, "noise")}
    assert all(abs(e.share - 1) <= tol for e in found.enters)
    # heads and MLPs before the edit carry none of it
    assert grid.heads["denoise"][:3].abs().max() <= tol and grid.mlp["denoise"][:3].abs().max() <= tol
    # the intervened activation of head 5.1 put into a plain baseline forward by a hook
    acts = activations_forward(lm, inputs, intervention=iv)
    T = inputs["input_ids"].shape[1]
    text = torch.arange(T - 14, T)
    assert not (inputs["input_ids"][0, text] == lm.tokens.image_token_id).any()
    z = acts.z[5][0, text].reshape(len(text), 4, -1)[:, 1]
    ref = _hooked_margin(lm, inputs, head=(5, 1, text, z))
    assert abs(float(grid.margins["heads:denoise"][5, 1]) - ref) <= floor


class AddEverywhere(AddAtDecision):
    """Adds ``vector`` to the residual entering ``layer`` at every position (the image tokens too)."""

    name = "test-add-everywhere"

    def first_edited(self, row):
        return None  # every position, from the first

    def residual(self, site):
        for row in site.rows:
            pos = site.positions(row)
            site.add(row, pos, self.vector[None].expand(len(pos), -1), after_norm=False)


class RestoreResidual(Intervention):
    """The reference for a restored residual: ``inner`` as it is, and at ``layer``, after ``inner``'s own edit
    of the residual there, ``values`` written over the residual at ``positions`` (through the seam, no hook)."""

    name = "test-restore-residual"

    def __init__(self, inner: Intervention, layer: int, positions: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.inner, self.layer, self.pos, self.values = inner, layer, positions, values

    def layers(self, n_layers):
        self._inner_layers = set(self.inner.layers(n_layers))
        return tuple(sorted(self._inner_layers | {self.layer}))

    def open_sites(self, steer):
        return self.inner.open_sites(steer) | {"residual"}

    def prepare(self, lm, inputs, rows):
        self.inner.prepare(lm, inputs, rows)

    def begin(self, rows, n_layers):
        self.inner.begin(rows, n_layers)

    def _inner(self, kind, site):
        if site.layer in self._inner_layers and kind in self.inner.open_sites(True):
            getattr(self.inner, kind)(site)

    def residual(self, site):
        self._inner("residual", site)
        if site.layer == self.layer:
            for row in site.rows:
                site.tensor[row.index, site.query_index(row, self.pos)] = self.values.to(site.tensor)

    def attention(self, site):
        self._inner("attention", site)

    def pattern(self, site):
        self._inner("pattern", site)


def _intervened_margin(lm, inputs, iv, *, head=None, mlp=None):
    """One intervened forward of the whole prompt (the runner's own ``forward``), a head's or the MLP's output
    replaced by a hook as in :func:`_hooked_margin`. The hooks act on the prompt's own forward only, not on
    the forwards an intervention runs to prepare (VISTA's prompt without its image)."""
    layers = lm.model.model.language_model.layers
    hooks = _component_hooks(layers, head, mlp, length=inputs["input_ids"].shape[1])
    try:
        return _margin_of(lm, forward(lm, inputs, iv).captures[0].steps[0].final_logits)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("which", ["add-everywhere", "pai", "vista"])
def test_both_directions_of_the_localisation_equal_one_forward_per_patch(lm, which, request):
    """Every patch of both directions against one forward of the whole prompt per patch, written here: the
    intervened activation put into a plain baseline forward by a hook (denoising), and the baseline's
    activation restored in the runner's intervened forward (noising: heads and MLPs by a hook, the residual
    through the seam right after the intervention's own edit). On the embedded model and a tiny random one
    (with grouped-query attention), a residual edit at every position (the image tokens' residual has to be
    recomputed from the restored layer on), PAI (the decision token's attention, in every layer from 1) and
    VISTA (a steering vector the intervention prepares from the prompt, added at every position and layer)."""
    if lm is not request.getfixturevalue("embedded_model") and which != "add-everywhere":
        pytest.skip("PAI and VISTA on the embedded model only (the random models have the residual edit)")
    inputs = _inputs(lm, sample_scene(0, 0).image())
    w = lm.model.lm_head.weight
    if which == "pai":
        iv = resolve("pai", "attention-only", ["layers=1:4", "alpha=2"])  # its activation edit: what is localised
    elif which == "vista":  # a steering vector prepared from the prompt, every position, every layer
        iv = resolve("vista", "strong", ["layers=2:5", "logits_alpha=0"])
    else:
        iv = AddEverywhere(1, -8.0 * (w[lm.tokens.yes_id] - w[lm.tokens.no_id]).detach())
    grid = localisation(lm, inputs, iv)
    floor = floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)
    assert abs(grid.gap) > 100 * floor  # the intervention moves the margin
    base = activations_forward(lm, inputs, attention="eager")
    ivacts = activations_forward(lm, inputs, intervention=iv)
    ids = inputs["input_ids"][0]
    T, H = len(ids), lm.text_config.num_attention_heads
    pos = A.group_positions(ids == lm.tokens.image_token_id)
    start = int(pos["image"].max()) + 1
    pos["image"] = torch.arange(0, start)  # the residual before the text: the image and the text before it
    text = torch.arange(start, T)
    for L in (2, lm.n_layers - 1) if which != "vista" else (3,):  # after the edits begin, and the last layer
        for j, g in enumerate(A.GROUPS):
            p = pos[g]
            ref = _hooked_margin(lm, inputs, resid=(L, p, ivacts.resid[L][0, p]))
            assert abs(float(grid.margins["resid:denoise"][L, j]) - ref) <= floor, (L, g)
            restored = RestoreResidual(iv, L, p, base.resid[L][0, p])
            ref = _margin_of(lm, forward(lm, inputs, restored).captures[0].steps[0].final_logits)
            assert abs(float(grid.margins["resid:noise"][L, j]) - ref) <= floor, (L, g)
        for h in range(H):
            cols = slice(h * lm.text_config.head_dim, (h + 1) * lm.text_config.head_dim)
            ref = _intervened_margin(lm, inputs, iv, head=(L, h, text, base.z[L][0, text, cols]))
            assert abs(float(grid.margins["heads:noise"][L, h]) - ref) <= floor, (L, h)
        ref = _intervened_margin(lm, inputs, iv, mlp=(L, text, base.mlp[L][0, text]))
        assert abs(float(grid.margins["mlp:noise"][L]) - ref) <= floor, L
    # restoring the baseline's embeddings in front of a later edit changes nothing
    assert abs(float(grid.resid["noise"][0].min()) - 1) * abs(grid.gap) <= floor


def test_the_local_summary_sorts_effects_by_sign_against_a_hand_worked_grid():
    """Baseline margin 1, intervened 3 (gap +2), floor 0.01 (threshold 0.02). Denoising: head 0.1 put into the
    baseline gives 2.5 (+1.5: it makes the change), head 1.0 gives 0.2 (−0.8: it works against it), head 1.1
    1.015 (+0.015: rounding); the MLPs 1 and 1.5. Noising: restoring head 0.1 leaves 1.2 (it carried +1.8),
    restoring the MLP of layer 1 leaves 3.4 (−0.4: it cancelled part)."""
    nan = float("nan")
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    grid = Grid(3.0, 1.0, 0.01, margins={
        "resid:denoise": t([[1.0, 1.0, 1.0], [1.0, 1.0, 2.9]]), "heads:denoise": t([[1.0, 2.5], [0.2, 1.015]]),
        "mlp:denoise": t([1.0, 1.5]), "resid:noise": t([[3.0, 3.0, 3.0], [3.0, 3.0, 1.05]]),
        "heads:noise": t([[3.0, 1.2], [3.0, nan]]), "mlp:noise": t([3.0, 3.4])})
    for key, m in grid.margins.items():
        kind, d = key.split(":")
        getattr(grid, kind)[d] = A.recovery(m, grid.corrupted, grid.clean, grid.floor)
    s = local_summary(grid)
    assert s.gap == 2.0 and s.threshold == 0.02 and s.measurable
    assert [(e.site, e.layer, e.head, e.direction, round(e.effect, 6)) for e in s.arises] == [
        ("head", 0, 1, "noise", 1.8), ("head", 0, 1, "denoise", 1.5), ("mlp", 1, -1, "denoise", 0.5)]
    assert [(e.site, e.layer, e.head, e.direction, round(e.effect, 6)) for e in s.cancels] == [
        ("head", 1, 0, "denoise", -0.8), ("mlp", 1, -1, "noise", -0.4)]
    assert [(e.site, e.layer, e.direction, round(e.share, 6)) for e in s.enters] == [
        ("resid_decision", 1, "denoise", 0.95), ("resid_decision", 1, "noise", 0.975)]
    assert s.cancelled("noise") == pytest.approx(0.4 / 1.8) and s.cancelled("denoise") == pytest.approx(0.8 / 1.5)
    assert [(e.layer, e.direction, round(e.effect, 6)) for e in s.decision] == [
        (0, "denoise", 0.0), (1, "denoise", 1.9), (0, "noise", 0.0), (1, "noise", 1.95)]
    assert s.peak("noise").layer == 1 and s.peak("denoise").effect == pytest.approx(1.9)
    # a gap within the threshold: nothing to localise
    small = Grid(1.015, 1.0, 0.01, margins=grid.margins)
    assert not local_summary(small).measurable and local_summary(small).arises == ()
    # the records: both directions, each metric documented
    rec = local_records(grid, question_id="q")
    assert {m.split("_")[0] for m in rec["metric"]} == {"local", "restore"} and set(rec["condition"]) == {"steered"}
    assert all(documented(m) for m in rec["metric"])


def test_carriers_and_their_counts_follow_the_documented_rule():
    """Hand-worked: a Yes of margin 2, share 0.1 (0.2 logits), floor 0.01. Direct contributions 0.5 (carries),
    0.15 (under the share), −1 (toward No); patching with a gap of 1: recoveries 0.3 (carries), 0.05 (under the
    share), NaN (no number: not a carrier); a gap within twice the floor: patching names nothing (NaN)."""
    from mclcbf_diag.experiments.attribute import carrier_counts, carriers, patch_carriers

    direct = torch.tensor([0.5, 0.15, -1.0], dtype=torch.float64)
    assert carriers(direct, 2.0, 0.1, 0.01).tolist() == [True, False, False]
    assert carriers(torch.tensor([0.005]), 0.01, 0.1, 0.01).tolist() == [False]  # a share, but under the floor
    rec = torch.tensor([0.3, 0.05, float("nan")], dtype=torch.float64)
    assert patch_carriers(rec, 1.0, 0.1, 0.01).tolist() == [1.0, 0.0, 0.0]
    assert torch.isnan(patch_carriers(rec, 0.015, 0.1, 0.01)).all()
    assert torch.isnan(patch_carriers(rec, -1.0, 0.1, 0.01)).all()  # the image lowers the Yes
    # two questions on a model of 1 layer, 2 heads: head 0.1 carries both by DLA, one by patching too
    rows = []
    for q, (dla_flags, patch_flags, mlp) in {"a": ([0, 1], [0, 1], 1), "b": ([0, 1], [float("nan")] * 2, 0)}.items():
        for h in range(2):
            rows += [(q, 0, h, "carries_dla_head", dla_flags[h]), (q, 0, h, "carries_patch_head", patch_flags[h])]
        rows += [(q, 0, -1, "carries_dla_mlp", mlp), (q, 0, -1, "carries_patch_mlp", 0)]
    records = pd.DataFrame(rows, columns=["question_id", "layer", "head", "metric", "value"])
    counts = carrier_counts(records, 1, 2, adhh_heads=((0, 1),)).set_index(["component", "layer", "head"])
    assert counts.loc[("head", 0, 1), ["n_dla", "n_patch", "n_either", "n_both"]].tolist() == [2, 1, 2, 1]
    assert counts.loc[("head", 0, 0), ["n_dla", "n_patch", "n_either", "n_both"]].tolist() == [0, 0, 0, 0]
    assert counts.loc[("mlp", 0, -1), ["n_dla", "n_either"]].tolist() == [1, 1]
    assert bool(counts.loc[("head", 0, 1), "adhh_head"]) and not bool(counts.loc[("mlp", 0, -1), "adhh_head"])
    assert (counts.n_wrong_yes == 2).all()


def test_localise_returns_the_records_of_both_directions_and_their_summary(saved_tiny_dir):
    """The call a verdict makes: tidy records (local_* and restore_*, condition steered, documented) and the
    LocalSummary of the same grids, on a tiny random model with a vector added at the decision token."""
    from mclcbf_diag.experiments.attribute import localise

    lm = load_model(str(saved_tiny_dir))
    inputs = _inputs(lm, sample_scene(0, 0).image())
    w = lm.model.lm_head.weight
    iv = AddAtDecision(2, -5.0 * (w[lm.tokens.yes_id] - w[lm.tokens.no_id]).detach())
    records, summary = localise(lm, inputs, iv, question_id="q7")
    grid = localisation(lm, inputs, iv)
    assert summary == local_summary(grid) and summary.measurable
    assert set(records.question_id) == {"q7"} and set(records.condition) == {"steered"}
    assert {m.split("_")[0] for m in records.metric} == {"local", "restore"}
    assert all(documented(m) for m in records.metric.unique())
    back = records[records.metric == "restore_resid_decision_margin"].set_index("layer").value
    assert torch.allclose(torch.tensor(back.sort_index().to_numpy()), grid.margins["resid:noise"][:, 2])
    assert {(e.site, e.layer) for e in summary.enters} == {("resid_decision", 2)}
