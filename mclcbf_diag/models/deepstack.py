"""Qwen3-VL's deepstack: vision features added to the image tokens' residual inside the text model.

Mechanism
---------
Qwen3-VL's vision tower returns, besides the merged image features that replace the
``<|image_pad|>`` embeddings, one more feature map per entry of ``deepstack_visual_indexes``
(intermediate tower layers, each through its own merger): ``deepstack_features``, ``levels`` lists
of ``[tokens, d]``. The text model's loop adds level ``ℓ`` to the hidden states at the image
positions (``visual_pos_masks``) right after decoder layer ``ℓ`` (``_deepstack_process``), so for
``ℓ < levels`` the residual entering layer ``ℓ + 1`` is layer ``ℓ``'s output plus these features at
the image tokens, and equal to it elsewhere.

What the toolkit reads stays exact without anything more: a layer's residual and the look-ahead's
keys are read from the layer's own input (after the add), and every per-layer record is the decision
token's (never an image token, where the two residuals are equal). Three things need this module:

* **Shared image features in a batch.** A batch hands the tower's output to the model
  (``mm_encoder_outputs``), which reads ``deepstack_features`` from it: :func:`encoder_output`
  builds it per prompt, :func:`rows` selects some prompts' (a view of some rows).
* **Forwards fed embeddings.** Many runs feed the prompt embeddings a plain forward kept (with the
  image features merged in) instead of ids and pixels: the steered run of ``trace``, explain's units,
  VISTA, AdHH, OPERA. The model then sees no image and adds no deepstack features, which would make
  those runs another model's. :func:`install` puts a forward pre-hook on the text model that keeps,
  whenever the model adds deepstack features itself, each image token's merged feature (its
  embedding, bit for bit) with that token's features of every level; and, when the text model is
  fed embeddings without them, finds the image tokens among the embeddings by those bits and
  passes their features, as the model would have. So the features travel with the image features
  they came from: a row of embeddings that is not an image's feature (text, a residual, an edited
  feature) gets none, as in a plain forward fed those embeddings.
* **Forwards that start at a later layer.** attribute's patching runs over the whole prompt start at
  layer ``L`` from a residual (the layers before it skipped, their output that residual):
  :func:`starting_at` gives them the prompt's deepstack features of the levels from ``L`` on (the
  earlier ones are in the residual already).

The table is bounded (:data:`KEPT_TOKENS` image tokens, the least recently used forgotten first). A
forward whose image tokens were forgotten (more distinct image tokens in flight than that) would run
without their features, another model's forward: the table remembers a hash of each forgotten token (the
last :data:`FORGOTTEN_TOKENS` of them) and such a forward raises a one-line :class:`UserError` naming the fix
(fewer images at once) instead. The toolkit's runs feed embeddings right after the forward that computed them,
a batch of images at most (a 640 × 480 COCO image is 20 × 15 = 300 image tokens of 32-px merged patches).
A forward with no image token copies only each row's first :data:`PREFIX` values to the CPU (the
pre-hook runs on every forward of the text model, which transformers always feeds embeddings); a row's
whole bits are compared only where those match a kept row's.
The features are kept on the model's device: ``levels · d`` values per image token.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from contextlib import contextmanager

import torch

from ..errors import UserError

PREFIX = 4
"""How many leading values of a row its first match is tried on (then its whole bits)."""

KEPT_TOKENS = 1 << 16
"""How many image tokens' deepstack features the table keeps (the least recently used forgotten first)."""

FORGOTTEN_TOKENS = 1 << 18
"""How many forgotten image tokens the table still knows (a hash each, the oldest dropped first), so that a forward
fed them raises instead of running without their features."""

_TABLES: "weakref.WeakKeyDictionary[torch.nn.Module, DeepstackTable]" = weakref.WeakKeyDictionary()


def levels(config) -> int:
    """How many deepstack levels ``config`` (a model's) adds (0: none, or not Qwen3-VL)."""
    vision = getattr(config, "vision_config", None)
    return len(getattr(vision, "deepstack_visual_indexes", None) or ())


