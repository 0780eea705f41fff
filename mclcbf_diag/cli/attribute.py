"""``mclcbf-diag attribute``: one sample's direct logit attribution, activation patching and attribution patching."""

from __future__ import annotations

import json

from .. import knobs as K
from ..errors import UserError
from .common import (
    force_option,
    intervention_options,
    model_options,
    question_from_args,
    sample_job,
    sample_options,
    show,
    write_frame,
    writing,
)


def corruption_kind(args) -> str:
    """``--corrupt``, or its default: the minimal pair on the embedded model's own questions, else VCD noise."""
    if args.corrupt is not None:
        return args.corrupt
    return "pair" if args.model in (None, "", "embedded") and args.pope_file is None else "noise"


def corrupted_input(args, question, image, image_dir):
    """``(kind, image or None, description)``, every check before the model loads (the noise is drawn later,
    on the processed image)."""
    from ..corrupt import VCD_STEPS, blank_image, check_step, pair_image
    from ..data import load_image, load_pope, resolve_image, select_question
    from ..data.pope import SHORTEST_EDGE
    from .common import shortest_edge

    kind = corruption_kind(args)
    if kind == "noise":
        step = 500 if args.noise_step is None else args.noise_step
        check_step(step)
        return kind, None, f"VCD diffusion noise at step {step} of {VCD_STEPS} (seed {args.seed})"
    if kind == "blank":
        return kind, blank_image(image.size), "a blank mid-grey image"
    if kind == "pair":
        corrupted, what = pair_image(question, image, question.image)
        return kind, corrupted, what
    # another question's image
    pope_file = _question_file(args)
    questions = load_pope(pope_file)
    if args.other_sample is not None:
        other = select_question(questions, sample=args.other_sample, source=str(pope_file))
        if other.image == question.image:
            raise UserError(f"--other-sample {args.other_sample} has the same image ({question.image}) as the "
                            "question; pick a question about another image")
    else:
        index = next((i for i, q in enumerate(questions) if q.question_id == question.question_id), 0)
        order = questions[index + 1:] + questions[:index]
        other = next((q for q in order if q.image != question.image), None)
        if other is None:
            raise UserError("--corrupt other: every question of this file shows the same image; choose --corrupt "
                            "noise or blank")
    try:
        picture = load_image(resolve_image(other, image_dir), shortest_edge(args.model) or SHORTEST_EDGE)
    except UserError as exc:
        raise UserError(f"--corrupt other (question_id {other.question_id!r}): {exc}") from None
    return kind, picture, f"the image of question_id {other.question_id} ({other.image})"


def _question_file(args):
    from pathlib import Path

    from .. import shipped

    return Path(args.pope_file) if args.pope_file else shipped.pope_file(args.split)


