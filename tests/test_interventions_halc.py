"""HALC's grounding, focal views and view contrast against hand-worked numbers and the released code.

The contrast's reference (:func:`released_double_contrast`) is ``context_layer_double_multi_contrastive_decoding``
of ``BillChan226/HALC`` line for line (float32 ``F.kl_div`` with ``batchmean`` on ``[1, vocab]`` logits, the
upper triangle's ``topk``, both directions with the −1000 mask). The oracle detector is checked against the
shipped images' own pixels.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from floors import logit_floor
from plain_refs import plain_model, run_folder_with_one_answer

from mclcbf_diag import shipped
from mclcbf_diag.data import build_prompt, load_image
from mclcbf_diag.embedded.world import BACKGROUND, BY_NAME, DRAW_SIZE, NOISE_SIGMA
from mclcbf_diag.interventions.halc import (
    FALLBACK,
    OracleDetector,
    crop,
    expand_box,
    focal_boxes,
    focal_step,
    ground,
    shipped_scenes,
    view_contrast,
)


def released_double_contrast(context_logits_list, k_candidate_num=4, contrast_weight=0.05):
    k_candidate = int(k_candidate_num / 2)
    stacked = torch.stack(context_logits_list, dim=0)
    num_layers = len(stacked)
    jsd_matrix = torch.zeros((num_layers, num_layers))
    for i in range(num_layers):
        for j in range(i + 1, num_layers):
            M = 0.5 * (F.softmax(stacked[i], dim=-1) + F.softmax(stacked[j], dim=-1))
            kl1 = F.kl_div(F.log_softmax(stacked[i], dim=-1), M, reduction="batchmean")
            kl2 = F.kl_div(F.log_softmax(stacked[j], dim=-1), M, reduction="batchmean")
            jsd = 0.5 * (kl1 + kl2)
            jsd_matrix[i, j] = jsd
            jsd_matrix[j, i] = jsd
    top_k_indices_flat = torch.topk(jsd_matrix.triu(diagonal=1).flatten(), k_candidate).indices
    rows = top_k_indices_flat // jsd_matrix.size(1)
    cols = top_k_indices_flat % jsd_matrix.size(1)
    out = []
    for layer_idx1, layer_idx2 in zip(rows.tolist(), cols.tolist()):
        base_logits = context_logits_list[layer_idx1].clone()
        final_logits = context_logits_list[layer_idx2]
        base_logits[0][final_logits[0] < -1e3] = -1e3
        out.append(final_logits - base_logits * contrast_weight)
        base_logits = context_logits_list[layer_idx2].clone()
        final_logits = context_logits_list[layer_idx1]
        base_logits[0][final_logits[0] < -1e3] = -1e3
        out.append(final_logits - base_logits * contrast_weight)
    return out


def test_view_contrast_is_the_released_double_multi_contrast():
    g = torch.Generator().manual_seed(2)
    views = [torch.randn(1, 40, generator=g) * s for s in (1.0, 2.0, 3.0, 0.5)]
    want = released_double_contrast(views)
    got = view_contrast(torch.cat(views), k_candidates=4, weight=0.05)
    assert len(got) == len(want) == 4
    for (_, _, scores), ref in zip(got, want):
        torch.testing.assert_close(scores, ref[0], rtol=0, atol=1e-6)  # the same float32 arithmetic
    assert got[0][:2] == (got[1][1], got[1][0])  # one pair, both directions


def test_focal_boxes_are_the_released_expansions():
    box = (0.4, 0.4, 0.6, 0.6)
    boxes = focal_boxes(box, 4, 0.6)
    want = [(0.46, 0.46, 0.54, 0.54), box, (0.34, 0.34, 0.66, 0.66), (0.244, 0.244, 0.756, 0.756)]
    for got, ref in zip(boxes, want, strict=True):
        assert got == pytest.approx(ref)
    assert expand_box((0.0, 0.1, 0.5, 0.9), 1.0) == pytest.approx((0.0, 0.0, 0.75, 1.0))  # clipped to the image
    assert focal_boxes(box, 1) == [box] and focal_boxes(box, 2, 0.9)[0] == pytest.approx(expand_box(box, -0.8))


class Fixed:
    def __init__(self, boxes):
        self.found = boxes

    def boxes(self, image, word):
        return self.found


def test_grounding_takes_the_smallest_box_falls_back_or_gives_up():
    small, large = (0.1, 0.1, 0.2, 0.2), (0.0, 0.0, 0.9, 0.9)
    assert ground(Fixed([large, small]), None, "dog") == (small, "detected")
    assert ground(Fixed([]), None, "dog") == (FALLBACK, "not-detected")
    assert ground(Fixed([small] * 4), None, "dog") == (None, "invalid")


def test_the_oracle_finds_exactly_the_drawn_objects_of_the_shipped_images():
    rows = [json.loads(line) for line in (shipped.POPE / "annotations.jsonl").read_text().splitlines()[:12]]
    oracle = OracleDetector(shipped_scenes([r["image"] for r in rows]))
    hidden = 0
    for r in rows:
        image = load_image(shipped.IMAGES / r["image"])
        for name in r["labels"]:
            boxes = oracle.boxes(image, name + "s")  # a plural finds the class too
            assert len(boxes) == (name in r["visible"])
            hidden += name not in r["visible"]
            scene = oracle.scenes[next(k for k, v in oracle.scenes.items() if v.scene_id == int(r["image"][4:10]))]
            for box in boxes:  # the object's colour, as drawn (faint ones blended into the grey), is inside its box
                obj = next(o for o in scene.objects if o.name == name)
                drawn = obj.opacity * torch.tensor(BY_NAME[name].colour) + (1 - obj.opacity) * BACKGROUND
                pixels = torch.tensor(np.asarray(crop(image, box)), dtype=torch.float32).reshape(-1, 3)
                assert float((pixels - drawn).norm(dim=-1).min()) < 2 * NOISE_SIGMA * 3 ** 0.5
                assert all(0 <= v <= 1 for v in box) and (box[2] - box[0]) * DRAW_SIZE >= 3
        assert oracle.boxes(image, "unicorn") == []
    assert hidden >= 1  # an annotated partner that is not drawn has no box


def test_focal_step_on_the_embedded_model_equals_plain_forwards_of_the_crops(embedded_model):
    lm = embedded_model
    rows = [json.loads(line) for line in (shipped.POPE / "annotations.jsonl").read_text().splitlines()[:6]]
    r = next(r for r in rows if r["visible"])
    oracle = OracleDetector(shipped_scenes([r["image"]]))
    image = load_image(shipped.IMAGES / r["image"])
    word = r["visible"][0]
    prompt = build_prompt(f"Is there a {word} in the image?")
    generated = torch.tensor([lm.tokens.yes_id])  # teacher-forced: the answer written so far
    step = focal_step(lm, prompt, image, word, oracle, generated)
    assert step.status == "detected" and len(step.boxes) == 4 and step.boxes[1] == oracle.boxes(image, word)[0]
    model = plain_model(lm)
    views = []
    with torch.no_grad():
        for box in step.boxes:
            w, h = image.size
            view = image.crop((box[0] * w, box[1] * h, box[2] * w, box[3] * h))  # the released crop
            inputs = lm.processor(text=prompt, images=view, return_tensors="pt")
            ids = torch.cat([inputs["input_ids"], generated[None]], -1)
            views.append(model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0, -1:])
    torch.testing.assert_close(step.logits, torch.cat(views), rtol=0, atol=logit_floor(lm))  # two float32 routes
    want = released_double_contrast(views)
    assert step.candidates == [int(c.argmax()) for c in want]
    for (_, _, got), ref in zip(step.contrasts, want):  # z_j − w·z_i: (1 + w)·the logit floor
        torch.testing.assert_close(got, ref[0], rtol=0, atol=(1 + 0.05) * logit_floor(lm))
    assert focal_step(lm, prompt, image, word, Fixed([(0.1, 0.1, 0.2, 0.2)] * 4)).status == "invalid"


# --------------------------------------------------------------------------- the intervention (first token)
def released_views(image, box, context_window=4, expand_ratio=0.6):
    """The released ``expand_bbox`` chain written out: shrunk by min(ratio, 0.8), the box, then expansions."""
    def expand(b, f):
        w, h = b[2] - b[0], b[3] - b[1]
        return (max(0, b[0] - w * f / 2), max(0, b[1] - h * f / 2), min(1, b[2] + w * f / 2), min(1, b[3] + h * f / 2))

    boxes = [expand(box, -min(expand_ratio, 0.8)), box]
    while len(boxes) < context_window:
        boxes.append(expand(boxes[-1], expand_ratio))
    w, h = image.size
    return boxes, [image.crop((b[0] * w, b[1] * h, b[2] * w, b[3] * h)) for b in boxes]


def reference_first_token(lm, prompt, image, box, weight=0.05):
    """HALC's first-token scores in plain PyTorch: the views' logits from a never-wrapped model, the released double
    contrast, its first candidate; ``(scores [vocab], final view, base view)``."""
    model = plain_model(lm)
    _, views = released_views(image, box)
    logits = []
    with torch.no_grad():
        for view in views:
            inputs = lm.processor(text=prompt, images=view, return_tensors="pt")
            logits.append(model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits[0, -1:])
    stacked = torch.cat(logits)
    n = len(logits)
    jsd = torch.zeros(n, n)
    for i in range(n):
        for j in range(i + 1, n):
            m = 0.5 * (F.softmax(stacked[i], -1) + F.softmax(stacked[j], -1))
            jsd[i, j] = 0.5 * (F.kl_div(F.log_softmax(stacked[i:i + 1], -1), m[None], reduction="batchmean")
                               + F.kl_div(F.log_softmax(stacked[j:j + 1], -1), m[None], reduction="batchmean"))
    i, j = divmod(int(torch.topk(jsd.flatten(), 1).indices), n)
    return stacked[j] - weight * stacked[i], j, i


def first_image_questions():
    """The first shipped image's adversarial questions about a drawn object and an absent one, with their boxes."""
    from mclcbf_diag.data import load_pope, resolve_image
    from mclcbf_diag.embedded.config import EVAL_SEED
    from mclcbf_diag.embedded.world import sample_scene

    qs = [q for q in load_pope(shipped.pope_file("adversarial")) if q.image == "emb_000000.png"]
    scene = sample_scene(0, EVAL_SEED)
    drawn = {o.name: o for o in scene.objects if o.drawn}
    word = lambda q: q.text.split("Is there a ")[1].split(" in the image")[0].removeprefix("n ")  # noqa: E731
    present = next(q for q in qs if word(q) in drawn)
    absent = next(q for q in qs if word(q) not in drawn and q.label == "no")
    o, s = drawn[word(present)], float(DRAW_SIZE)
    box = (max(0.0, (o.cx - o.size) / s), max(0.0, (o.cy - o.size) / s), min(1.0, (o.cx + o.size) / s),
           min(1.0, (o.cy + o.size) / s))
    image = load_image(resolve_image(present, shipped.IMAGES))
    return [present, absent], image, [box, (0.2, 0.2, 0.8, 0.8)]


