"""``mclcbf-diag attribute``: one sample's direct logit attribution, activation patching and attribution patching;
with ``--limit N``, the components that carry the wrong "Yes" over a split's first N questions."""

from __future__ import annotations

import json

from .. import knobs as K
from ..errors import UserError
from .common import (
    check_folder,
    check_prompt,
    force_option,
    intervention_options,
    load_from_args,
    model_options,
    question_from_args,
    sample_job,
    sample_options,
    show,
    write_frame,
    writing,
)


def corruption_kind(args) -> str:
    """``--corrupt``, or its default: over a split (``--limit``) a blank image (what the picture adds to a wrong
    Yes; the minimal pair would add the absent object, which raises the Yes); for one sample the minimal pair on
    the embedded model's own questions, else VCD noise."""
    if args.corrupt is not None:
        return args.corrupt
    if getattr(args, "limit", None) is not None:
        return "blank"
    return "pair" if args.model in (None, "", "embedded") and args.pope_file is None else "noise"


def corrupted_input(args, question, image, image_dir):
    """``(kind, image or None, description)``, every check before the model loads (the noise is drawn later,
    on the processed image)."""
    from ..data import load_image, load_pope, resolve_image, select_question
    from ..data.corrupt import VCD_STEPS, blank_image, check_step, pair_image
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


def _check_corruption_options(args) -> str:
    from ..data.corrupt import check_step

    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: give a non-negative integer")
    kind = corruption_kind(args)
    if args.other_sample is not None and kind != "other":
        raise UserError(f"--other-sample goes with --corrupt other, not --corrupt {kind}")
    if args.noise_step is not None:
        if kind != "noise":
            raise UserError(f"--noise-step goes with --corrupt noise, not --corrupt {kind}")
        check_step(args.noise_step)
    return kind


def cmd_attribute(args) -> int:
    from ..storage import atomic_write_text, safe_name

    if args.limit is not None:
        return cmd_attribute_split(args)
    if args.share is not None or args.adhh_calibration is not None:
        raise UserError("--share and --adhh-calibration go with --limit N (a split); add --limit, or leave them out")
    _check_corruption_options(args)
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
    from ..experiments.attribute import attribute_sample
    from ..pages import attribute_sections
    from ..report import write_page

    pixels = None
    if kind == "noise":
        from ..data.corrupt import vcd_noise

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
    from ..report.attribution_figures import restore_section

    sections = attribute_sections(result)
    restored = restore_section(result)
    if restored is not None:
        sections.append(restored)
    with writing(args, default_out) as out:
        write_frame(result.records, out / "records.parquet", "parquet")
        write_frame(result.records, out / "records.csv", "csv")
        atomic_write_text(out / "config.json", json.dumps(meta, indent=2, default=str))
        write_page(out / "attribute.html", "mclcbf-diag attribute: direct logit attribution and patching", sections)
    _print_sample(result.summary, description)
    print(f"wrote {show(out)}/records.parquet, records.csv, config.json, attribute.html")
    return 0


def _print_sample(s: dict, description: str) -> None:
    """The lines ``attribute --sample`` prints: margins, DLA, patching and, with an intervention, its localisation."""
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
    if "local" in s and s["local"]["measurable"]:
        found = s["local"]
        from ..report.attribution_figures import effect_names

        print(f"  restoring   the baseline's activations in the intervened run: the share of the change lost, top "
              f"heads {', '.join(s['top_heads_restore'])}")
        print(f"  the change  enters {effect_names(found['enters'])}")
        peak = max((e for e in found["decision"] if e["direction"] == "denoise" and e["effect"] * found["gap"] > 0),
                   key=lambda e: abs(e["effect"]), default=None)
        if peak is not None:
            print(f"              the decision token's residual carries most of it entering layer {peak['layer']} "
                  f"({peak['effect']:+.3g}, {100 * peak['share']:.0f}% of it, put into the baseline)")
        print(f"              made by {effect_names(found['arises'])}")
        print(f"              worked against by {effect_names(found['cancels'])}")
        print(f"              (effects in logits of the margin, each above {found['threshold']:.3g}, twice the noise "
              "floor)")


