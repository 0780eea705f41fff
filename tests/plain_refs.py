"""What the plain-PyTorch references share: a never-wrapped model copy, three questions about three images, the
records every decoding-level method writes, a family's plain forward with the checks of trace and the overlay
against it, and VCD as its released code computes it, with the check of its batched POPE path against that."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mclcbf_diag import shipped
from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image

DECODING = ("decoding_model_margin", "decoding_aux_margin", "decoding_contrast_margin", "decoding_cut_yes",
            "decoding_cut_no")

_PLAIN = {}


def run_folder_with_one_answer(folder, identity: dict, split: str = "adversarial"):
    """A run folder as ``pope`` leaves it after one answer: ``run.json`` holding ``identity`` and one answers row
    stamped with its run_id (what a resume claims)."""
    import json

    from mclcbf_diag.pope.store import ANSWERS, run_id

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps(identity))
    row = {"split": split, "question_id": 1, "index": 0, "label": "yes", "baseline_answer": "yes",
           "steered_answer": "yes", "baseline_margin": 1.0, "steered_margin": 1.0, "flipped": False,
           "run_id": run_id(identity)}
    (folder / ANSWERS).write_text(json.dumps(row) + "\n")
    return folder


def plain_model(lm):
    """A fresh copy of the model from its checkpoint (its own transformers class), never wrapped by nnsight (plain
    PyTorch)."""
    if lm.source not in _PLAIN:
        _PLAIN[lm.source] = type(lm.model).from_pretrained(
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


def plain_forward(lm, prompt: str, image):
    """A plain transformers forward of one prompt with the processor's own inputs: ``(inputs, outputs, every
    decoder layer's output by index)``, attentions and hidden states included (the families' reference)."""
    inputs = lm.inputs(prompt, image)
    layer_out: dict[int, torch.Tensor] = {}

    def keep(i):
        return lambda module, args, out: layer_out.__setitem__(i, (out[0] if isinstance(out, tuple) else out).detach())

    hooks = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(lm.adapter.decoder_layers(lm.model))]
    try:
        with torch.no_grad():
            out = lm.model(**inputs, output_attentions=True, output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs, out, layer_out


def yes_no_margin(lm, logits) -> float:
    """Logit Yes − No of one position's logits."""
    return float(logits[lm.tokens.yes_id] - logits[lm.tokens.no_id])


def assert_trace_equals_plain(lm, result, inputs, out, layer_out, tol: float) -> float:
    """``trace``'s baseline records against :func:`plain_forward`'s at every layer: the decision token's image mass
    (mean over heads) and the look-ahead h, the residual norms entering and leaving the layer, then the last layer's
    logit lens and the final margin, and no look-ahead miss reported. Returns the plain Yes − No margin."""
    r = result.records
    base = r[(r.condition == "baseline") & (r["head"] == -1) & (r.phase == "prefill")]
    per = {m: dict(zip(g.layer, g.value)) for m, g in base.groupby("metric")}
    image = inputs["input_ids"][0] == lm.tokens.image_token_id
    margin = yes_no_margin(lm, out.logits[0, -1])
    for i in range(lm.n_layers):
        want = float(out.attentions[i][0, :, -1, image].sum(-1).mean())
        assert per["attn_image_mass"][i] == pytest.approx(want, rel=0, abs=tol)
        assert per["barrier_h"][i] == pytest.approx(want, rel=0, abs=tol)
        assert per["resid_pre_norm"][i] == pytest.approx(float(out.hidden_states[i][0, -1].norm()), rel=tol)
        assert per["resid_post_norm"][i] == pytest.approx(float(layer_out[i][0, -1].norm()), rel=tol)
    assert per["logit_lens_margin"][lm.n_layers - 1] == pytest.approx(margin, rel=0, abs=tol)
    assert result.value("final_margin", "baseline") == pytest.approx(margin, rel=0, abs=tol)
    assert "lookahead_miss_layers" not in result.summary()
    return margin