def test_halc_first_token_equals_a_plain_pytorch_reference(embedded_model):
    """A drawn object (its exact box) and an absent one (the released fallback box): the answer's Yes − No margin is
    the first contrast's, and the records name the views, the contrast and the grounding."""
    from floors import margin_floor

    from mclcbf_diag.engine.batch import answer_pair
    from mclcbf_diag.interventions import HALC, resolve

    lm = embedded_model
    questions, image, boxes = first_image_questions()
    prompts = [build_prompt(q.text) for q in questions]
    iv = resolve("halc")
    assert isinstance(iv, HALC) and iv.auxiliary_forwards() == 4
    base, steered = answer_pair(lm, prompts, [image, image], iv.with_detector(OracleDetector(shipped_scenes(
        ["emb_000000.png"]))))
    yes, no = lm.tokens.yes_id, lm.tokens.no_id
    tol = (1 + 0.05) * margin_floor(lm.model, yes, no)  # z_final − w·z_base, each from two float32 routes
    for prompt, box, s, grounded in zip(prompts, boxes, steered, (1.0, 0.0)):
        want, final, view = reference_first_token(lm, prompt, image, box)
        assert s["margin"] == pytest.approx(float(want[yes] - want[no]), abs=tol)
        assert (s["halc_grounding"], s["halc_views"], s["halc_final_view"], s["halc_base_view"]) == \
            (grounded, 4.0, final, view)
    assert steered[0]["margin"] != base[0]["margin"]