def cmd_attribute_split(args) -> int:
    """``--limit N``: the components that carry the wrong Yes over the split's first N questions."""
    from ..pope.jobs import question_files, select_jobs
    from ..storage import atomic_write_text, check_writable

    if args.sample is not None or args.question_id is not None:
        raise UserError("--limit runs over a split: give it without --sample/--question-id (or drop --limit)")
    if args.limit < 1:
        raise UserError(f"--limit {args.limit}: give a positive number of questions")
    share = 0.1 if args.share is None else args.share
    if not 0 < share <= 1:
        raise UserError(f"--share {share}: give a fraction of the margin in (0, 1], e.g. 0.1")
    if args.adhh_calibration is not None and args.adhh_calibration < 1:
        raise UserError(f"--adhh-calibration {args.adhh_calibration}: give a positive number of questions")
    kind = _check_corruption_options(args)
    check_prompt(args)
    jobs = select_jobs(question_files(args.split, args.pope_file, args.image_dir), args.limit, None)
    if not jobs:
        raise UserError(f"the question file of split {args.split} holds no question; give another --pope-file")
    if args.other_sample is not None:
        raise UserError("--other-sample picks one image; with --limit each question's corruption is the image of "
                        "the next question about another image: leave --other-sample out")
    items = [_split_item(args, job, kind, i == 0) for i, job in enumerate(jobs)]  # checked before the model loads
    out = check_writable(args.out or f"reports/attribute-{args.split}")
    check_folder(out, "attribute", args.force)
    lm = load_from_args(args)
    from ..experiments.attribute import split_carriers

    result = split_carriers(lm, [(q, image, _corrupter(lm, args, q, image, c)) for q, image, c in items],
                            share=share, components_at=args.components_at, template=args.prompt,
                            adhh_calibration=args.adhh_calibration, progress=True)
    from ..report import write_page
    from ..report.attribution_figures import acts_phrase, split_sections

    meta = {"model": lm.source, "dtype": args.dtype, "device": args.device, "split": args.split,
            "pope_file": args.pope_file, "limit": args.limit, "corrupt": kind, "seed": args.seed,
            "summary": result.summary}
    with writing(args, str(out)) as out:
        write_frame(result.records, out / "records.parquet", "parquet")
        write_frame(result.records, out / "records.csv", "csv")
        write_frame(result.counts, out / "counts.csv", "csv")
        write_frame(result.interventions, out / "interventions.csv", "csv")
        atomic_write_text(out / "config.json", json.dumps(meta, indent=2, default=str))
        write_page(out / "attribute.html", "mclcbf-diag attribute: the components that carry the wrong Yes",
                   split_sections(result))
    s = result.summary
    print(f"split {args.split}: {s['questions']} questions, {s['wrong_yes']} wrong Yes, {s['wrong_no']} wrong No, "
          f"{s['not_yes_no']} not Yes/No ({kind} corruption)")
    print(f"  carriers of the wrong Yes  {', '.join(s['carriers']) or 'none'}")
    print(f"  AD-HH finds               {', '.join(s['adhh_heads']) or 'none'}; carrying a wrong Yes here: "
          f"{', '.join(s['adhh_heads_carrying']) or 'none'}")
    for row in result.interventions.itertuples():
        print(f"  {row.intervention:<6} opens {row.sites or 'no site'} at {row.layers}: {acts_phrase(row)}")
    print(f"wrote {show(out)}/records.parquet, records.csv, counts.csv, interventions.csv, config.json, "
          "attribute.html")
    return 0