def assert_overlay_equals_plain(lm, result, inputs, out, config, map_layer: int, token_layer: int) -> None:
    """The overlay's maps against :func:`plain_forward`'s attentions on the image grid: the decision token's at
    ``map_layer``, and another query token's (two after the image) at ``token_layer`` from the runs the overlay adds."""
    from mclcbf_diag.report.overlay import attention_maps, token_attention_maps

    image = inputs["input_ids"][0] == lm.tokens.image_token_id
    rows, cols = lm.image_grid(inputs)
    maps = attention_maps(result.baseline, lm.grid_mask(result.baseline.detected), shape=(rows, cols))
    want = out.attentions[map_layer][0, :, -1].mean(0)[image].reshape(rows, cols)
    np.testing.assert_allclose(maps[f"layer {map_layer}"], want.numpy(), rtol=0, atol=1e-6)
    q = int(torch.nonzero(image)[-1]) + 2
    got = token_attention_maps(lm, inputs, config, [q], shape=(rows, cols))[q]["baseline"][f"layer {token_layer}"]
    np.testing.assert_allclose(got, out.attentions[token_layer][0, :, q].mean(0)[image].reshape(rows, cols).numpy(),
                               rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- VCD, as its released code does it
def add_diffusion_noise(image_tensor, noise_step, noise):
    """``vcd_add_noise.py``'s ``add_diffusion_noise``, line for line; ``noise`` stands for its ``randn_like``."""
    num_steps = 1000
    betas = torch.linspace(-6, 6, num_steps)
    betas = torch.sigmoid(betas) * (0.5e-2 - 1e-5) + 1e-5
    alphas = 1 - betas
    alphas_prod = torch.cumprod(alphas, dim=0)
    alphas_bar_sqrt = torch.sqrt(alphas_prod)
    one_minus_alphas_bar_sqrt = torch.sqrt(1 - alphas_prod)

    def q_x(x_0, t):
        alphas_t = alphas_bar_sqrt[t]
        alphas_1_m_t = one_minus_alphas_bar_sqrt[t]
        return alphas_t * x_0 + alphas_1_m_t * noise

    return q_x(image_tensor.clone(), noise_step)


def seeded_noise(image, seed):
    """ε of one image's pixel tensor ([C, H, W], or [tiles, C, H, W]) as the package draws it: a generator of its own
    seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(image.shape, generator=g, dtype=torch.float32)


def positions_run(lm, run) -> list[tuple[int, int]]:
    """Decoder layer 0's attention calls during ``run()``: [rows, positions] each."""
    attention = lm.adapter.layer_part(lm.model, 0, "layer_attention")
    calls = []

    def count(module, args, kwargs):
        calls.append(tuple((args[0] if args else kwargs["hidden_states"]).shape[:2]))

    hook = attention.register_forward_pre_hook(count, with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return calls


def vista_steering(model, lm, vs: list[torch.Tensor], lam: float, similarity: bool = True):
    """Forward pre-hooks on every decoder layer of the plain ``model``: ``x' = ‖x‖·normalize(x̂ + λ·s·v̂)``,
    ``s = 1 + max(0, cos(x, −v))`` (1 without ``similarity``), at every position (released VISTA's ``VSVLayer``);
    the handles."""

    def hook_for(v):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if v.norm() == 0:
                return None
            xf = x.float()
            s = 1 + torch.clamp(F.cosine_similarity(xf, -v[None, None], dim=-1), min=0)[..., None] if similarity else 1
            new = xf.norm(dim=-1, keepdim=True) * F.normalize(F.normalize(xf, dim=-1) + lam * s * v / v.norm(), dim=-1)
            new = new.to(x.dtype)
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
        return hook

    layers = model.model.language_model.layers
    return [layers[i].register_forward_pre_hook(hook_for(vs[i]), with_kwargs=True) for i in range(lm.n_layers)]


def noised(pixels, step=500, seed=0):
    """Each image of ``pixels`` [B, …] noised as the package noises it: :func:`add_diffusion_noise` at ``step`` with
    :func:`seeded_noise` of ``seed``."""
    return torch.stack([add_diffusion_noise(x, step, seeded_noise(x, seed)) for x in pixels])


def four_questions():
    """Four prompts of four lengths about four images, and the images; the first ("Is there a dog?" about the
    adversarial split's first image) goes on past its answer when generated."""
    qs = load_pope(shipped.pope_file("adversarial"))
    picked = [qs[0], qs[20], qs[26], qs[32]]
    texts = ["Is there a dog?", picked[1].text, picked[2].text.replace(" in the image", ""),
             picked[3].text.replace("?", " in the picture?")]
    return [build_prompt(t) for t in texts], [load_image(resolve_image(q, shipped.IMAGES)) for q in picked]


def vcd_reference(lm, prompt, image, *, alpha=1.0, beta=0.2, noise_step=500, seed=0):
    """(scores [vocab] with −inf where cut, z, z_cd) of one question, as VCD's released code computes them
    (``vcd_sample.py``: (1 + α)·z − α·z_cd, −inf where ``z < log β + max z``) on :func:`plain_model`, with the
    processor's own inputs of the question alone; each image's whole pixel tensor (every tile of it) noised."""
    model = plain_model(lm)
    inputs = lm.inputs(prompt, image)
    pixels = inputs["pixel_values"]
    noised = torch.stack([add_diffusion_noise(x, noise_step, seeded_noise(x, seed)) for x in pixels])
    with torch.no_grad():
        z = model(**inputs, logits_to_keep=1).logits[0, -1]
        z_cd = model(**{**inputs, "pixel_values": noised}, logits_to_keep=1).logits[0, -1]
    cutoff = torch.log(torch.tensor(beta)) + z.max(dim=-1, keepdim=True).values  # β = 0: −inf, nothing cut
    diffs = (1 + alpha) * z - alpha * z_cd
    return diffs.masked_fill(z < cutoff, -float("inf")), z, z_cd


def assert_vcd_pope_path_equals_plain(lm, prompts, images, **knobs) -> None:
    """VCD's batched POPE path against :func:`vcd_reference` of each question alone, on a family's model.

    The batch shares its image features, so the noised view runs as auxiliary rows stacked under the batch's rows
    (:func:`~mclcbf_diag.interventions.views.with_aux_rows`): those rows' logits are each question's noised forward
    z_cd and the main rows' its z; the runner's steered scores, its ``decoding_*`` records and ``answer_pair``'s
    margins (the intervened run continuing the baseline's cache) are the released construction's. Two routes (a
    batch, each prompt alone): logits within :func:`~floors.logit_floor`, margins within
    :func:`~floors.margin_floor`, the contrast's ((1 + α)·z − α·z_cd) within (1 + 2α) times them."""
    from floors import logit_floor, margin_floor

    from mclcbf_diag.engine.batch import answer_pair, batch_inputs
    from mclcbf_diag.engine.runner import Keep, forward
    from mclcbf_diag.interventions.base import rows_of
    from mclcbf_diag.interventions.vcd import VCD, VCDKnobs
    from mclcbf_diag.interventions.views import last_logits, with_aux_rows

    iv, n = VCD(VCDKnobs(**knobs)), len(prompts)
    yes, no, alpha = lm.tokens.yes_id, lm.tokens.no_id, iv.knobs.alpha
    lf, mf = logit_floor(lm), margin_floor(lm, yes, no)
    inputs = batch_inputs(lm, prompts, images)
    rows = rows_of(inputs["input_ids"], inputs["attention_mask"], lm.tokens.image_token_id)
    features = iv.aux_features(lm, inputs, rows)
    assert features is not None, "the noised view should run as auxiliary rows of the batch's forward"
    both = last_logits(lm, with_aux_rows(inputs, features))
    records = forward(lm, inputs, iv, keep=Keep(layers=False))
    _, steered = answer_pair(lm, prompts, images, iv, inputs=inputs)
    for b in range(n):
        ref, z, z_cd = vcd_reference(lm, prompts[b], images[b], **knobs)
        assert float((z - z_cd).abs().max()) > 100 * lf  # the noised view is another forward
        torch.testing.assert_close(both[b], z, rtol=0, atol=lf)
        torch.testing.assert_close(both[n + b], z_cd, rtol=0, atol=lf)
        assert_scores(records.logits[b], ref, atol=(1 + 2 * alpha) * lf)
        rec = records.records[b][-1]
        m, m_cd = float(z[yes] - z[no]), float(z_cd[yes] - z_cd[no])
        assert rec["decoding_model_margin"] == pytest.approx(m, rel=0, abs=mf)
        assert rec["decoding_aux_margin"] == pytest.approx(m_cd, rel=0, abs=mf)
        assert rec["decoding_contrast_margin"] == pytest.approx((1 + alpha) * m - alpha * m_cd, rel=0,
                                                                abs=(1 + 2 * alpha) * mf)
        assert (rec["decoding_cut_yes"], rec["decoding_cut_no"]) == (float(bool(torch.isinf(ref[yes]))),
                                                                     float(bool(torch.isinf(ref[no]))))
        want = float(ref[yes] - ref[no])
        if math.isfinite(want):
            assert steered[b]["margin"] == pytest.approx(want, rel=0, abs=(1 + 2 * alpha) * mf)
        else:
            assert steered[b]["margin"] == want or (math.isnan(want) and math.isnan(steered[b]["margin"]))