def test_a_users_detector_plugs_in_and_the_model_answers_when_grounding_fails(embedded_model):
    from floors import margin_floor

    from mclcbf_diag.engine.batch import answer_pair
    from mclcbf_diag.interventions import HALC

    lm = embedded_model
    yes, no = lm.tokens.yes_id, lm.tokens.no_id
    questions, image, _ = first_image_questions()
    prompts = [build_prompt(q.text) for q in questions]
    small = (0.1, 0.1, 0.3, 0.3)
    for iv, grounded in ((HALC.from_preset("pope").with_detector(Fixed([small] * 4)), -1.0),  # too many: not handled
                         (HALC.from_preset("model-fallback").with_detector(Fixed([])), -1.0),  # not found
                         (HALC.from_preset("pope", ["max_boxes=4"]).with_detector(Fixed([small] * 4)), 1.0)):
        base, steered = answer_pair(lm, prompts, [image, image], iv)
        for b, s in zip(base, steered):
            assert s["halc_grounding"] == grounded
            if grounded < 0:  # the model's own scores, no views
                # the intervened run continues the baseline's cache: the same logits by another float32 route
                assert s["margin"] == pytest.approx(b["margin"], abs=margin_floor(lm.model, yes, no))
                assert s["halc_views"] == 0.0 and "halc_final_view" not in s
            else:
                assert s["halc_views"] == 4.0
    assert iv.replace(weight=0.1).detector is iv.detector  # a knob change keeps the detector