def _split_item(args, job, kind: str, first: bool):
    """``(question, load image, load corrupted image or None)`` of one question. Every check runs before the model
    loads: the image (decoded, not kept) and, for the first question, the corruption itself (a minimal pair: that
    the question names one object, for every question)."""
    from ..data import load_image, resolve_image
    from ..data.corrupt import asked_object
    from ..data.pope import SHORTEST_EDGE, check_image
    from .common import shortest_edge

    q, edge = job.question, shortest_edge(args.model) or SHORTEST_EDGE
    try:
        path = resolve_image(q, job.image_dir)
        check_image(path, edge)
    except UserError as exc:
        raise UserError(f"question_id {q.question_id!r}: {exc}") if "question_id" not in str(exc) else exc
    if kind == "pair" and asked_object(q.text) is None:
        raise UserError(f"--corrupt pair: question_id {q.question_id!r} ({q.text!r}) names no single object of the "
                        "embedded world; choose --corrupt noise, blank or other")

    def image():
        return load_image(path, edge)

    def corrupted():
        return None if kind == "noise" else corrupted_input(args, q, image(), job.image_dir)[1]

    if first:
        corrupted()
    return q, image, corrupted


def _corrupter(lm, args, question, image, corrupted_image):
    """``clean inputs → corrupted inputs`` of one question (VCD noise on its processed image, seeded); ``image``
    and ``corrupted_image`` load the pictures when called."""
    from ..data import build_prompt

    def corrupt(clean: dict) -> dict:
        picture = corrupted_image()
        if picture is not None:
            return lm.inputs(build_prompt(question.text, args.prompt), picture)
        from ..data.corrupt import vcd_noise

        proc = lm.processor.image_processor(images=image(), return_tensors="pt")["pixel_values"]
        pixels = vcd_noise(proc, 500 if args.noise_step is None else args.noise_step, args.seed)
        return {**clean, "pixel_values": pixels.to(clean["pixel_values"].device, clean["pixel_values"].dtype)}

    return corrupt


def add_parser(sub) -> None:
    from ..data.corrupt import KINDS

    p = sub.add_parser("attribute", help="one sample: direct logit attribution, activation and attribution patching")
    sample_options(p)
    model_options(p)
    intervention_options(p)
    g = p.add_argument_group("corruption")
    g.add_argument("--corrupt", default=None, choices=KINDS,
                   help="the corrupted input (same prompt, another image): pair = the same scene with the asked "
                        "object removed or added (embedded model's questions; the default there), noise = VCD's "
                        "diffusion noise (the default elsewhere), blank = a grey image (the default with --limit), "
                        "other = another question's image")
    g.add_argument("--noise-step", type=int, default=None, help="--corrupt noise: diffusion step 0–999 (default 500)")
    g.add_argument("--other-sample", type=int, default=None,
                   help="--corrupt other: 0-based index of the question whose image to use (default: the next "
                        "question about another image)")
    g.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    p.add_argument("--components-at", default="text", choices=["text", "decision"],
                   help="where each head's and MLP's output is patched: every text token after the image (default) "
                        "or the decision token only (a deep model's grid costs less)")
    g = p.add_argument_group("over a split (instead of one sample)")
    g.add_argument("--limit", type=int, default=None, metavar="N",
                   help="run over the split's (or --pope-file's) first N questions: count, over the wrong Yes "
                        "answers, the heads and MLPs that carry the Yes (DLA and activation patching), compare them "
                        "with AD-HH's hallucination heads and the sites each intervention edits")
    g.add_argument("--share", type=float, default=None,
                   help="--limit: a component carries a wrong Yes when its direct contribution (or its patch's "
                        "recovery) is at least this fraction of the margin (default 0.1), above the noise floor")
    g.add_argument("--adhh-calibration", type=int, default=None, metavar="N",
                   help="--limit: questions AD-HH (preset paper) finds its heads on (default its own, 16)")
    p.add_argument("--out", default=None, help="output folder (default reports/attribute-<question_id>, or "
                                               "reports/attribute-<split> with --limit)")
    force_option(p)
    p.set_defaults(func=cmd_attribute)
