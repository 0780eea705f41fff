"""Measure the embedded model the way LLaVA-1.5-7B is described: layout, POPE, attention.

* **Layout**: every prompt tokenises to BOS, the four "USER:" prefix tokens and 576 image
  tokens at positions 5–580 (llava-hf's layout).
* **POPE** on held-out scenes (a seed training never saw), the three splits built as POPE
  builds them; the answer is read from the first answer token (logit ``▁Yes`` vs ``▁No`` at
  the last prompt token). Besides POPE's metrics, the negatives are split by whether the
  asked object's usual partner is annotated in the image (the co-occurrence prior).
* **Attention at the decision token** (the last prompt token, ``:`` of ``ASSISTANT:``): per
  layer, the attention mass (mean over heads) on BOS, on the image tokens and on the other
  text tokens; and the residual-stream norm of BOS against the other tokens after each
  layer (Llama-2's BOS carries "massive activations").

Everything runs on the plain transformers model and processor (no toolkit machinery), so
it can evaluate any checkpoint directory::

    python -m mclcbf_diag.embedded.evaluate --model DIR [--images 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .build import IMAGE_START, N_IMAGE_TOKENS, PROMPT
from .config import EVAL_SEED
from .questions import SPLITS, image_name, pope_questions
from .world import PARTNER_OF, sample_scenes

WEIGHTS = Path(__file__).resolve().parent / "weights"
SEED_LAYERS = (10, 28)  # the seed steers layers 10–27 of LLaVA-1.5-7B's 32


# Published LLaVA-1.5-7B figures on POPE (MS-COCO), percentages, for the side-by-side report.
PUBLISHED = {
    "source_avg": "Liu et al. 2023, Improved Baselines with Visual Instruction Tuning (arXiv:2310.03744), "
                  "main results table: POPE 85.9 (F1, the three COCO splits averaged)",
    "f1_avg": 85.9,
    "source_split": "pope-audit 0.1.0 (PyPI, 2026 preprint 'Token-Set Choice Confounds POPE'): llava-hf "
                    "LLaVA-1.5-7B, greedy, USER/ASSISTANT prompt, 3,000 questions per split",
    "splits": {"random": {"f1": 87.13, "yes_ratio": 41.1}, "popular": {"f1": 84.98, "yes_ratio": 43.4},
               "adversarial": {"f1": 82.21, "yes_ratio": 45.2}},
}


# What the literature reports for LLaVA-1.5-7B (Llama-2-7B) at the layers the profile shows.
PUBLISHED_ATTENTION = (
    "image tokens receive very little attention after layer 2 (FastV: Chen et al. 2024, arXiv:2403.06764)",
    "the BOS token takes most of the attention as a sink (Xiao et al. 2023, arXiv:2309.17453)",
    "BOS carries massive activations of magnitude ~10^3 from layer ~2 on, so its residual norm is orders of "
    "magnitude above the other tokens' (Sun et al. 2024, arXiv:2402.17762)",
)


def side_by_side(summary: pd.DataFrame) -> pd.DataFrame:
    """This model's POPE figures next to the published LLaVA-1.5-7B ones (percentages)."""
    rows = []
    for r in summary.to_dict("records"):
        pub = PUBLISHED["splits"].get(r["split"], {})
        rows.append({"split": r["split"], "accuracy": 100 * r["accuracy"], "f1": 100 * r["f1"],
                     "f1 LLaVA-1.5-7B": pub.get("f1"), "yes-ratio": 100 * r["yes_ratio"],
                     "yes-ratio LLaVA-1.5-7B": pub.get("yes_ratio"),
                     "false-yes partner / other": f"{100 * r['false_yes_partner']:.1f} / "
                                                  f"{100 * r['false_yes_no_partner']:.1f}"})
    return pd.DataFrame(rows)


def mapped_layers(n_layers: int, ref: int = 32, span: tuple[int, int] = SEED_LAYERS) -> range:
    """The seed's layers mapped to a model with ``n_layers``: floor(a·L/32+½) … floor(b·L/32+½)−1."""
    lo = math.floor(span[0] * n_layers / ref + 0.5)
    hi = math.floor(span[1] * n_layers / ref + 0.5)
    return range(lo, hi)


def load(model_dir: Path | str = WEIGHTS):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    return model, AutoProcessor.from_pretrained(model_dir)


# ---------------------------------------------------------------- layout