def test_pope_runs_halc_with_the_oracle_and_refuses_images_it_does_not_know(tmp_path, capsys):
    from cli_refusals import refused_here

    from mclcbf_diag.cli import main

    assert main(["pope", "--split", "adversarial", "--limit", "4", "--intervention", "halc", "--out",
                 str(tmp_path / "h")]) == 0
    capsys.readouterr()  # the run's progress bar
    recs = [json.loads(line) for line in (tmp_path / "h" / "answers.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(r["halc_views"] == 4.0 for r in recs)
    # a batch of one row: the crops' forwards (whole prompts of one row) are not read as the baseline's records
    assert main(["pope", "--split", "adversarial", "--limit", "1", "--batch-size", "1", "--intervention", "halc",
                 "--out", str(tmp_path / "h1")]) == 0
    assert main(["pope", "--split", "adversarial", "--limit", "1", "--batch-size", "1", "--intervention", "dola",
                 "--out", str(tmp_path / "d1")]) == 0
    capsys.readouterr()
    one, plain = (json.loads((tmp_path / d / "answers.jsonl").read_text().splitlines()[0]) for d in ("h1", "d1"))
    masses = [k for k in plain if k.startswith("baseline_image_mass_")]
    assert masses and all(one[k] == plain[k] for k in masses)  # the same baseline forward, the same rounding
    drawn = {o.name for o in shipped_scenes(["emb_000000.png"])[0].objects if o.drawn}
    for r in recs:  # the oracle: a drawn object is found, any other falls back to the released box
        assert r["halc_grounding"] == (1.0 if r["text"].split("Is there a ")[1].split(" in")[0] in drawn else 0.0)
    image = load_image(shipped.IMAGES / "emb_000000.png")
    image.putpixel((0, 0), (1, 2, 3))
    image.save(tmp_path / "emb_000000.png")
    image.save(tmp_path / "street.png")
    for name in ("emb_000000.png", "street.png"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"question_id": 1, "image": name, "label": "yes",
                                                            "text": "Is there a dog in the image?"}) + "\n")
        refused_here(capsys, ["pope", "--pope-file", str(tmp_path / f"{name}.jsonl"), "--intervention", "halc",
                              "--out", str(tmp_path / f"out-{name}")], name, "oracle detector", "with_detector")
    refused_here(capsys, ["pope", "--limit", "2", "--intervention", "halc", "--generate", "3", "--out",
                          str(tmp_path / "g")], "--generate", "drop --generate")
    refused_here(capsys, ["trace", "--sample", "0", "--intervention", "halc", "--out", str(tmp_path / "t")],
                 "runs under `pope` only")
    assert not any((tmp_path / d).exists() for d in ("out-street.png", "g", "t"))  # refused before writing


