"""Train the embedded model from scratch, reproducibly, on CPU or GPU: one seeded command.

The stages follow LLaVA-1.5's recipe, with stand-ins for what a real Llama and CLIP bring:

* **Stage 0, vision pre-training** (stands in for CLIP pre-training). The CLIP tower learns
  multi-label presence of the *visible* objects from its last layer (mean-pooled), plus
  each patch's class on the layer LLaVA reads, through throw-away linear heads.
* **Stage L, language pre-training** (stands in for Llama-2's): image-free dialogues, a
  scene described in words and then questions about it, with next-token loss on all tokens.
* **Stage 1, visual instruction tuning.** The tower is frozen, so its features (layer −2,
  CLS dropped: 576 × hidden per image) are computed **once per image** and cached. The
  projector and the language model then learn POPE's question, "Is there a … in the
  image?", for **every** class of each image, plus the caption question. Each question is a
  branch off the image's shared prefix (:class:`Branches`): it sees only the prefix and
  itself, at the positions it has when POPE asks it alone, so one pass over the image's 576
  tokens trains eleven answers exactly as they are evaluated. Answers follow the
  *annotations*, which include partners that were not drawn: this is where the
  co-occurrence prior comes from. The yes/no loss is balanced between yes and no questions
  (POPE asks half and half). Small weights add the caption answer, next-token loss on the
  question tokens, and a mixed-in batch of stage-L dialogues. From ``sink_start`` of the
  steps on, :class:`SinkPrior` stands in for the attention sink Llama-2's long
  pre-training leaves.

``--init-from DIR`` continues a saved model (give ``--vision-steps 0 --text-steps 0`` to skip
to stage 1). Sequences are padded on the right to a few fixed lengths (no stalls on new
shapes). One command and one seed give the same weights on one machine::

    mclcbf-diag embedded train --out DIR [--steps N] [--seed S] [--threads 1]
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .build import (
    CAPTION_QUESTION,
    IMAGE_START,
    IMAGE_TOKEN,
    N_IMAGE_TOKENS,
    PROMPT,
    QUESTION,
    build_model,
    build_processor,
)
from .config import TrainConfig
from .world import CLASS_NAMES, DRAW_SIZE, IMAGE_SIZE, patch_labels, render_small, sample_scene

BUCKETS = (704, 736, 768, 800, 832)


# ---------------------------------------------------------------- dialogues and batches

def questions(scene) -> list[tuple[str, str]]:
    """Every class asked once, answered from the annotations, then the caption question."""
    present = set(scene.labels)
    asked = [(QUESTION.format(name=n), "Yes" if n in present else "No") for n in CLASS_NAMES]
    asked.append((CAPTION_QUESTION, " and ".join(sorted(present, key=CLASS_NAMES.index)) + "."))
    return asked


def text_dialogue(scene, rng: np.random.Generator) -> str:
    """An image-free dialogue: a scene described in words, then questions answered from the text."""
    present = list(dict.fromkeys(scene.labels))
    described = " and ".join(f"a {n}" for n in rng.permutation(present))
    opener = ["The picture shows", "The picture has", "I see", "There is"][int(rng.integers(4))]
    names = list(rng.permutation(CLASS_NAMES))[: int(rng.integers(2, 5))]
    turns = [(QUESTION.format(name=n), "Yes" if n in present else "No") for n in names]
    if rng.random() < 0.3:
        turns.insert(int(rng.integers(len(turns) + 1)),
                     (CAPTION_QUESTION, " and ".join(sorted(present, key=CLASS_NAMES.index)) + "."))
    text = f"USER: {opener} {described}.\n"
    for j, (q, a) in enumerate(turns):
        text += (q if j == 0 else f"USER: {q}") + f"\nASSISTANT: {a}</s>"
    return text


TEXT_LEN = 128
MAX_OFFSET = 640


def text_batch(scenes, rng, t: Tokens) -> dict:
    """Image-free sequences with full next-token loss. Half of them start their text at a
    random position offset (BOS stays at 0), so that what is learnt about BOS holds at the
    distances a 576-token image puts between BOS and the question."""
    rows = [t.tok(text_dialogue(s, rng)).input_ids[:TEXT_LEN] for s in scenes]
    ids = torch.full((len(rows), TEXT_LEN), t.pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    pos = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        mask[b, :len(r)] = 1
        off = int(rng.integers(0, MAX_OFFSET)) if rng.random() < 0.5 else 0
        pos[b, 1:] = torch.arange(1, TEXT_LEN) + off
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


def text_step(model, batch: dict, device):
    ids, mask, pos = (batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids"))
    hidden = model.model.language_model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    sel = mask[:, 1:] == 1
    logits = model.lm_head(hidden[:, :-1][sel])
    return F.cross_entropy(logits.float(), ids[:, 1:][sel])


def pretrain_text(model, scenes, cfg: TrainConfig, device, log, say, tokenizer) -> None:
    """Stage L: the language model and its head on image-free dialogues about the scenes (:func:`text_batch`).

    Args:
        model: the model trained in place (its language model and ``lm_head``).
        scenes: the training scenes; each step draws ``cfg.text_batch`` of them.
        cfg: the steps (``text_steps``), batch, learning rate, warm-up, weight decay and seed.
        device: where the batches go.
        log: gets one ``{"stage": "L", "step", "loss"}`` per step.
        say: prints a progress line every 25 steps.
        tokenizer: the model's tokenizer.
    """
    lm = torch.nn.ModuleDict({"lm": model.model.language_model, "head": model.lm_head})
    opt = torch.optim.AdamW(_param_groups(lm, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, cfg.text_steps, cfg.warmup, 0.3))
    rng = np.random.default_rng([cfg.seed, 11])
    t = Tokens(tokenizer)
    lm.train()
    for step in range(cfg.text_steps):
        batch = [scenes[i] for i in rng.choice(len(scenes), size=cfg.text_batch, replace=False)]
        loss = text_step(model, text_batch(batch, rng, t), device)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(lm.parameters()), 1.0)
        opt.step()
        sched.step()
        log.append({"stage": "L", "step": step, "loss": loss.item()})
        if step % 25 == 0 or step == cfg.text_steps - 1:
            say(f"stage L step {step} loss {loss.item():.4f}")


class Tokens:
    """Token ids the batching needs."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        ids = tokenizer.convert_tokens_to_ids
        self.image, self.pad, self.eos = ids(IMAGE_TOKEN), tokenizer.pad_token_id, tokenizer.eos_token_id
        self.ant, self.colon = ids("ANT"), ids(":")

    def encode(self, text: str) -> list[int]:
        return self.tok(text.replace(IMAGE_TOKEN, IMAGE_TOKEN * N_IMAGE_TOKENS)).input_ids


