"""How the first answer token is chosen: greedily (the default) or sampled, seeded and reproducible.

POPE's first-token scoring reads the answer greedily, from the sign of logit(Yes) − logit(No)
(:mod:`.outcomes`): "greedy first token". Published baselines also report sampled answers
(VCD's released POPE script samples at temperature 1), and greedy against sampled moves
LLaVA-1.5-7B's adversarial accuracy by points, so the choice is a setting of every run
(:class:`Decoding`, recorded in the run's identity when it is not greedy).

A sampled answer draws the first token from softmax(warped scores), where the warping is
transformers' own order for sampling: temperature, then top-k, then top-p (nucleus; the
smallest set of tokens whose probability reaches ``top_p``, at least one kept). A token a
decoding-level method ruled out (−inf) is never drawn. The draw is an inverse-CDF one over
the vocabulary in token order, with u from a generator seeded by the run's seed and the
question's key (:func:`uniform`): the same question gets the same u in any batch and in both
conditions, so a baseline and an intervention with the same distribution give the same token
(common random numbers: the paired outcome is "unchanged" exactly where nothing changed).
The answer is Yes or No when the drawn token is one of their spellings; any other token is
no Yes/No answer (not valid, as a greedy top token outside them is).

``beam`` applies to generated text only (``--generate N``): a first token chosen by a beam
search of width ``num_beams`` is the greedy one's.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:  # torch only where logits are read: the settings load without it
    import torch

STRATEGIES = ("greedy", "sample", "beam")


@dataclass(frozen=True)
class Decoding:
    """How answers are chosen (see the module docstring); the defaults are greedy first-token answers."""

    strategy: str = "greedy"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    num_beams: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise UserError(f"--decoding {self.strategy}: not a strategy; choose one of {', '.join(STRATEGIES)}")
        if not self.temperature > 0:
            raise UserError(f"--temperature {self.temperature}: must be > 0 (1: the model's own distribution)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p}: a probability mass; use a value in (0, 1] (1: off)")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k}: must be >= 0 (0: off)")
        if self.num_beams < 1:
            raise UserError(f"--num-beams {self.num_beams}: must be >= 1")
        if self.strategy == "beam" and self.num_beams < 2:
            raise UserError("--decoding beam needs --num-beams 2 or more (one beam is greedy decoding)")
        if self.strategy != "beam" and self.num_beams != 1:
            raise UserError(f"--num-beams {self.num_beams} applies to --decoding beam only")
        if self.strategy == "greedy" and (self.temperature, self.top_p, self.top_k) != (1.0, 1.0, 0):
            raise UserError("--temperature, --top-p and --top-k apply to --decoding sample only")

    @property
    def sampled(self) -> bool:
        return self.strategy == "sample"

    def identity(self) -> dict | None:
        """What a run's identity records (None for greedy, the default, so greedy identities stay as they were)."""
        return None if self.strategy == "greedy" else asdict(self)

    def describe(self) -> str:
        if self.strategy == "greedy":
            return "greedy first token"
        if self.strategy == "beam":
            return f"beam search of width {self.num_beams} (generated text; the first token is the greedy one)"
        parts = [f"temperature {self.temperature:g}"] + ([f"top-k {self.top_k}"] if self.top_k else []) + \
            ([f"top-p {self.top_p:g}"] if self.top_p < 1 else [])
        return f"sampled first token ({', '.join(parts)}, seed {self.seed})"

    def generate_kwargs(self) -> dict:
        """``generate``'s arguments for generated text."""
        if self.strategy == "sample":
            return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                    "top_k": self.top_k or None}
        return {"do_sample": False, "num_beams": self.num_beams}


def warp(scores: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Scores [..., vocab] after temperature, top-k and top-p, in transformers' order; filtered tokens at −inf.

    Args:
        scores: [..., vocab] the logits (or a decoding-level method's scores).
        temperature: divides the scores.
        top_k: keep the k highest scores (ties with the k-th kept too); 0: no top-k.
        top_p: keep the smallest set of top tokens whose probability reaches ``top_p`` (the top token
            always); 1: no top-p.

    Returns:
        float32 [..., vocab].
    """
    import torch

    s = scores.float() / temperature
    if top_k:
        k = min(top_k, s.shape[-1])
        kth = torch.topk(s, k, dim=-1).values[..., -1:]
        s = s.masked_fill(s < kth, -torch.inf)
    if top_p < 1:
        sorted_s, order = torch.sort(s, dim=-1, descending=False)
        cum = sorted_s.softmax(-1).cumsum(-1)
        drop = cum <= (1 - top_p)
        drop[..., -1:] = False  # the top token is always kept
        s = s.masked_fill(drop.scatter(-1, order, drop), -torch.inf)
    return s


def uniform(seed: int, key: str) -> float:
    """u ∈ [0, 1) for one question: from ``seed`` and its key alone (the same in any batch, in both conditions)."""
    import torch

    digest = hashlib.sha256(f"{int(seed)}\x00{key}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return float(torch.rand((), generator=g, dtype=torch.float64))


def sample_token(scores: torch.Tensor, decoding: Decoding, key: str) -> int:
    """The token drawn from one row's scores [vocab] (inverse CDF over the vocabulary in token order).

    Args:
        scores: one row's scores [vocab] (any shape, flattened), before the warps.
        decoding: the sampled decoding: its temperature, top-k and top-p warp the scores, its seed draws u.
        key: the draw's key (e.g. the question and step): the same key and seed give the same u in any batch
            and in both conditions (:func:`uniform`).

    Returns:
        The token id; never one the warps gave probability 0.
    """
    import torch

    w = warp(scores.reshape(-1), decoding.temperature, decoding.top_k, decoding.top_p)
    p = torch.softmax(w.double(), -1)
    cdf = p.cumsum(-1)
    u = uniform(decoding.seed, key) * float(cdf[-1])
    token = int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype), right=True)[0])
    token = min(token, p.shape[-1] - 1)
    while p[token] == 0 and token > 0:  # never a ruled-out token (u at a step's edge)
        token -= 1
    return token