def test_halc_acts_on_the_first_token_only(embedded_model):
    """Generated from Python (the CLI refuses --generate), read step by step from the generation loop: step 0's scores
    are the focal contrast's (the plain-PyTorch reference; not the model's own logits) with its views recorded, every
    later step's are the model's own logits of the sequence written so far, no view contrasted."""
    from mclcbf_diag.engine.batch import batch_inputs
    from mclcbf_diag.engine.decode import generate
    from mclcbf_diag.interventions import HALC

    lm = embedded_model
    questions, image, boxes = first_image_questions()
    prompt = build_prompt(questions[0].text)
    iv = HALC.from_preset("pope").with_detector(OracleDetector(shipped_scenes(["emb_000000.png"])))
    inputs = batch_inputs(lm, [prompt], [image], share_images=False)
    iv.sources([prompt], [image])
    gen = generate(lm, inputs, iv, max_new_tokens=3, keep_scores=True)
    assert len(gen.steps) >= 2  # a later step to read
    floor, n = logit_floor(lm), inputs["input_ids"].shape[1]
    model = plain_model(lm)
    own = lm.processor(text=prompt, images=image, return_tensors="pt")

    def plain_scores(k):  # the model's own logits after the prompt and the first k tokens written
        ids = torch.cat([own["input_ids"], gen.sequences[:, n:n + k]], -1)
        with torch.no_grad():
            return model(input_ids=ids, pixel_values=own["pixel_values"]).logits[0, -1]

    want, final, base = reference_first_token(lm, prompt, image, boxes[0])
    first = gen.steps[0]["records"][0][-1]
    assert (first["halc_grounding"], first["halc_views"], first["halc_final_view"], first["halc_base_view"]) == \
        (1.0, 4.0, final, base)
    torch.testing.assert_close(gen.steps[0]["scores"][0], want, rtol=0, atol=(1 + 0.05) * floor)
    assert float((gen.steps[0]["scores"][0] - plain_scores(0)).abs().max()) > 100 * floor  # the contrast acted
    for k, step in enumerate(gen.steps[1:], 1):
        later = step["records"][0][-1]
        assert (later["halc_grounding"], later["halc_views"]) == (-1.0, 0.0) and "halc_final_view" not in later
        torch.testing.assert_close(step["scores"][0], plain_scores(k), rtol=0, atol=floor)


# --------------------------------------------------------------------------- the detector in the run's identity
def pope_identity(config):
    """``run.json``'s identity of a 2-question adversarial run under ``config`` (as ``mclcbf-diag pope`` builds it)."""
    from mclcbf_diag.cli import build_parser
    from mclcbf_diag.cli.pope import run_identity

    args = build_parser().parse_args(["pope", "--split", "adversarial", "--limit", "2", "--intervention", config.name])
    return run_identity(args, config, [("adversarial", shipped.pope_file("adversarial"), shipped.IMAGES)], None)


# the identity's keys before interventions named parts besides their knobs: a run folder of those keys must resume
IDENTITY_KEYS = {"format", "model", "dtype", "intervention", "preset", "overrides", "config", "splits", "pope_files",
                 "limit", "shard", "generate", "prompt", "batch_size", "device", "versions", "pope_sha256"}


class Named(Fixed):
    name = "threshold 0.3"


