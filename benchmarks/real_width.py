"""Real-width CPU check: a family's published widths (LLaVA-1.5-7B's by default), a few layers, random weights.

    python benchmarks/real_width.py [--family llava] [--text-layers 2] [--vision-layers 2]
                                    [--dtypes float32,bfloat16] [--questions 4] [--threads 2] [--reduced]
                                    [--save DIR]

``--family`` is one of the families whose published configuration is kept as data
(``mclcbf_diag/models/*.json``, :data:`mclcbf_diag.models.real_width.PUBLISHED_FILES`): llava
(llava-hf/llava-1.5-7b-hf), llava_next (llava-v1.6-mistral-7b-hf), llava_onevision
(llava-onevision-qwen2-7b-ov-hf), internvl (InternVL3-1B-hf), gemma3 (gemma-3-4b-it), qwen2_5_vl
(Qwen2.5-VL-7B-Instruct) and qwen3_vl (Qwen3-VL-8B-Instruct); anything else is refused in one line
before a model is built. Each family's
tower runs at its published widths too, with ``--vision-layers`` layers, and its prompt is the
family's own image-token layout (a stand-in processor at the published tile size, pinpoints or pixel
budget around the embedded tokenizer, whose ids stand in for the published ones).

What it does, per dtype, through the code paths users run (the model is saved with
``save_pretrained`` and loaded with :func:`mclcbf_diag.models.load_model`):

1. ``trace`` of one POPE question (the barrier with the detected span, so it fires), and a
   plain-transformers reference forward of the same inputs (``output_hidden_states``,
   ``output_attentions``): the largest difference of the decision token's residual norms,
   per-head image attention masses and the final Yes − No margin, and of the barrier's look-ahead h
   and the measured mass at each layer it keeps;
2. how much of θ* survives rounding into x: the records' ``rounding_survival`` and the
   fraction of θ*'s nonzero entries that change x at all, and what the rounding rule says;
3. ``explain`` with reduced experiments (no graded sweep, k ≤ 2), and the batched POPE path for every registered
   intervention (its default preset) on ``--questions`` questions;
4. time per decoder layer and per vision layer (forward hooks on a bare forward), peak
   memory, and the extrapolation to the published depth (32 language and 24 vision layers for
   the 7B); the predicted GPU memory of trace, explain and pope at batch 1, 8 and 32 in bf16,
   with what grows with vocabulary × sequence or heads × sequence².

A command a family refuses (an intervention it cannot run, say VCD's distorted image on Qwen-VL's
flattened patches) is printed with its one-line reason instead of a time.

For llava the prompt is llava-hf's layout (BOS, four prefix tokens, 576 image tokens at positions
5–580), from the embedded model's tokenizer and 336-px CLIP processor, whose image and pad
ids stand in for 32000/32001 inside the full 32064-row vocabulary. ``--reduced`` shrinks
every width (the test suite runs that); the figures are meaningful only without it.

``--save DIR`` only builds the model and saves it into DIR, for another benchmark's ``--model``: the cost of each
method against a bare forward at these widths is ``intervention_throughput.py --model DIR``.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from mclcbf_diag import barrier as B
from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image
from mclcbf_diag.diagnosis.diagnose import diagnose
from mclcbf_diag.engine.batch import answer_pair, batch_inputs
from mclcbf_diag.errors import UserError
from mclcbf_diag.experiments.explain import explain_sample
from mclcbf_diag.experiments.trace import trace_sample
from mclcbf_diag.interventions import MCLCBF, REGISTRY
from mclcbf_diag.memory import reuse_freed_memory
from mclcbf_diag.models import load_model
from mclcbf_diag.models.real_width import (
    PUBLISHED_FILES,
    build_random_model,
    check_family,
    family_config,
    family_parameter_count,
    llava15_7b_config,
    published,
    reduced_widths,
    save_stand_in,
    stand_in_processor,
    stand_in_token_ids,
    stand_in_vocabulary,
)

POPE = Path(__file__).resolve().parents[1] / "mclcbf_diag" / "embedded" / "pope"
REDUCED = {"text": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
                    "vocab_size": 1024},
           "vision": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # Linux: KiB


def reference(lm, inputs):
    """Plain transformers: hidden states, attention rows and logits of the decision token."""
    with torch.no_grad():
        out = lm.model(**inputs, output_hidden_states=True, output_attentions=True, logits_to_keep=1)
    image = inputs["input_ids"][0] == lm.tokens.image_token_id
    # hidden_states[i] enters layer i (the last entry is after the final norm: not compared)
    norms = [float(h[0, -1].float().norm()) for h in out.hidden_states[:-1]]
    masses = [a[0, :, -1][:, image].float().sum(-1) for a in out.attentions]
    margin = float(out.logits[0, -1, lm.tokens.yes_id] - out.logits[0, -1, lm.tokens.no_id])
    return norms, masses, margin


def compare(result, ref) -> dict:
    norms, masses, margin = ref
    r = result.records
    base = r[(r.condition == "baseline") & (r.phase == "prefill")]
    rn = base[(base.metric == "resid_pre_norm") & (base["head"] == -1)].sort_values("layer").value.tolist()
    d_norm = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(rn, norms))
    heads = base[(base.metric == "attn_image_mass") & (base["head"] >= 0)]
    d_mass = max(abs(float(heads[(heads.layer == i) & (heads["head"] == h)].value.iloc[0]) - float(m[h]))
                 for i, m in enumerate(masses) for h in range(len(m)))
    d_margin = abs(result.summary()["margin_before"] - margin)
    kept = base[(base.metric == "barrier_h") & (base["head"] == -1)]
    d_h = max((abs(float(h) - float(masses[int(i)].mean())) for i, h in zip(kept.layer, kept.value)), default=math.nan)
    return {"resid_norm_rel": d_norm, "image_mass_abs": d_mass, "margin_abs": d_margin, "lookahead_h_abs": d_h,
            "kept_layers": len(kept)}


def theta_entries_surviving(result) -> float:
    """Fraction of θ*'s nonzero entries that change x at all once added in the model dtype."""
    kept = total = 0
    for cap in result.steered.steps[0].layers.values():
        if cap.added is None:
            continue
        x = cap.resid_pre_in
        v = cap.added.to(torch.float32)
        new = (x.to(torch.float32) + v).to(x.dtype)
        nz = v != 0
        kept += int((new != x)[nz].sum())
        total += int(nz.sum())
    return kept / total if total else math.nan