def cmd_attribute(args) -> int:
    from ..corrupt import check_step
    from ..storage import atomic_write_text, safe_name

    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: give a non-negative integer")
    kind = corruption_kind(args)
    if args.other_sample is not None and kind != "other":
        raise UserError(f"--other-sample goes with --corrupt other, not --corrupt {kind}")
    if args.noise_step is not None:
        if kind != "noise":
            raise UserError(f"--noise-step goes with --corrupt noise, not --corrupt {kind}")
        check_step(args.noise_step)
    question, image_dir = question_from_args(args)
    from ..data import load_image, resolve_image
    from ..data.pope import SHORTEST_EDGE
    from .common import shortest_edge

    try:
        image = load_image(resolve_image(question, image_dir), shortest_edge(args.model) or SHORTEST_EDGE)
    except UserError as exc:
        raise UserError(f"question_id {question.question_id!r}: {exc}") if "question_id" not in str(exc) else exc
    kind, corrupted_image, description = corrupted_input(args, question, image, image_dir)
    config, question, image, lm = sample_job(args, "reports/attribute-{question_id}")
    from ..attribute import attribute_sample
    from ..pages import attribute_sections
    from ..report import write_page

    pixels = None
    if kind == "noise":
        from ..corrupt import vcd_noise

        proc = lm.processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
        pixels = vcd_noise(proc, 500 if args.noise_step is None else args.noise_step, args.seed)
    result = attribute_sample(lm, question, image, corrupted_image, config, template=args.prompt,
                              corruption=description, corrupted_pixels=pixels, progress=True,
                              components_at=args.components_at)
    default_out = f"reports/attribute-{safe_name(question.question_id)}"
    meta = {"model": lm.source, "dtype": args.dtype, "device": args.device, "intervention": args.intervention,
            "preset": args.preset, "overrides": args.overrides, "config": K.to_dict(config.knobs),
            "corrupt": kind, "corruption": description, "seed": args.seed, "components_at": args.components_at,
            "question": {"question_id": question.question_id, "image": question.image, "text": question.text,
                         "label": question.label},
            "summary": result.summary}
    sections = attribute_sections(result)
    with writing(args, default_out) as out:
        write_frame(result.records, out / "records.parquet", "parquet")
        write_frame(result.records, out / "records.csv", "csv")
        atomic_write_text(out / "config.json", json.dumps(meta, indent=2, default=str))
        write_page(out / "attribute.html", "mclcbf-diag attribute: direct logit attribution and patching", sections)
    s = result.summary
    print(f"question_id {s['question_id']}: {s['question']} (label: {s['label'] or 'none'})")
    print(f"  corruption  {description}")
    print(f"  margin      clean {s['margin_clean']:+.4f}   corrupted {s['margin_corrupted']:+.4f}   intervened "
          f"{s['margin_steered']:+.4f}")
    print(f"  DLA         top heads {', '.join(s['top_heads_dla'])}; from the image "
          f"{', '.join(s['top_heads_dla_image'])}")
    print(f"  patching    top heads (denoising) {', '.join(s['top_heads_patch_denoise'])}; attribution patching "
          f"{', '.join(s['top_heads_atp_denoise'])} (Spearman {s['spearman_heads_denoise']:.2f})")
    if "top_heads_local" in s:
        if abs(s["local_gap"]) <= s["margin_floor"]:
            print("  intervention  leaves the margin within its noise floor: nothing to localise")
        else:
            times = abs(s['local_gap']) / s['margin_floor']
            print(f"  intervention  moves the margin by {s['local_gap']:+.3g} ({times:.3g}"
                  f" × its noise floor); its activations patched into the baseline: top heads "
                  f"{', '.join(s['top_heads_local'])}")
    print(f"wrote {show(out)}/records.parquet, records.csv, config.json, attribute.html")
    return 0


def add_parser(sub) -> None:
    from ..corrupt import KINDS

    p = sub.add_parser("attribute", help="one sample: direct logit attribution, activation and attribution patching")
    sample_options(p)
    model_options(p)
    intervention_options(p)
    g = p.add_argument_group("corruption")
    g.add_argument("--corrupt", default=None, choices=KINDS,
                   help="the corrupted input (same prompt, another image): pair = the same scene with the asked "
                        "object removed or added (embedded model's questions; the default there), noise = VCD's "
                        "diffusion noise (the default elsewhere), blank = a grey image, other = another question's "
                        "image")
    g.add_argument("--noise-step", type=int, default=None, help="--corrupt noise: diffusion step 0–999 (default 500)")
    g.add_argument("--other-sample", type=int, default=None,
                   help="--corrupt other: 0-based index of the question whose image to use (default: the next "
                        "question about another image)")
    g.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    p.add_argument("--components-at", default="text", choices=["text", "decision"],
                   help="where each head's and MLP's output is patched: every text token after the image (default) "
                        "or the decision token only (a deep model's grid costs less)")
    p.add_argument("--out", default=None, help="output folder (default reports/attribute-<question_id>)")
    force_option(p)
    p.set_defaults(func=cmd_attribute)