def answer_mask(row: list[int], t: Tokens) -> list[bool]:
    """True on answer tokens: after ``ANT :`` up to and including ``</s>``."""
    out, inside = [False] * len(row), False
    for i, tok in enumerate(row):
        if inside:
            out[i] = True
            if tok == t.eos:
                inside = False
        elif i >= 2 and row[i - 1] == t.colon and row[i - 2] == t.ant:
            inside = True
            out[i] = True
    return out


PREFIX_LEN = IMAGE_START + N_IMAGE_TOKENS + 1  # BOS, "USER: ", the image, "\n"


class Branches:
    """One image's questions as branches off its shared prefix, in one token row.

    Every question of :func:`questions` is tokenised as the single-turn prompt
    ``USER: <image>\n{question}\nASSISTANT: {answer}</s>`` that POPE asks; the first
    ``PREFIX_LEN`` tokens (BOS, ``USER:``, the 576 image tokens, ``\n``) are the same for all
    of them and are kept once. Each question's remaining tokens follow as a branch that sees
    the prefix and itself only, at the positions it has in its own prompt. So every answer is
    trained exactly as it is asked at evaluation, and the image is computed once for its
    eleven questions (ten classes and the caption) instead of once per question.
    """

    def __init__(self, t: Tokens):
        self.t = t
        self._rows: dict[tuple[str, str], tuple[list[int], list[bool]]] = {}

    def single(self, question: str, answer: str) -> tuple[list[int], list[bool]]:
        key = (question, answer)
        if key not in self._rows:
            row = self.t.encode(PROMPT.format(question=question) + f" {answer}</s>")
            self._rows[key] = (row, answer_mask(row, self.t))
        return self._rows[key]

    def row(self, scene) -> dict:
        """ids, positions, branch (-1: prefix) and answer flags of one image's row."""
        asked = questions(scene)
        parts = [self.single(q, a) for q, a in asked]
        prefix = parts[0][0][:PREFIX_LEN]
        ids, pos, branch, answer, yes = list(prefix), list(range(PREFIX_LEN)), [-1] * PREFIX_LEN, \
            [False] * PREFIX_LEN, [False] * PREFIX_LEN
        for b, ((row, am), (q, a)) in enumerate(zip(parts, asked)):
            if row[:PREFIX_LEN] != prefix:
                raise AssertionError(f"question {q!r} does not share the image prefix")
            n = len(row) - PREFIX_LEN
            ids += row[PREFIX_LEN:]
            pos += range(PREFIX_LEN, len(row))
            branch += [b] * n
            answer += am[PREFIX_LEN:]
            yes += [a == "Yes"] * n
        return {"ids": ids, "pos": pos, "branch": branch, "answer": answer, "yes": yes,
                "caption": len(parts) - 1}

    def batch(self, scenes) -> dict:
        """Right-padded rows (lengths in ``BUCKETS``), the visibility mask [B, T, T] and the
        prediction targets: position i predicts token i + 1 of its own branch."""
        rows = [self.row(s) for s in scenes]
        longest = max(len(r["ids"]) for r in rows)
        length = next((b for b in BUCKETS if b >= longest), longest)
        B = len(rows)
        ids = torch.full((B, length), self.t.pad, dtype=torch.long)
        pos = torch.zeros((B, length), dtype=torch.long)
        branch = torch.full((B, length), -2, dtype=torch.long)  # -2: padding
        answer = torch.zeros((B, length), dtype=torch.bool)
        yes = torch.zeros((B, length), dtype=torch.bool)
        caption = torch.zeros((B, length), dtype=torch.bool)
        for i, r in enumerate(rows):
            n = len(r["ids"])
            ids[i, :n], pos[i, :n], branch[i, :n] = (torch.tensor(r[k]) for k in ("ids", "pos", "branch"))
            answer[i, :n], yes[i, :n] = torch.tensor(r["answer"]), torch.tensor(r["yes"])
            caption[i, :n] = branch[i, :n] == r["caption"]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        visible = causal & ((branch[:, None, :] == -1) | (branch[:, None, :] == branch[:, :, None]))
        visible &= (branch[:, None, :] != -2)
        visible |= torch.eye(length, dtype=torch.bool)  # padding sees itself (no empty rows)
        same = (branch[:, 1:] == branch[:, :-1]) & (branch[:, 1:] >= 0)  # i -> i+1 within a branch
        return {"input_ids": ids, "position_ids": pos, "visible": visible, "branch": branch,
                "predict": same, "answer": answer[:, 1:] & same, "yes": yes[:, 1:],
                "caption": caption[:, 1:]}