def layer_times(lm, inputs) -> tuple[float, float]:
    """Mean seconds per decoder layer and per vision layer in one bare forward (hooks)."""
    stamps: dict[str, list[float]] = {"text": [], "vision": []}
    handles = []
    tower = lm.model.get_submodule(lm.adapter.vision_tower)
    # the tower's layer list: its longest ModuleList (CLIP's and SigLIP's encoder.layers, InternViT's encoder.layer,
    # Qwen-VL's blocks)
    vision = max((m for m in tower.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    groups = {"text": lm.adapter.decoder_layers(lm.model), "vision": vision}
    for kind, layers in groups.items():
        for layer in layers:
            start = {}
            handles.append(layer.register_forward_pre_hook(lambda m, a, s=start: s.update(t=time.perf_counter())))
            handles.append(layer.register_forward_hook(
                lambda m, a, o, s=start, k=kind: stamps[k].append(time.perf_counter() - s["t"])))
    try:
        with torch.no_grad():
            lm.model(**inputs, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return (sum(stamps["text"]) / len(stamps["text"]), sum(stamps["vision"]) / len(stamps["vision"]))


def memory_plan(family: str, seq: int, bytes_per: int = 2) -> list[str]:
    """Predicted GPU memory (bf16) of the family's full published model for trace, explain and pope, and what
    scales badly."""
    t = published(family)["text_config"]
    weights = family_parameter_count(family) * bytes_per
    layers, d, heads, vocab = t["num_hidden_layers"], t["hidden_size"], t["num_attention_heads"], t["vocab_size"]
    head_dim = t.get("head_dim", d // heads)
    kv = 2 * layers * t.get("num_key_value_heads", heads) * head_dim * seq * bytes_per  # per sequence
    probs = heads * seq * seq * bytes_per  # eager attention, one layer, per sequence (transient)
    logits_all = seq * vocab * 4
    act = 4 * seq * t["intermediate_size"] * bytes_per  # MLP activations of one layer (transient)
    lines = [f"weights {weights / 1e9:.1f} GB; per sequence: KV cache {kv / 1e6:.0f} MB, eager attention "
             f"probabilities {probs / 1e6:.0f} MB per layer (heads × seq², built by eager attention although "
             f"only the decision row is read), logits at every position {logits_all / 1e6:.0f} MB "
             "(vocabulary × seq; avoided: logits_to_keep=1)"]
    for batch in (1, 8, 32):
        trace = weights + batch * (probs + act) + 2 * batch * kv  # baseline + steered, one at a time
        pope = weights + batch * (kv + probs + act)  # the baseline's cache is kept for the steered run
        lines.append(f"batch {batch:>2}: trace ≈ {trace / 1e9:.1f} GB, explain ≈ {trace / 1e9:.1f} GB "
                     f"(runs one at a time), pope ≈ {pope / 1e9:.1f} GB")
    return lines


def build(family: str, args, tok):
    """The family's configuration at ``args``' depth (its published widths, or reduced ones), and its label."""
    if family == "llava":
        config = llava15_7b_config(args.text_layers, args.vision_layers,
                                   image_token_id=tok.convert_tokens_to_ids("<image>"),
                                   pad_token_id=tok.pad_token_id, widths=REDUCED if args.reduced else None)
        return config, "LLaVA-1.5-7B widths"
    widths = None
    if args.reduced:  # heads down to the key-value heads: head_dim and the rotary settings stay
        widths = reduced_widths(family, args.vocab)
        t = published(family)["text_config"]
        widths["text"]["num_attention_heads"] = t.get("num_key_value_heads", t["num_attention_heads"])
    config = family_config(family, args.text_layers, args.vision_layers, widths=widths, token_ids=args.token_ids)
    return config, f"{published(family)['_checkpoint']} widths"


def timed_or_refused(fn, *a, per: int = 1, **kw) -> str:
    """``fn``'s wall time (divided by ``per``) as text, or the one-line reason a family refuses it."""
    t = time.perf_counter()
    try:
        fn(*a, **kw)
    except UserError as exc:
        return f"refused ({str(exc).splitlines()[0][:160]})"
    return f"{(time.perf_counter() - t) / per:.2f} s"


def run_dtype(family: str, folder: str, dtype: str, questions, images, args) -> int:
    """One dtype's checks and timings, printed; returns the prompt's length."""
    lm = load_model(folder, dtype=dtype)
    iv = MCLCBF(B.apply_overrides(B.get_preset("seed-exp6"), ["span=detected", "tau=0.99"]))
    prompt = build_prompt(questions[0].text)
    inputs = lm.inputs(prompt, images[0])
    image = inputs["input_ids"][0] == lm.tokens.image_token_id
    n_img, first = int(image.sum()), int(image.nonzero()[0])
    t = time.perf_counter()
    result = trace_sample(lm, questions[0], images[0], iv)
    t_trace = time.perf_counter() - t
    diffs = compare(result, reference(lm, inputs))
    rs = result.records.query("metric == 'rounding_survival' and condition == 'steered'").value
    rounding = next(c for c in diagnose(result.records) if c.id == "rounding_absorbed")
    t_explain = timed_or_refused(explain_sample, lm, questions[0], images[0], iv, k_max=2, bisect_steps=1, sweep=False)
    prompts = [build_prompt(q.text) for q in questions]
    pope_times = {}
    for name, cls in REGISTRY.items():
        # AD-HH would first search its heads (L·H forwards per question): give it two
        iv_p = cls.from_preset(None, ["heads=0.0,1.1"] if name == "adhh" else [])
        pope_times[name] = timed_or_refused(answer_pair, lm, prompts, images, iv_p, per=len(prompts),
                                            inputs=batch_inputs(lm, prompts, images))
    per_text, per_vision = layer_times(lm, inputs)
    seq = inputs["input_ids"].shape[1]
    print(f"\n== {dtype}: prompt {seq} tokens, {n_img} image tokens from {first} to {int(image.nonzero()[-1])}")
    print(f"max difference vs plain transformers: residual norms {diffs['resid_norm_rel']:.2e} (relative), "
          f"image mass {diffs['image_mass_abs']:.2e}, final margin {diffs['margin_abs']:.2e}; look-ahead h vs the "
          f"measured mass at the {diffs['kept_layers']} kept layer(s): {diffs['lookahead_h_abs']:.2e}")
    print(f"rounding survival of α·θ* (records, median over fired layers) {rs.median():.3g}; "
          f"θ* entries that change x at all: {100 * theta_entries_surviving(result):.1f}%")
    print(f"rounding rule: {'detected' if rounding.detected else 'not detected'}: {rounding.sentence}")
    print(f"time: trace {t_trace:.1f} s, explain (reduced) {t_explain}, pope per question "
          + ", ".join(f"{k} {v}" for k, v in pope_times.items()))
    print(f"per layer: language {per_text * 1e3:.0f} ms, vision {per_vision * 1e3:.0f} ms; peak RSS "
          f"{peak_rss_gb():.1f} GB")
    spec = published(family)
    full_t = spec["text_config"]["num_hidden_layers"]
    vision = spec["vision_config"]
    full_v = vision.get("depth", vision.get("num_hidden_layers"))
    forward = full_t * per_text + full_v * per_vision
    scale = forward / (args.text_layers * per_text + args.vision_layers * per_vision)
    print(f"extrapolated to {full_t} language + {full_v} vision layers on this CPU: one forward ≈ {forward:.1f} s; "
          f"trace ≈ {t_trace * scale:.0f} s (ratio of the full depth to this one: {scale:.1f})")
    return seq


def save_model(config, family: str, processor, folder) -> None:
    """Build the model of ``config`` with random weights and save it, with the family's stand-in processor, into
    ``folder`` (what :func:`mclcbf_diag.models.load_model` reads)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    build_random_model(config, family, dtype=torch.float32).save_pretrained(folder)
    save_stand_in(family, processor, folder)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="llava", help="one of: " + ", ".join(PUBLISHED_FILES))
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reduced", action="store_true", help="tiny widths (a smoke test, not a measurement)")
    # dest save_dir: nnsight mounts a ``save`` method on every object, so a Namespace "has" ``save`` and argparse
    # would never set its default
    ap.add_argument("--save", dest="save_dir", default=None, metavar="DIR",
                    help="only build the model and save it into DIR (a new or empty folder), for other benchmarks' "
                         "--model (intervention_throughput.py: each method's cost against a bare forward at these "
                         "widths)")
    args = ap.parse_args(argv)
    save = Path(args.save_dir) if args.save_dir else None
    if save is not None and save.exists() and (not save.is_dir() or any(save.iterdir())):
        print(f"error: --save {args.save_dir} exists and is not an empty folder; name a new one", file=sys.stderr)
        return 2
    try:
        check_family(args.family)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    family = args.family
    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # freed tensors reused, not mapped afresh (mclcbf_diag.memory)
    processor = stand_in_processor(family)
    args.vocab, args.token_ids = stand_in_vocabulary(family, processor), stand_in_token_ids(family, processor)
    config, label = build(family, args, getattr(processor, "tokenizer", None))
    questions = load_pope(POPE / "embedded_pope_adversarial.json")[: max(args.questions, 1)]
    images = [load_image(resolve_image(q, POPE / "images")) for q in questions]
    print(f"config: {'REDUCED widths' if args.reduced else label}, {args.text_layers} language + "
          f"{args.vision_layers} vision layers, {family_parameter_count(family, config) / 1e6:.0f} M parameters, "
          f"{args.threads} threads; machine: {sys.platform}, torch {torch.__version__}")
    if args.save_dir:
        save_model(config, family, processor, args.save_dir)
        print(f"saved into {args.save_dir}; ratio: not applicable (pass it to another benchmark's --model)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        save_model(config, family, processor, tmp)
        print(f"built and saved in {time.perf_counter() - t0:.1f} s")
        for dtype in args.dtypes.split(","):
            seq = run_dtype(family, tmp, dtype, questions, images, args)
    checkpoint = published(family).get("_checkpoint", "llava-hf/llava-1.5-7b-hf")
    print(f"\nmemory plan, full {checkpoint} in bf16 on a GPU (ratio-free estimates from the widths):")
    for line in memory_plan(family, seq=620 if family == "llava" else seq):
        print("  " + line)
    print("ratio: not applicable (a correctness and scale check; see the lines above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
