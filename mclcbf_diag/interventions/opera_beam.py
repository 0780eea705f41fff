"""OPERA's beam search: the over-trust penalty on the generated window's attention columns, and the rollback.

Paper: Huang, Dong, Zhang et al., "OPERA: Alleviating Hallucination in Multi-Modal Large Language
Models via Over-Trust Penalty and Retrospection-Allocation", CVPR 2024. Released code:
github.com/shikiw/OPERA, ``transformers-4.29.2/src/transformers/generation/utils.py``
(``opera_beam_search``; ``generation/beam_search.py``'s ``BeamSearchScorer`` and ``BeamHypotheses``);
POPE: ``--beam 5 --scale_factor 50 --threshold 15 --num_attn_candidates 5 --penalty_weights 1``,
``max_new_tokens=10``, the window ``window_size=512``. One question at a time (the released batch of one).

Every step, for each of the ``num_beams`` beams (s tokens generated so far):

* **Candidates.** The ``candidates`` tokens c of the highest raw logits z[c] (``topk``, sorted). Each is run
  one position further over the beam's KV cache; the new position's last-layer attention, max over
  heads, renormalised to sum 1, is the candidate's row.
* **Window.** The generated positions' rows (each kept, max over heads and renormalised, from the step
  that read its token) and the candidate's, restricted to the generated columns (``response_start``: the
  prompt's length), form a lower-triangular (s+1)×(s+1) matrix, times ``scale_factor``. Column j's score
  is 1e-7·∏_{i ≥ j} window[i, j] (its entry on the diagonal and below), stored in float16 as the released
  code stores it (``attn_local_scores`` is a float16 tensor). The penalty's column is the argmax.
* **Penalty.** While the response holds at most 10 tokens (candidate included) the penalty is −attn_img(c),
  the candidate row's sum over the image tokens; after that it is the top column's score. The candidate's
  score is z[c] − ``weight``·penalty; every other token gets −999; ``log_softmax`` plus the beam's score
  ranks the beams' 2·``num_beams`` continuations (``BeamSearchScorer``, length penalty 1, its length the
  released layout's: the image one placeholder token). ``pope``'s baseline of a beam search is transformers'
  ``generate``, whose finished hypotheses are normalised by the generated length only: a steered − baseline
  difference of generated answers mixes the penalty with that change of scorer (no run here separates them).
* **Rollback.** Each step appends, per beam, the mode over its candidates of their top columns to a
  history; the step's column is the mode of those over the beams. When for every beam that column
  (a generated position ≥ 10) recurs in the history more than ``threshold`` times, the search goes back:
  to the state before the token after that column (``rollback_pos`` = column + 1; one earlier once a
  position was rolled back to ``candidates`` times; none at all once that one was too), the tokens the
  beams had chosen there are ruled out (−999, cumulatively for that position), and the step's scores are
  the model's full logits (no candidates, no penalty), as the released code does it: the revived state's
  scorer is the very object kept in the history, and the history is trimmed as there.

With the released POPE settings (``max_new_tokens=10``) the response never passes 10 tokens, so the
penalty is the image share throughout and no rollback can happen (the column must be ≥ 10).

Indices are re-indexed to llava-hf's layout: ``image_start … image_end`` are the row's image tokens, and
``response_start`` the first generated position (the prompt's length, 576 image tokens expanded, as the
released ``len(input_ids) + 576 − 1``). The model is reached through a :class:`Stepper` (:class:`ModelStepper`
on a loaded model), so the search itself is plain tensor arithmetic that a test can drive with scripted
attention. :class:`Search` records every step's penalties, column and rollback (:attr:`Search.events`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..models.mrope import prompt_positions
from ..models.shared_prefix import SharedPrefix, continuation_mask, continuing

IMAGE_PHASE = 10  # responses of at most this many tokens are penalised by the image share (released constant)
FIRST_COLUMN = 10  # no rollback to a column before this (released: ``if rollback_loc < 10: assert False``)
WINDOW = 512  # the released ``window_size``: the history kept
FILL = -999.0  # the released score of a ruled-out token


class Stepper(Protocol):
    """What the search asks of the model, for one question's ``beams`` rows."""

    def prefill(self, generated: torch.Tensor) -> torch.Tensor:
        """Run the prompt plus ``generated`` [beams, s] from scratch (a new cache): the last logits [beams, V]."""

    def step(self, tokens: torch.Tensor, beam_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reorder the cache by ``beam_idx``, read ``tokens`` [beams]: ``(logits [beams, V], the new position's
        last-layer attention row, max over heads [beams, keys])``."""

    def candidates(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows [beams, C, keys + 1]: each beam continued by each of its candidates ``tokens`` [beams, C] (the cache
        unchanged), the new position's last-layer attention, max over heads."""


# --------------------------------------------------------------------------- the released beam scorer
class Hypotheses:
    """``BeamHypotheses`` of transformers 4.29 for one question (``early_stopping=False``)."""

    def __init__(self, num_beams: int, length_penalty: float = 1.0):
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.beams: list[tuple[float, list[int]]] = []
        self.worst = 1e9

    def add(self, tokens: list[int], sum_logprobs: float, length: int) -> None:
        score = sum_logprobs / (length ** self.length_penalty)
        if len(self.beams) < self.num_beams or score > self.worst:
            self.beams.append((score, tokens))
            if len(self.beams) > self.num_beams:
                order = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[order[0][1]]
                self.worst = order[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        if len(self.beams) < self.num_beams:
            return False
        return self.worst >= best_sum_logprobs / cur_len ** self.length_penalty


@dataclass
class Scorer:
    """``BeamSearchScorer.process``/``finalize`` for one question; ``prompt_len``: the prompt's length in the released
    layout (the image one token), which a hypothesis's length counts."""

    num_beams: int
    prompt_len: int
    ends: frozenset
    hyps: Hypotheses = None
    done: bool = False

    def __post_init__(self):
        self.hyps = Hypotheses(self.num_beams)

    def process(self, generated: torch.Tensor, scores, tokens, beams):
        """The next beams from the 2·num_beams best candidates (``BeamSearchScorer.process``).

        A candidate that ends a sequence among the first ``num_beams`` becomes a hypothesis; the others continue, up to
        ``num_beams`` of them.

        Args:
            generated: [beams, n] the tokens generated so far.
            scores: the candidates' beam scores, best first.
            tokens: the candidates' tokens.
            beams: the beam each candidate extends.

        Returns:
            ``(scores, tokens, beam_idx)`` of the next beams.
        """
        cur_len = self.prompt_len + generated.shape[1] + 1
        out_s, out_t, out_b = [], [], []
        for rank, (t, s, b) in enumerate(zip(tokens.tolist(), scores.tolist(), beams.tolist())):
            if t in self.ends:
                if rank < self.num_beams:
                    self.hyps.add(generated[b].tolist(), s, self.prompt_len + generated.shape[1])
            else:
                out_s.append(s)
                out_t.append(t)
                out_b.append(b)
            if len(out_s) == self.num_beams:
                break
        self.done = self.done or self.hyps.is_done(float(scores.max()), cur_len)
        return torch.tensor(out_s), torch.tensor(out_t, dtype=torch.long), torch.tensor(out_b, dtype=torch.long)

    def finalize(self, generated: torch.Tensor, beam_scores: torch.Tensor) -> tuple[list[int], float]:
        """The best hypothesis: ``(tokens, score)``."""
        if not self.done:
            for b in range(self.num_beams):
                self.hyps.add(generated[b].tolist(), float(beam_scores[b]), self.prompt_len + generated.shape[1])
        score, tokens = sorted(self.hyps.beams, key=lambda x: x[0])[-1]
        return tokens, score


# --------------------------------------------------------------------------- the penalty
def column_scores(window: torch.Tensor) -> torch.Tensor:
    """[..., n] 1e-7·∏_{i ≥ j} ``window``[..., i, j] per column j of a scaled [..., n, n] window, through float16."""
    n = window.shape[-1]
    cols = torch.stack([1e-7 * window[..., j:, j].prod(-1) for j in range(n)], -1)
    return cols.half().float()


def grown(local: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[..., s+1, s+1]: ``local`` [..., s, s] with a zero column appended and ``rows`` [..., s+1] as its last row."""
    s = local.shape[-1]
    out = local.new_zeros(*rows.shape[:-1], s + 1, s + 1)
    out[..., :s, :s] = local
    out[..., s, :] = rows
    return out


@dataclass
class Search:
    """One question's OPERA beam search (see the module docstring). ``image``: bool [prompt] the image keys."""

    stepper: Stepper
    image: torch.Tensor
    num_beams: int
    max_new_tokens: int
    ends: frozenset
    prompt_len: int  # in the released layout (the image one token)
    candidates: int = 5
    weight: float = 1.0
    scale_factor: float = 50.0
    threshold: int = 15
    events: list = field(default_factory=list)

    def run(self) -> tuple[list[int], float]:
        """``(the best hypothesis's tokens, its score)``; :attr:`events` holds each step's penalties and rollback.
        Over 60 lines: the released loop's state (beams, scorer, window, history) in one place."""
        beams, T = self.num_beams, int(self.image.shape[0])
        gen = torch.zeros(beams, 0, dtype=torch.long)
        beam_scores = torch.zeros(beams)
        beam_scores[1:] = -1e9
        scorer = Scorer(beams, self.prompt_len, self.ends)
        local = torch.zeros(beams, 0, 0)
        self.history, self.locs, self.max_rb = [], [], torch.zeros(WINDOW)
        self.rejects = [[] for _ in range(WINDOW)]
        logits = self.stepper.prefill(gen).float()
        next_tokens = beam_idx = None
        while True:
            s = gen.shape[1]
            state = {"gen": gen, "scorer": copy.deepcopy(scorer), "beam_scores": beam_scores.clone(), "local": local,
                     "next_tokens": next_tokens, "beam_idx": beam_idx}
            cand_scores, cand = logits.topk(min(self.candidates, logits.shape[-1]), dim=-1)
            rows = self.stepper.candidates(cand).float()
            rows = rows / rows.sum(-1, keepdim=True)
            attn_img = rows[..., :T][..., self.image].sum(-1)  # [beams, C]
            window = self.scale_factor * grown(local[:, None].expand(-1, cand.shape[1], -1, -1), rows[..., T:])
            col_scores, col_locs = column_scores(window).max(-1)  # [beams, C]
            per_beam = col_locs.mode(-1).values
            loc = int(per_beam.mode().values)
            kind = "image" if s + 1 <= IMAGE_PHASE else "column"
            penalty = -attn_img if kind == "image" else col_scores
            self.locs.append(per_beam)
            cand_scores = cand_scores - self.weight * penalty
            if len(self.history) >= WINDOW:
                self.history.pop(0)
            self.history.append(state)
            event = {"step": len(self.events), "response": s + 1, "kind": kind, "column": loc,
                     "penalty": penalty.tolist(), "candidates": cand.tolist(), "rollback": None}
            back = self._rollback(s, loc, cand.shape[1], logits.shape[-1])
            if back is None:
                scores = torch.full_like(logits, FILL).scatter(-1, cand, cand_scores)
            else:
                scores, revived, event["rollback"] = back
                gen, scorer, beam_scores, local = (revived[k] for k in ("gen", "scorer", "beam_scores", "local"))
            self.events.append(event)
            logp = torch.log_softmax(scores, -1) + beam_scores[:, None]
            V = logp.shape[-1]
            top, flat = logp.reshape(-1).topk(2 * beams)
            beam_scores, next_tokens, beam_idx = scorer.process(gen, top, flat % V, flat // V)
            event.update(chosen=next_tokens.tolist(), beam_idx=beam_idx.tolist(), beam_scores=beam_scores.tolist())
            gen = torch.cat([gen[beam_idx], next_tokens[:, None]], -1)
            if scorer.done or gen.shape[1] >= self.max_new_tokens:
                break
            logits, row = self.stepper.step(next_tokens, beam_idx)
            logits, row = logits.float(), row.float()
            local = grown(local[beam_idx], (row / row.sum(-1, keepdim=True))[:, T:])
        return scorer.finalize(gen, beam_scores)

    def _rollback(self, s: int, loc: int, n_cand: int, vocab: int):
        """The released retrospection: None (no rollback), or ``(scores, revived state, record)``."""
        history = torch.stack(self.locs, -1)  # [beams, steps]
        if not all(int((h == loc).sum()) > self.threshold for h in history) or loc < FIRST_COLUMN:
            return None
        pos = loc + 1
        if self.max_rb[pos] >= n_cand:
            pos -= 1
            if self.max_rb[pos] >= n_cand:
                return None
        self.max_rb[pos] += 1
        if s + 1 - pos > WINDOW + 1:
            pos = max(1, s - WINDOW)
        for j in range(s + 1 - pos - 2):
            self.history.pop(-1)
            self.locs.pop(-1)
            self.rejects[-(j + 1)] = []
        back, ahead = self.history[-2], self.history[-1]
        logits = self.stepper.prefill(back["gen"]).float()
        self.history.pop(-1)
        self.locs.pop(-1)
        self.rejects[pos + 1] = []
        logits = logits - (999.0 + logits.min(-1, keepdim=True).values)
        reject = ahead["beam_idx"] * vocab + ahead["next_tokens"]
        if len(self.rejects[pos]) > 0:
            reject = torch.cat([self.rejects[pos], reject], -1)
        self.rejects[pos] = reject
        scores = logits.reshape(-1).scatter(0, reject, FILL).reshape(logits.shape)
        record = {"column": loc, "to": pos, "revived": int(back["gen"].shape[1]), "rejected": reject.tolist()}
        return scores, back, record


# --------------------------------------------------------------------------- the model
class ModelStepper:
    """:class:`Stepper` over a loaded model for one unpadded question (``inputs``: a batch of one), ``beams`` rows.

    The prompt runs once and its cache is repeated for the beams; a rollback re-runs the prompt with the revived
    tokens from scratch (with its image, as the released code does). The last layer's attention is read by a
    forward hook on its attention module (eager attention returns the probabilities). Candidates continue each
    beam's cache as rows of one forward that share it (:mod:`mclcbf_diag.models.shared_prefix`), leaving it unchanged.
    """

    def __init__(self, lm, inputs: dict, beams: int):
        self.lm, self.beams = lm, beams
        self.inputs = {k: v for k, v in inputs.items() if k != "position_ids"}
        self.T = int(inputs["input_ids"].shape[1])
        self.embed = lm.model.get_input_embeddings()
        self.cache, self.length = None, self.T

    def _positions(self, first: int, last: int, rows: int) -> torch.Tensor:
        ids = torch.cat([self.inputs["input_ids"][:1], self.inputs["input_ids"].new_zeros(1, last - self.T)], -1)
        one = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.inputs.get("image_grid_thw") is not None:  # Qwen-VL: M-RoPE over the image's grid
            one["image_grid_thw"] = self.inputs["image_grid_thw"]
        return prompt_positions(self.lm, one, first, rows)

    def _last_layer(self, got: list):
        attention = self.lm.adapter.layer_part(self.lm.model, self.lm.n_layers - 1, "layer_attention")
        return attention.register_forward_hook(lambda module, args, output: got.append(output[1][:, :, -1].detach()))

    def prefill(self, generated: torch.Tensor) -> torch.Tensor:
        ids = self.inputs["input_ids"]
        full = torch.cat([ids, generated.to(ids.device)[:1]], -1)  # one row: the cache is repeated for the beams
        feed = {**self.inputs, "input_ids": full, "attention_mask": torch.ones_like(full),
                "position_ids": self._positions(0, full.shape[1], 1)}
        if generated.shape[1] and not bool((generated == generated[:1]).all()):  # beams that differ: one row each
            full = torch.cat([ids.expand(len(generated), -1), generated.to(ids.device)], -1)
            feed = {k: (v.expand(len(generated), *v.shape[1:]) if torch.is_tensor(v) and v.dim() and v.shape[0] == 1
                        else v) for k, v in self.inputs.items()}
            feed.update(input_ids=full, attention_mask=torch.ones_like(full),
                        position_ids=self._positions(0, full.shape[1], len(generated)))
        with torch.no_grad():
            out = self.lm.model(**feed, use_cache=True, logits_to_keep=1)
        self.cache = self.lm.adapter.output_cache(self.lm.model, out)
        logits = out.logits[:, -1].float()
        if len(logits) == 1:
            self.cache.batch_repeat_interleave(len(generated))
            logits = logits.expand(len(generated), -1).clone()
        self.length = full.shape[1]
        return logits

    def step(self, tokens: torch.Tensor, beam_idx: torch.Tensor):
        got: list = []
        self.cache.reorder_cache(beam_idx)
        hook = self._last_layer(got)
        try:
            with torch.no_grad():
                out = self.lm.model(inputs_embeds=self.embed(tokens[:, None]),
                                    attention_mask=torch.ones(len(tokens), self.length + 1, dtype=torch.long),
                                    position_ids=self._positions(self.length, self.length + 1, len(tokens)),
                                    use_cache=True, logits_to_keep=1, **self.lm.adapter.cache_kwargs(self.lm.model,
                                                                                                     self.cache))
        finally:
            hook.remove()
        self.length += 1
        return out.logits[:, -1].float(), got[0].float().amax(1)

    def candidates(self, tokens: torch.Tensor) -> torch.Tensor:
        B, C = tokens.shape
        L = self.length
        owner = torch.arange(B).repeat_interleave(C)
        prefix = SharedPrefix([layer.keys for layer in self.cache.layers],
                              [layer.values for layer in self.cache.layers], L, owner)
        new = self.embed(tokens.reshape(-1, 1))
        seen = torch.ones(B * C, L + 1, dtype=torch.long)
        got: list = []
        hook = self._last_layer(got)
        try:
            with torch.no_grad(), continuing(self.lm, prefix):
                self.lm.model(inputs_embeds=new, attention_mask=continuation_mask(seen, L, new.dtype),
                              position_ids=self._positions(L, L + 1, B * C), use_cache=False, logits_to_keep=1)
        finally:
            hook.remove()
        return got[0].float().amax(1).reshape(B, C, L + 1)


def opera_search(lm, inputs: dict, knobs, *, num_beams: int, max_new_tokens: int,
                 ends) -> tuple[list[int], Search]:
    """OPERA's beam search of one unpadded question.

    Args:
        lm: the loaded model.
        inputs: a batch of one question.
        knobs: OPERA's knobs (candidates, weight, scale_factor, threshold).
        num_beams: the beams.
        max_new_tokens: the most tokens generated.
        ends: the end-of-sequence ids.

    Returns:
        ``(the best hypothesis's generated tokens, the search)``.
    """
    image = (inputs["input_ids"][0] == lm.tokens.image_token_id).cpu()
    prompt_len = int(image.numel() - image.sum()) + 1  # the released layout: the image one placeholder token
    search = Search(ModelStepper(lm, inputs, num_beams), image, num_beams, max_new_tokens, frozenset(ends),
                    prompt_len, knobs.candidates, knobs.weight, knobs.scale_factor, knobs.threshold)
    tokens, _ = search.run()
    return tokens, search
