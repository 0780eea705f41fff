"""Train the embedded model from scratch, reproducibly, on CPU or GPU.

Two stages, as in LLaVA's own recipe:

* **Stage 0, vision pre-training** (stands in for CLIP pre-training). The CLIP vision tower
  learns multi-label presence of the *visible* objects through a throw-away linear head.
* **Stage 1, visual instruction tuning.** The tower is frozen; the projector and the Llama
  language model learn multi-turn dialogues about each image: several "Is there a … in the
  image?" questions (half annotated objects, half absent ones) and sometimes a caption
  question. The loss covers answer tokens only. Answers follow the *annotations*, which
  include partners that were not drawn: this is where the co-occurrence prior comes from.

Every batch is drawn from a seeded stream of fresh scenes, so one command and one seed
give the same weights. ``mclcbf-diag zoo train`` drives :func:`train`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..progress import tqdm
from .build import CAPTION_QUESTION, PROMPT, QUESTION, build_model, build_processor
from .world import CLASS_NAMES, sample_scene

SEQ_LEN = 176


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vision_steps: int = 300
    vision_lr: float = 1e-3
    steps: int = 800
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    caption_p: float = 0.5


class SceneStream:
    """An endless, seeded stream of training scenes (scene ids 0, 1, 2, …)."""

    def __init__(self, seed: int):
        self.seed, self.next_id = seed, 0

    def take(self, n: int):
        scenes = [sample_scene(i, self.seed) for i in range(self.next_id, self.next_id + n)]
        self.next_id += n
        return scenes


def dialogue(scene, rng: np.random.Generator, caption_p: float) -> str:
    """A multi-turn dialogue text for one scene; answers follow the annotations."""
    present = list(dict.fromkeys(scene.labels))
    absent = [c for c in CLASS_NAMES if c not in present]
    k = min(3, len(present))
    asked = [(present[i], "Yes") for i in rng.choice(len(present), size=k, replace=False)]
    asked += [(absent[i], "No") for i in rng.choice(len(absent), size=k, replace=False)]
    turns = [(QUESTION.format(name=n), a) for n, a in asked]
    if rng.random() < caption_p:
        turns.append((CAPTION_QUESTION, " and ".join(sorted(present, key=CLASS_NAMES.index)) + " ."))
    order = rng.permutation(len(turns))
    first_q, first_a = turns[order[0]]
    text = PROMPT.format(question=first_q) + " " + first_a
    for i in order[1:]:
        q, a = turns[i]
        text += f"\nUSER: {q}\nASSISTANT: {a}"
    return text


def answer_labels(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Labels that keep only the answer tokens (after ``ASSISTANT :`` up to the newline)."""
    assistant, colon, newline = tokenizer.convert_tokens_to_ids(["ASSISTANT", ":", "\n"])
    labels = torch.full_like(input_ids, -100)
    for b, row in enumerate(input_ids.tolist()):
        inside = False
        for t, tok in enumerate(row):
            if inside and (tok == newline or tok == tokenizer.pad_token_id):
                inside = False
            if inside:
                labels[b, t] = tok
            if t > 0 and tok == colon and row[t - 1] == assistant:
                inside = True
    return labels


def make_batch(scenes, processor, rng, caption_p: float) -> dict:
    texts = [dialogue(s, rng, caption_p) for s in scenes]
    enc = processor(text=texts, images=[s.image() for s in scenes], return_tensors="pt",
                    padding="max_length", max_length=SEQ_LEN, truncation=False)
    enc["labels"] = answer_labels(enc["input_ids"], processor.tokenizer)
    return dict(enc)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_vision(model, processor, cfg: TrainConfig, device, log) -> None:
    tower = model.model.vision_tower
    head = torch.nn.Linear(tower.config.hidden_size, len(CLASS_NAMES)).to(device)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg.vision_steps, cfg.warmup))
    stream = SceneStream(cfg.seed + 10_000)
    bar = tqdm(range(cfg.vision_steps), desc="stage 0: vision tower", mininterval=2)
    for step in bar:
        scenes = stream.take(cfg.batch_size)
        pixels = processor.image_processor([s.image() for s in scenes], return_tensors="pt")["pixel_values"]
        target = torch.tensor([[float(c in s.visible) for c in CLASS_NAMES] for s in scenes])
        hidden = tower(pixel_values=pixels.to(device)).last_hidden_state[:, 1:].mean(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(hidden), target.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        log.append({"stage": 0, "step": step, "loss": loss.item()})


def train_language(model, processor, cfg: TrainConfig, device, log) -> None:
    model.model.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg.steps, cfg.warmup))
    stream, rng = SceneStream(cfg.seed), np.random.default_rng(cfg.seed)
    processor.tokenizer.padding_side = "right"
    try:
        bar = tqdm(range(cfg.steps), desc="stage 1: language model", mininterval=2)
        for step in bar:
            batch = make_batch(stream.take(cfg.batch_size), processor, rng, cfg.caption_p)
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            log.append({"stage": 1, "step": step, "loss": loss.item()})
    finally:
        processor.tokenizer.padding_side = "left"


def train(out_dir: Path, cfg: TrainConfig = TrainConfig(), device: str = "cpu") -> dict:
    """Train from scratch and save a ``from_pretrained``-loadable directory."""
    torch.manual_seed(cfg.seed)
    torch.set_flush_denormal(True)
    processor = build_processor()
    model = build_model(processor.tokenizer, seed=cfg.seed).to(device)
    model.train()
    log: list[dict] = []
    t0 = time.perf_counter()
    if cfg.vision_steps:
        pretrain_vision(model, processor, cfg, device, log)
    t1 = time.perf_counter()
    train_language(model, processor, cfg, device, log)
    t2 = time.perf_counter()
    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    summary = {"config": asdict(cfg), "device": device, "vision_seconds": t1 - t0,
               "language_seconds": t2 - t1, "final_loss": log[-1]["loss"] if log else None,
               "parameters": sum(p.numel() for p in model.parameters())}
    return summary