def layout_check(tokenizer, input_ids: list[int], image_token_id: int) -> str | None:
    """None when the prompt has llava-hf's layout, else what is wrong."""
    image = [i for i, t in enumerate(input_ids) if t == image_token_id]
    if input_ids[0] != tokenizer.bos_token_id:
        return "no BOS at position 0"
    if image != list(range(IMAGE_START, IMAGE_START + N_IMAGE_TOKENS)):
        return f"image tokens at {image[:1]}…{image[-1:]} ({len(image)}), expected 5–580 (576)"
    if tokenizer.convert_ids_to_tokens(input_ids[1:IMAGE_START]) != ["▁US", "ER", ":", "▁"]:
        return f"prefix {tokenizer.convert_ids_to_tokens(input_ids[1:IMAGE_START])}"
    return None


# ---------------------------------------------------------------- answering

def _prompt_ids(processor, question: str) -> list[int]:
    text = PROMPT.format(question=question).replace("<image>", "<image>" * N_IMAGE_TOKENS)
    return processor.tokenizer(text).input_ids


@torch.no_grad()
def image_embeds(model, processor, images, batch: int = 32) -> torch.Tensor:
    """Projected image features [n, 576, hidden], computed once per image.

    Args:
        model: the embedded model.
        processor: its processor (the image processor resizes and normalises).
        images: the n images (PIL).
        batch: images per forward of the vision tower.
    """
    out = []
    for i in range(0, len(images), batch):
        pv = processor.image_processor(images[i:i + batch], return_tensors="pt")["pixel_values"]
        feats = model.model.get_image_features(pixel_values=pv.to(model.device, model.dtype))
        feats = getattr(feats, "pooler_output", feats)
        if isinstance(feats, (list, tuple)):
            feats = torch.stack(list(feats))
        out.append(feats.reshape(pv.shape[0], N_IMAGE_TOKENS, -1))
    return torch.cat(out)