class DeepstackTable:
    """Image tokens' merged features (their bytes) → their deepstack features ``[levels, d]``."""

    def __init__(self, limit: int = KEPT_TOKENS, forgotten_limit: int = FORGOTTEN_TOKENS):
        self.limit, self.forgotten_limit = limit, forgotten_limit
        self.table: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        # hash of a forgotten row's key → its prefix, the oldest first (a forward fed it raises)
        self.forgotten: OrderedDict[int, bytes] = OrderedDict()
        # the first PREFIX values' bits of each kept (or forgotten and still known) row → how many such rows begin so:
        # a forward's rows are copied to the CPU whole only where their first values match one (most forwards hold no
        # image token)
        self.prefixes: dict[bytes, int] = {}
        self.given: tuple[torch.Tensor, list[torch.Tensor]] | None = None  # set by starting_at

    def remember(self, embeds: torch.Tensor, mask: torch.Tensor, features: list[torch.Tensor]) -> None:
        """Keep the features ``features`` (per level ``[n, d]``) of the ``n`` image tokens ``mask`` marks in
        ``embeds`` [B, S, d]."""
        rows = embeds[mask.to(embeds.device)].detach()
        stacked = torch.stack([f.detach().to(rows.device, rows.dtype) for f in features], 1)  # [n, levels, d]
        for key, value in zip(_keys(rows), stacked):
            if key not in self.table and self.forgotten.pop(hash(key), None) is None:  # a forgotten one is counted
                self.prefixes[_prefix_of(key, rows)] = self.prefixes.get(_prefix_of(key, rows), 0) + 1
            self.table[key] = value
            self.table.move_to_end(key)
        while len(self.table) > self.limit:
            key, _ = self.table.popitem(last=False)
            self.forgotten[hash(key)] = _prefix_of(key, rows)
        while len(self.forgotten) > self.forgotten_limit:
            _, prefix = self.forgotten.popitem(last=False)
            self.prefixes[prefix] -= 1
            if not self.prefixes[prefix]:
                del self.prefixes[prefix]

    def find(self, embeds: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """``(visual_pos_masks [B, S], per level [n, d])`` for the image tokens found in ``embeds``, or None."""
        if not self.table:
            return None
        flat = embeds.detach().reshape(-1, embeds.shape[-1])
        heads = _keys(flat[:, :PREFIX])  # a few values a row cross to the CPU
        candidates = [i for i, h in enumerate(heads) if h in self.prefixes]
        if not candidates:
            return None
        full = dict(zip(candidates, _keys(flat[candidates])))
        keys = [full.get(i) for i in range(flat.shape[0])]
        hits = [self.table.get(k) if k is not None else None for k in keys]
        lost = sum(1 for k, h in zip(keys, hits) if h is None and k is not None and hash(k) in self.forgotten)
        if lost:
            raise UserError(f"a forward fed embeddings holds {lost} Qwen3-VL image token(s) whose deepstack features "
                            f"were forgotten (the last {self.limit:,} image tokens' are kept), so it would run "
                            "without them; run fewer images at once (a smaller --batch-size)")
        found = [h for h in hits if h is not None]
        if not found:
            return None
        for key, hit in zip(keys, hits):  # least recently used forgotten first
            if hit is not None:
                self.table.move_to_end(key)
        mask = torch.tensor([h is not None for h in hits], device=embeds.device).reshape(embeds.shape[:-1])
        stacked = torch.stack(found).to(embeds.device, embeds.dtype)
        return mask, list(stacked.unbind(1))


def _prefix_of(key: bytes, rows: torch.Tensor) -> bytes:
    """The key :func:`_keys` gives a row's first :data:`PREFIX` values, from the row's whole key."""
    tag = str(rows.dtype).encode()
    return key[:len(tag) + PREFIX * rows.element_size()]


def _keys(rows: torch.Tensor) -> list[bytes]:
    """Each row's exact bits (dtype included), as a dictionary key."""
    flat = rows.contiguous().cpu()
    raw = flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)
    tag = str(flat.dtype).encode()
    return [tag + bytes(r.numpy()) for r in raw.reshape(flat.shape[0], -1)]


def _pre_hook(table: DeepstackTable, module, args, kwargs):
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        return None
    given = kwargs.get("deepstack_visual_embeds")
    if given is not None:
        if kwargs.get("visual_pos_masks") is not None:
            table.remember(embeds, kwargs["visual_pos_masks"], list(given))
        return None
    found = table.find(embeds) if table.given is None else _per_row(table.given, embeds.shape[0])
    if found is None:
        return None
    kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"] = found
    return args, kwargs


def _per_row(given: tuple[torch.Tensor, list[torch.Tensor]], rows: int):
    """One prompt's ``(mask [1, S], per level [n, d])`` for ``rows`` rows of it (the features row after row)."""
    mask, features = given
    if mask.shape[0] == rows:
        return given
    return mask.expand(rows, -1), [f.repeat(rows, 1) for f in features]


@contextmanager
def starting_at(language_model: torch.nn.Module, embeds: torch.Tensor, layer: int):
    """Within the block, forwards of ``language_model`` that start at decoder layer ``layer`` (the layers before it
    skipped, the residual entering it given) over the whole prompt whose embeddings are ``embeds`` [1, S, d] get its
    image tokens' deepstack features from level ``layer`` on: the earlier levels are in the residual given already.
    Nothing for a model without deepstack features, or from a layer past them."""
    table = _TABLES.get(language_model)
    found = None if table is None else table.find(embeds)
    if found is None or layer >= len(found[1]):
        yield
        return
    mask, features = found
    table.given = (mask, [torch.zeros_like(f) if level < layer else f for level, f in enumerate(features)])
    try:
        yield
    finally:
        table.given = None


def install(model: torch.nn.Module, language_model: torch.nn.Module) -> None:
    """Give ``model``'s text model (``language_model``) the deepstack features of image tokens it is fed as
    embeddings (see the module docstring); once per model, nothing for a model without deepstack levels."""
    if levels(model.config) == 0 or language_model in _TABLES:
        return
    table = DeepstackTable()
    _TABLES[language_model] = table
    language_model.register_forward_pre_hook(lambda m, a, k: _pre_hook(table, m, a, k), with_kwargs=True)


def encoder_output(per_row: list[torch.Tensor], deepstack: list[list[torch.Tensor]] | None):
    """The tower's output the model merges (``mm_encoder_outputs["image"]``): ``per_row`` image features and, for
    Qwen3-VL, ``deepstack`` (per level, per row) beside them."""
    if deepstack is None:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=per_row)
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    return BaseModelOutputWithDeepstackFeatures(pooler_output=per_row, deepstack_features=deepstack)


def rows(output, idx: list[int]):
    """The tower's output (:func:`encoder_output`) of the batch's rows ``idx``, in that order."""
    feats = output.pooler_output
    picked = feats[idx] if torch.is_tensor(feats) else [feats[i] for i in idx]  # Gemma 3's are one stacked tensor
    deep = getattr(output, "deepstack_features", None)
    return encoder_output(picked, None if deep is None else [[level[i] for i in idx] for level in deep])