def test_the_detector_is_in_the_run_identity_and_no_other_methods_identity_changes(tmp_path):
    from mclcbf_diag.errors import UserError
    from mclcbf_diag.interventions import HALC, names, resolve
    from mclcbf_diag.pope.store import ANSWERS, claim_out_dir, run_id

    for name in names():  # every other method: the identity it always had, so its run folders still resume
        if name != "halc":
            iv = resolve(name)
            assert iv.components() == {} and set(iv.describe()) == {"intervention", "knobs"}
            assert set(pope_identity(iv)) == IDENTITY_KEYS, name
    dola = pope_identity(resolve("dola"))
    old = run_folder_with_one_answer(tmp_path / "dola", dola)
    assert claim_out_dir(old, pope_identity(resolve("dola"))) is False  # resumed
    halc = HALC.from_preset("pope")
    runs = {"oracle": halc, "shipped": halc.with_detector(OracleDetector([])), "fixed": halc.with_detector(Fixed([])),
            "named": halc.with_detector(Named([]))}
    described = {k: iv.components() for k, iv in runs.items()}
    assert described == {"oracle": {}, "shipped": {}, "fixed": {"detector": "Fixed"},
                         "named": {"detector": "Named (threshold 0.3)"}}
    assert halc.replace(weight=0.1).with_detector(Named([])).components() == described["named"]
    ids = {k: pope_identity(iv) for k, iv in runs.items()}
    # the oracle's (pope always installs it): the identity's old shape, so HALC folders written before resume
    assert set(ids["oracle"]) == set(ids["shipped"]) == IDENTITY_KEYS
    assert all(ident["components"] == described[k] for k, ident in ids.items() if k in ("fixed", "named"))
    assert len({run_id(ids[k]) for k in ("oracle", "fixed", "named")}) == 3 and run_id(ids["oracle"]) == run_id(
        ids["shipped"])
    out = tmp_path / "halc"
    out.mkdir()
    assert claim_out_dir(out, ids["fixed"]) is True
    (out / ANSWERS).write_text((old / ANSWERS).read_text())
    with pytest.raises(UserError, match="components.detector"):  # another detector: never resumed into the folder
        claim_out_dir(out, ids["named"])
    assert claim_out_dir(out, ids["fixed"]) is False


# --------------------------------------------------------------------------- a batch's crops as rows of one forward
def test_a_batchs_crops_are_one_padded_forward_per_view_equal_to_each_rows_own(embedded_model):
    """Questions about three images, prompts of different lengths (padding): HALC's views come from context_window
    forwards of the batch's rows, each row's logits its own plain one-row forward's (the route per row) within the
    logit floor; a row without a grounding runs no view."""
    from types import SimpleNamespace

    from mclcbf_diag.data import load_pope, resolve_image
    from mclcbf_diag.interventions import HALC
    from mclcbf_diag.models.processing import padded_inputs

    lm = embedded_model
    qs = load_pope(shipped.pope_file("adversarial"))
    picked = [next(q for q in qs if q.image == name) for name in ("emb_000000.png", "emb_000001.png",
                                                                  "emb_000002.png")]
    images = [load_image(resolve_image(q, shipped.IMAGES)) for q in picked]
    prompts = [build_prompt(picked[0].text), build_prompt("Look closely. " + picked[1].text),
               build_prompt(picked[2].text.replace("Is there", "Tell me: is there"))]
    prompts.append(build_prompt("What colour is the sky?"))  # no object word: the model's own scores, no view
    images.append(images[0])
    assert bool((padded_inputs(lm, prompts[:3], images[:3])["attention_mask"] == 0).any())  # rows are padded
    iv = HALC.from_preset("pope").with_detector(OracleDetector(shipped_scenes(["emb_000000.png", "emb_000001.png",
                                                                              "emb_000002.png"])))
    calls = []
    hook = lm.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]),
                                              with_kwargs=True)
    try:
        iv.sources(prompts, images)
        iv.prepare(lm, {}, [SimpleNamespace(index=i) for i in range(len(prompts))])
    finally:
        hook.remove()
    assert calls == [3] * 4  # context_window forwards, each of the three grounded rows
    model = plain_model(lm)
    for i in range(3):
        step = iv._steps[i]
        assert step.logits.shape == (4, lm.model.config.get_text_config().vocab_size)
        own = []
        with torch.no_grad():
            for box in step.boxes:  # the route per row: one forward of the prompt alone per crop
                inputs = lm.processor(text=prompts[i], images=crop(images[i], box), return_tensors="pt")
                own.append(model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits[0, -1])
        torch.testing.assert_close(step.logits, torch.stack(own), rtol=0, atol=logit_floor(lm))  # two float32 routes
        assert [int(c.argmax()) for _, _, c in view_contrast(torch.stack(own))] == step.candidates
    assert iv._steps[3].logits is None and iv._steps[3].status == "no-source"