@torch.no_grad()
def margins(model, processor, embeds: torch.Tensor, pairs: list[tuple[int, str]], batch: int = 32,
            yes_no: tuple[int, int] | None = None) -> list[float]:
    """logit(▁Yes) − logit(▁No) at the last prompt token for (image index, question) pairs.

    Args:
        model: the embedded model.
        processor: its processor (the tokenizer builds each prompt).
        embeds: [n, 576, hidden] the images' projected features (:func:`image_embeds`).
        pairs: ``(index into embeds, question text)`` per prompt.
        batch: prompts per forward (right-padded).
        yes_no: the (Yes, No) token ids; None: ``▁Yes`` and ``▁No``.

    Returns:
        One margin per pair, in order.
    """
    tok = processor.tokenizer
    yes, no = yes_no or tok.convert_tokens_to_ids(["▁Yes", "▁No"])
    image_id = model.config.image_token_id
    emb = model.get_input_embeddings()
    out: list[float] = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        rows = [_prompt_ids(processor, q) for _, q in chunk]
        n = max(map(len, rows))
        ids = torch.full((len(rows), n), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, r in enumerate(rows):  # right padding: positions stay 0, 1, 2, …
            ids[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), 1
        x = emb(ids)
        img = embeds[[k for k, _ in chunk]].to(x.dtype)
        x = x.masked_scatter((ids == image_id).unsqueeze(-1), img.reshape(-1, img.shape[-1]))
        h = model.model.language_model(inputs_embeds=x, attention_mask=mask).last_hidden_state
        last = h[torch.arange(len(rows)), mask.sum(1) - 1]
        logits = model.lm_head(last)
        out += (logits[:, yes] - logits[:, no]).float().tolist()
    return out


def pope_eval(model, processor, n_images: int = 300, seed: int = EVAL_SEED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-split metrics and per-question answers on held-out scenes.

    Args:
        model: the embedded model.
        processor: its processor.
        n_images: the held-out scenes drawn (one image each).
        seed: the scenes' and questions' seed (default ``EVAL_SEED``: held out; training uses seed 0).

    Returns:
        ``(metrics, answers)``: one row per split (accuracy, precision, recall, f1, yes_ratio, the false-yes rates
        with and without the object's partner in the image, their counts, n), and one row per question (split,
        question_id, image, object, label, margin, prediction, partner_in_image).
    """
    from ..data.scoring import pope_metrics

    scenes = sample_scenes(n_images, seed)
    index = {image_name(s): i for i, s in enumerate(scenes)}
    embeds = image_embeds(model, processor, [s.image() for s in scenes])
    split_qs = {split: pope_questions(scenes, split, seed) for split in SPLITS}
    unique = sorted({(index[q["image"]], q["text"]) for qs in split_qs.values() for q in qs})
    margin = dict(zip(unique, margins(model, processor, embeds, unique)))
    rows = []
    for split, qs in split_qs.items():
        for q in qs:
            scene = scenes[index[q["image"]]]
            name = q["text"].split(" a ", 1)[1].split(" in ")[0]
            m = margin[(index[q["image"]], q["text"])]
            rows.append({"split": split, "question_id": q["question_id"], "image": q["image"], "object": name,
                         "label": q["label"], "margin": m, "prediction": "yes" if m > 0 else "no",
                         "partner_in_image": PARTNER_OF.get(name) in scene.labels})
    answers = pd.DataFrame(rows)
    out = []
    for split, df in answers.groupby("split", sort=False):
        met = pope_metrics(df["label"].tolist(), df["prediction"].tolist())
        neg = df[df["label"] == "no"]
        with_p, without_p = neg[neg["partner_in_image"]], neg[~neg["partner_in_image"]]
        out.append({"split": split, **{k: met[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")},
                    "false_yes": (neg["prediction"] == "yes").mean(),
                    "false_yes_partner": (with_p["prediction"] == "yes").mean(),
                    "false_yes_no_partner": (without_p["prediction"] == "yes").mean(),
                    "n_partner": len(with_p), "n_no_partner": len(without_p), "n": len(df)})
    return pd.DataFrame(out), answers


# ---------------------------------------------------------------- attention and norms

@torch.no_grad()
def attention_profile(model, processor, n_prompts: int = 24, seed: int = EVAL_SEED) -> pd.DataFrame:
    """Per layer, at the last prompt token: attention mass (mean over heads and prompts) on
    BOS / image / other text, and the residual norm of BOS vs the median other token.

    Args:
        model: the embedded model (eager attention: the probabilities are read).
        processor: its processor.
        n_prompts: how many adversarial-split prompts, about fresh scenes (``seed + 100``).
        seed: the questions' seed.

    Returns:
        One row per layer: ``layer``, ``bos``, ``image``, ``text`` (masses) and ``bos_norm``, ``image_norm``,
        ``text_norm`` (the last two medians over their tokens).
    """
    scenes = sample_scenes(n_prompts, seed + 100)
    qs = pope_questions(scenes, "adversarial", seed)[: n_prompts * 2 : 2] or pope_questions(scenes, "adversarial", seed)
    index = {image_name(s): i for i, s in enumerate(scenes)}
    image_id = model.config.image_token_id
    acc: dict[str, list[np.ndarray]] = {k: [] for k in ("bos", "image", "text", "bos_norm", "image_norm", "text_norm")}
    for q in qs[:n_prompts]:
        image = scenes[index[q["image"]]].image()
        enc = processor(text=PROMPT.format(question=q["text"]), images=image, return_tensors="pt")
        out = model(**enc, output_attentions=True, output_hidden_states=True)
        ids = enc["input_ids"][0]
        is_img = ids == image_id
        is_txt = ~is_img
        is_txt[0] = False
        att = torch.stack([a[0, :, -1].mean(0) for a in out.attentions])  # [layers, seq]
        acc["bos"].append(att[:, 0].numpy())
        acc["image"].append(att[:, is_img].sum(-1).numpy())
        acc["text"].append(att[:, is_txt].sum(-1).numpy())
        hs = out.hidden_states  # embeddings, then after each layer (the last one normed)
        norms = torch.stack([h[0].norm(dim=-1) for h in hs[1:]])  # [layers, seq]
        acc["bos_norm"].append(norms[:, 0].numpy())
        acc["image_norm"].append(norms[:, is_img].median(-1).values.numpy())
        acc["text_norm"].append(norms[:, is_txt].median(-1).values.numpy())
    df = pd.DataFrame({k: np.mean(v, axis=0) for k, v in acc.items()})
    df.insert(0, "layer", range(len(df)))
    return df


def layout_report(processor, pope_dir: Path) -> dict:
    """Check the layout on every question of the POPE files in ``pope_dir``."""
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    checked, bad = 0, []
    for path in sorted(Path(pope_dir).glob("*_pope_*.json")):
        for line in path.read_text().splitlines():
            q = json.loads(line)
            problem = layout_check(tok, _prompt_ids(processor, q["text"]), image_id)
            checked += 1
            if problem:
                bad.append((path.name, q["question_id"], problem))
    return {"checked": checked, "bad": bad}


POPE_DIR = Path(__file__).resolve().parent / "pope"
PIN_IMAGES, PIN_PROMPTS = 8, 3


def shipped_subset(model, processor, n_images: int = 12, pope_dir: Path = POPE_DIR) -> dict:
    """Accuracy and yes-ratio per split on the shipped questions about the first ``n_images``
    images (the figures the tests pin in ``weights/subset_figures.json``).

    Args:
        model: the embedded model.
        processor: its processor.
        n_images: how many of the random split's images, in the order they first appear.
        pope_dir: the folder of the shipped question files and their ``images/``.

    Returns:
        ``{split: {"accuracy", "yes_ratio", "n"}}``.
    """
    from PIL import Image

    from ..data.scoring import pope_metrics

    qs = {split: [json.loads(x) for x in (pope_dir / f"embedded_pope_{split}.json").read_text().splitlines()]
          for split in SPLITS}
    names = list(dict.fromkeys(q["image"] for q in qs["random"]))[:n_images]
    index = {n: i for i, n in enumerate(names)}
    images = []
    for n in names:
        with Image.open(pope_dir / "images" / n) as im:
            images.append(im.convert("RGB"))
    embeds = image_embeds(model, processor, images)
    qs = {split: [q for q in rows if q["image"] in index] for split, rows in qs.items()}
    unique = sorted({(index[q["image"]], q["text"]) for rows in qs.values() for q in rows})
    margin = dict(zip(unique, margins(model, processor, embeds, unique)))
    out = {}
    for split, rows in qs.items():
        m = [margin[(index[q["image"]], q["text"])] for q in rows]
        met = pope_metrics([q["label"] for q in rows], ["yes" if x > 0 else "no" for x in m])
        out[split] = {"accuracy": met["accuracy"], "yes_ratio": met["yes_ratio"], "n": len(rows)}
    return out


def report(model, processor, n_images: int = 300, n_prompts: int = 24, say=print) -> dict:
    """Print the layout check, POPE per split beside published LLaVA-1.5-7B figures and the
    attention profile at the decision token; return the tables.

    Args:
        model: the embedded model.
        processor: its processor.
        n_images: held-out scenes of the POPE evaluation (:func:`pope_eval`).
        n_prompts: prompts of the attention profile (:func:`attention_profile`).
        say: prints one block of text.

    Returns:
        ``layout``, ``pope`` (per split), ``answers`` (per question), ``attention`` (per layer) and
        ``steered_layers`` (the seed's layers mapped to this depth).
    """
    pope_dir = Path(__file__).resolve().parent / "pope"
    lay = layout_report(processor, pope_dir) if pope_dir.exists() else {"checked": 0, "bad": []}
    say(f"layout: {lay['checked']} shipped questions checked, {len(lay['bad'])} wrong "
        f"(BOS + 4 prefix tokens, {N_IMAGE_TOKENS} image tokens at positions "
        f"{IMAGE_START}–{IMAGE_START + N_IMAGE_TOKENS - 1})")
    summary, answers = pope_eval(model, processor, n_images)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        say(summary.round(4).to_string(index=False))
        say(side_by_side(summary).round(1).to_string(index=False))
        say(f"published: {PUBLISHED['source_split']}; {PUBLISHED['source_avg']}")
        prof = attention_profile(model, processor, n_prompts)
        say("attention at the decision token (mass, mean over heads) and residual norms, per layer:")
        say(prof.round(3).to_string(index=False))
        say("published for LLaVA-1.5-7B: " + "; ".join(PUBLISHED_ATTENTION))
    steered = list(mapped_layers(model.config.text_config.num_hidden_layers))
    say(f"seed layers 10–27 map to {steered}; image mass < 0.2 at "
        f"{int((prof.loc[steered, 'image'] < 0.2).sum())}/{len(steered)} of them")
    return {"layout": lay, "pope": summary, "answers": answers, "attention": prof, "steered_layers": steered}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mclcbf_diag.embedded.evaluate")
    ap.add_argument("--model", type=Path, default=WEIGHTS)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pin", action="store_true",
                    help="write subset_figures.json (the figures the tests check) into the model directory")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = load(args.model)
    rep = report(model, processor, args.images, args.prompts)
    if args.pin:
        sub = shipped_subset(model, processor, n_images=PIN_IMAGES)
        small = attention_profile(model, processor, n_prompts=PIN_PROMPTS)
        pinned = {"n_images": PIN_IMAGES, "splits": sub,
                  "attention": {"n_prompts": PIN_PROMPTS,
                                **{k: small[k].round(3).tolist() for k in ("bos", "image", "text")}}}
        (Path(args.model) / "subset_figures.json").write_text(json.dumps(pinned, indent=2) + "\n")
        print(json.dumps(pinned))
    if args.json:
        args.json.write_text(json.dumps({"pope": rep["pope"].to_dict("records"),
                                         "attention": rep["attention"].to_dict("records"),
                                         "steered_layers": rep["steered_layers"]}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