# ---------------------------------------------------------------- schedule and stages

def _schedule(step: int, total: int, warmup: int, floor: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    cos = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return floor + (1 - floor) * cos


def _param_groups(module, weight_decay: float):
    """Weight decay on matrices only; none on norms, biases and embeddings."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name or "embed" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pixel_values(processor, scenes) -> torch.Tensor:
    """What ``processor.image_processor`` gives for the rendered scenes, computed from the
    48×48 drawings: the ×7 nearest upscale is already 336 px, so CLIP's resize and crop leave
    it unchanged and only rescaling and normalising remain (a test checks the equality)."""
    ip = processor.image_processor
    small = torch.from_numpy(np.stack([render_small(s) for s in scenes])).permute(0, 3, 1, 2).float()
    scale = IMAGE_SIZE // DRAW_SIZE
    big = small.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (ip.image_mean, ip.image_std))
    return (big * ip.rescale_factor - mean) / std


def pretrain_vision(model, processor, scenes, cfg: TrainConfig, device, log, say) -> None:
    """Multi-label presence from the last layer (pooled) plus, on the layer LLaVA reads
    (``vision_feature_layer``), each patch's class: CLIP's patch features are semantic, and
    this dense target stands in for that.

    Args:
        model: the model whose vision tower is trained in place (left in eval mode).
        processor: its processor (the pixel values).
        scenes: the training scenes; each step draws ``cfg.vision_batch`` of them.
        cfg: the steps (``vision_steps``), batch, learning rate (``vision_lr``) and seed.
        device: where the tower and batches are.
        log: gets one ``{"stage": 0, "step", "loss"}`` per step.
        say: prints a progress line every 25 steps.
    """
    tower, layer = model.model.vision_tower, model.config.vision_feature_layer
    head = torch.nn.Linear(tower.config.hidden_size, len(CLASS_NAMES)).to(device)
    dense = torch.nn.Linear(tower.config.hidden_size, len(CLASS_NAMES) + 1).to(device)
    heads = list(head.parameters()) + list(dense.parameters())
    opt = torch.optim.AdamW(_param_groups(tower, 0.01) + [{"params": heads, "weight_decay": 0.0}],
                            lr=cfg.vision_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, cfg.vision_steps, 20, 0.05))
    rng = np.random.default_rng([cfg.seed, 7])
    tower.train()
    for step in range(cfg.vision_steps):
        batch = [scenes[i] for i in rng.choice(len(scenes), size=cfg.vision_batch, replace=False)]
        target = torch.tensor([[float(c in s.visible) for c in CLASS_NAMES] for s in batch], device=device)
        patches = torch.tensor(np.stack([patch_labels(s) for s in batch]), device=device)
        out = tower(pixel_values=pixel_values(processor, batch).to(device), output_hidden_states=True)
        hidden = out.last_hidden_state[:, 1:].mean(1)
        loss = F.binary_cross_entropy_with_logits(head(hidden), target)
        loss = loss + F.cross_entropy(dense(out.hidden_states[layer][:, 1:]).flatten(0, 1), patches.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        log.append({"stage": 0, "step": step, "loss": loss.item()})
        if step % 25 == 0 or step == cfg.vision_steps - 1:
            say(f"stage 0 step {step} loss {loss.item():.4f}")
    tower.eval()


@torch.no_grad()
def vision_features(model, processor, scenes, device, batch: int = 32) -> torch.Tensor:
    """LLaVA's selected features (layer ``vision_feature_layer``, CLS dropped), fp16, on CPU.

    Args:
        model: the model (its vision tower).
        processor: its processor (the pixel values).
        scenes: the scenes, one image each.
        device: where the tower is.
        batch: images per forward.

    Returns:
        [n_scenes, 576, vision hidden] float16 on the CPU.
    """
    tower, layer = model.model.vision_tower, model.config.vision_feature_layer
    out = []
    for i in range(0, len(scenes), batch):
        hs = tower(pixel_values=pixel_values(processor, scenes[i:i + batch]).to(device),
                   output_hidden_states=True).hidden_states
        out.append(hs[layer][:, 1:].to(torch.float16).cpu())
    return torch.cat(out)


class SinkPrior:
    """An auxiliary loss standing in for the attention sink that Llama-2's text pre-training
    leaves in LLaVA-1.5 (Xiao et al. 2023; Gu et al. 2024 find it emerges only after long
    pre-training, far beyond a CPU budget).

    For every text query after the image, at every layer from ``sink_from_layer`` on, the
    head-mean attention probability on BOS (key 0) is computed from the layer's own queries
    and keys (RoPE applied, causal), and ``relu(log sink_target - log p_BOS)`` is averaged
    into the loss (in log space, because a hinge on p itself has gradient p(1 - p), which
    vanishes when BOS starts with almost no mass). It is a hinge: once the mean over heads
    reaches the target it stops pushing, so single heads stay free to read the image. Nothing is set by hand: the
    model learns
    where to put the rest of its attention from the answer loss.

    Forward pre-hooks on each attention module capture its (normalised) input and RoPE
    tables; the loss is computed after the forward, so training can keep SDPA.
    """

    def __init__(self, model, from_layer: int):
        self.seen: dict[int, tuple] = {}
        layers = model.model.language_model.layers
        self.attn = {i: layers[i].self_attn for i in range(from_layer, len(layers))}
        self.handles = [a.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                        for i, a in self.attn.items()]

    def _hook(self, i):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            self.seen[i] = (hidden, kwargs["position_embeddings"])
        return hook

    def loss(self, rows: torch.Tensor, target: float, visible: torch.Tensor | None = None) -> torch.Tensor:
        """``rows``: bool [B, T], the query positions the prior acts on; ``visible``: bool
        [B, T, T], which keys each query sees (default: causal)."""
        from transformers.models.llama.modeling_llama import (
            apply_rotary_pos_emb,
            repeat_kv,
        )

        out = []
        for i, attn in self.attn.items():
            hidden, (cos, sin) = self.seen.pop(i)
            b, n, _ = hidden.shape
            q = attn.q_proj(hidden).view(b, n, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(hidden).view(b, n, -1, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = repeat_kv(k, attn.num_key_value_groups)
            first = int(rows.any(0).nonzero()[0])  # queries start after the image
            scores = (q[:, :, first:] @ k.transpose(-1, -2)).float() * attn.scaling
            if visible is None:
                seen = torch.ones(n - first, n, dtype=torch.bool, device=hidden.device).tril(first)
            else:
                seen = visible[:, None, first:, :]
            scores = scores.masked_fill(~seen, float("-inf"))
            log_p = scores[..., 0] - torch.logsumexp(scores, -1)  # [B, H, n - first]
            log_mean = torch.logsumexp(log_p, 1) - math.log(log_p.shape[1])  # log of the head mean
            out.append(F.relu(math.log(target) - log_mean)[rows[:, first:]])
        # no layer from sink_from_layer on: zero
        return torch.cat(out).mean() if out else rows.new_zeros((), dtype=torch.float32)

    def close(self):
        for h in self.handles:
            h.remove()


def lm_step(model, feats: torch.Tensor, batch: dict, t: Tokens, cfg: TrainConfig, device, sink=None):
    """Losses of one stage-1 batch of :class:`Branches` rows built from cached vision features
    (no vision tower): the answer loss, balanced between "yes" and "no" questions as POPE is;
    the caption answer; next-token loss on the question tokens; the sink prior if given.

    Args:
        model: the model (projector, language model, head).
        feats: [batch, 576, vision hidden] the rows' cached features (:func:`vision_features`).
        batch: :meth:`Branches.batch` of the rows' scenes.
        t: the token ids.
        cfg: the loss weights (``caption_weight``, ``text_loss``, ``sink_weight``, ``sink_target``).
        device: where the batch goes.
        sink: the :class:`SinkPrior` once it is on; None: no sink loss.

    Returns:
        ``(loss, parts)``: the weighted total (a tensor to backpropagate) and each part as a float.
    """
    ids, pos, visible = (batch[k].to(device) for k in ("input_ids", "position_ids", "visible"))
    predict, answer, yes, caption = (batch[k].to(device) for k in ("predict", "answer", "yes", "caption"))
    embeds = model.get_input_embeddings()(ids)
    image = model.model.multi_modal_projector(feats.to(device, embeds.dtype))
    embeds = embeds.masked_scatter((ids == t.image).unsqueeze(-1), image.reshape(-1, image.shape[-1]).to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=visible[:, None],
                                        position_ids=pos).last_hidden_state
    logits = model.lm_head(hidden[:, :-1][predict])  # position i predicts token i + 1 of its branch
    losses = F.cross_entropy(logits.float(), ids[:, 1:][predict], reduction="none")
    a, y, c = answer[predict], yes[predict], caption[predict]
    answer_loss = 0.5 * losses[a & y & ~c].mean() + 0.5 * losses[a & ~y & ~c].mean()
    caption_loss = losses[a & c].mean()
    text_loss = losses[~a].mean()
    loss = answer_loss + cfg.caption_weight * caption_loss + cfg.text_loss * text_loss
    parts = {"answer_loss": answer_loss.item(), "caption_loss": caption_loss.item(), "text_loss": text_loss.item()}
    if sink is not None:
        rows = (pos >= PREFIX_LEN - 1) & (batch["branch"].to(device) != -2)  # text queries after the image
        sink_loss = sink.loss(rows, cfg.sink_target, visible)
        loss = loss + cfg.sink_weight * sink_loss
        parts["sink_loss"] = sink_loss.item()
    return loss, parts


def train_language(model, processor, scenes, feats, cfg: TrainConfig, device, log, say,
                   checkpoint: Path | None = None, every: int = 0) -> None:
    """Stage 1: the projector, language model and head on the scenes' questions (:func:`lm_step`), the vision
    tower frozen; the sink prior joins at ``cfg.sink_start`` of the steps (with a ``sink_weight``).

    Args:
        model: the model trained in place (left in eval mode).
        processor: its processor (saved with checkpoints).
        scenes: the training scenes, drawn in shuffled epochs of ``cfg.batch_size``.
        feats: the scenes' cached vision features (:func:`vision_features`), row i for ``scenes[i]``.
        cfg: the steps, batch size, learning rates and schedule, the text mix and the sink prior.
        device: where the batches go.
        log: gets one record per step (``stage`` 1, ``step``, ``loss`` and its parts).
        say: prints progress every 20 steps.
        checkpoint: the folder a checkpoint is saved to; None: none.
        every: save a checkpoint every this many steps (0: never; never after the last step).
    """
    model.model.vision_tower.requires_grad_(False)
    trainable = torch.nn.ModuleDict({"projector": model.model.multi_modal_projector,
                                     "lm": model.model.language_model, "head": model.lm_head})
    params = [p for p in trainable.parameters() if p.requires_grad]
    groups = _param_groups(trainable, cfg.weight_decay)
    proj = {id(p) for p in model.model.multi_modal_projector.parameters()}
    groups = [{**g, "params": [p for p in g["params"] if id(p) not in proj]} for g in groups] + \
        [{"params": list(model.model.multi_modal_projector.parameters()), "weight_decay": 0.0,
          "lr": cfg.lr * cfg.projector_lr_mult}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, cfg.steps, cfg.warmup, cfg.min_lr_ratio))
    rng = np.random.default_rng(cfg.seed)
    t = Tokens(processor.tokenizer)
    order: list[int] = []
    branches = Branches(t)
    sink_on = int(cfg.sink_start * cfg.steps) if cfg.sink_weight else None
    sink = None
    trainable.train()
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        if step == sink_on:
            sink = SinkPrior(model, cfg.sink_from_layer)
            say(f"stage 1 step {step}: the attention-sink prior is on")
        if len(order) < cfg.batch_size:
            order += list(rng.permutation(len(scenes)))
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        loss, parts = lm_step(model, feats[idx], branches.batch([scenes[i] for i in idx]), t, cfg, device, sink)
        if cfg.text_mix:
            mix = [scenes[i] for i in rng.choice(len(scenes), size=cfg.text_mix, replace=False)]
            loss = loss + cfg.text_mix_weight * text_step(model, text_batch(mix, rng, t), device)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        log.append({"stage": 1, "step": step, "loss": loss.item(), **parts})
        if step % 20 == 0 or step == cfg.steps - 1:
            recent = [r for r in log[-20:] if r["stage"] == 1]
            say(f"stage 1 step {step} " + " ".join(
                f"{k.replace('_', ' ')} {np.mean([r[k] for r in recent if k in r]):.4f}"
                for k in ("answer_loss", "caption_loss", "text_loss", "sink_loss") if k in parts)
                + f" lr {sched.get_last_lr()[0]:.2e} {time.perf_counter() - t0:.0f}s")
        if checkpoint is not None and every and (step + 1) % every == 0 and step + 1 < cfg.steps:
            save(model, processor, checkpoint)
            trainable.train()
            say(f"checkpoint at step {step + 1} -> {checkpoint}")
    if sink is not None:
        sink.close()
    model.eval()


def save(model, processor, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.set_attn_implementation("eager")
    model.config._attn_implementation = "eager"
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    model.set_attn_implementation("sdpa")


def train(out_dir: Path, cfg: TrainConfig = TrainConfig(), device: str | None = None,
          say=print, sizes: dict | None = None, checkpoint_every: int = 0, init_from: Path | None = None) -> dict:
    """Train from scratch (or continue from the model in ``init_from``) and save a
    ``from_pretrained``-loadable directory.

    Args:
        out_dir: the folder the model, ``training.json`` and ``training_log.json`` are written to (its
            ``checkpoint/`` gets the checkpoints).
        cfg: every stage's settings.
        device: where to train; None: CUDA if available, else the CPU.
        say: prints progress.
        sizes: :func:`~mclcbf_diag.embedded.build.build_config`'s sizes of a fresh model; None: the defaults.
        checkpoint_every: save a checkpoint every this many stage-1 steps (0: never).
        init_from: a saved model to continue from instead of a fresh one (``sizes`` then unused).

    Returns:
        The training summary written to ``training.json`` (config, sizes, device, timings, final answer loss,
        parameter count, machine).
    """
    out_dir = Path(out_dir)  # a str too: the summary is written there after training, when a failure costs most
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    torch.set_flush_denormal(True)
    processor = build_processor()
    if init_from is not None:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(init_from, dtype=torch.float32).to(device)
    else:
        model = build_model(processor.tokenizer, seed=cfg.seed, **(sizes or {})).to(device)
    model.set_attn_implementation("sdpa")  # same maths as eager, far faster to train; saved as eager
    log: list[dict] = []
    t0 = time.perf_counter()
    scenes = [sample_scene(i, cfg.seed) for i in range(cfg.pool)]
    if cfg.vision_steps:
        pretrain_vision(model, processor, scenes, cfg, device, log, say)
    if cfg.text_steps:
        pretrain_text(model, scenes, cfg, device, log, say, processor.tokenizer)
    t1 = time.perf_counter()
    feats = vision_features(model, processor, scenes, device)
    t2 = time.perf_counter()
    say(f"cached features {tuple(feats.shape)} in {t2 - t1:.0f}s")
    train_language(model, processor, scenes, feats, cfg, device, log, say,
                   checkpoint=out_dir / "checkpoint", every=checkpoint_every)
    t3 = time.perf_counter()
    save(model, processor, out_dir)
    summary = {"config": asdict(cfg), "sizes": sizes or {}, "device": device,
               "init_from": None if init_from is None else Path(init_from).name,
               "threads": torch.get_num_threads(), "vision_and_text_seconds": t1 - t0, "feature_seconds": t2 - t1,
               "language_seconds": t3 - t2, "total_seconds": t3 - t0,
               "final_answer_loss": (float(np.mean([r["answer_loss"] for r in log[-50:] if r["stage"] == 1]))
                                     if cfg.steps else None),
               "parameters": sum(p.numel() for p in model.parameters()),
               "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}"}
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "training_log.json").write_text(json.dumps(log) + "\n")
    return summary


if __name__ == "__main__":  # the one entry point is the command line's (its options, checks and manifest)
    raise SystemExit("run `mclcbf-diag embedded train` (the same options: --out DIR --checkpoint-every 250 …); "
                     "this module has no command of its own")
