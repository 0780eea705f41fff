"""The processor's side of a run: the image placeholder, processor errors, the image's patch grid.

Contract: everything here runs before the model does, and every problem is a one-line
:class:`~mclcbf_diag.errors.UserError` naming the input, the problem and the fix.

* :func:`processor_prompt`: prompts spell the image ``<image>`` (the portable spelling,
  kept by ``--prompt``); a processor whose placeholder is another token (``processor.image_token``,
  e.g. Pixtral's ``[IMG]``) gets its own.
* :func:`run_processor`: the processor called on prompts and images; its ValueError (a
  placeholder count that does not match the images, an image it cannot read), TypeError or
  ImportError (an optional package it needs) becomes one line.
* :func:`padded_inputs`: a batch's model inputs, left-padded (every row's last prompt token is the
  last position), with the positions each row has alone (:func:`~.mrope.position_ids`).
* :func:`patch_grid_shape` / :func:`check_image_grid`: the patch grid an image becomes
  (``pixel_values``' height and width over the tower's patch size), and a refusal when the
  prompt's image tokens do not form that grid, or form one the overlay cannot draw yet.
"""

from __future__ import annotations

import torch

from ..errors import UserError, first_line
from .mrope import position_ids

PORTABLE_PLACEHOLDER = "<image>"
QWEN_IMAGE_PAD = "<|image_pad|>"  # Qwen2-VL/2.5-VL's placeholder (models/mrope.py)


def placeholder(processor) -> str:
    """The processor's own image placeholder (``<image>`` when it names none)."""
    return getattr(processor, "image_token", None) or PORTABLE_PLACEHOLDER


def processor_prompt(processor, prompt: str) -> str:
    """``prompt`` with the portable ``<image>`` spelled as this processor's placeholder."""
    own = placeholder(processor)
    if own == QWEN_IMAGE_PAD:  # Qwen-VL writes an image as its pad token between the vision start and end tokens
        own = f"<|vision_start|>{own}<|vision_end|>"
    return prompt if own == PORTABLE_PLACEHOLDER else prompt.replace(PORTABLE_PLACEHOLDER, own)


def _count_images(images) -> int:
    if images is None:
        return 0
    if isinstance(images, (list, tuple)):
        return sum(_count_images(item) for item in images)
    return 1


def _placeholder_problem(processor, prompts, images) -> str | None:
    """The mismatch between the prompts' placeholders and the images, in words (None when they agree).

    Checked here because transformers releases differ in how they report it (a ValueError, or a bare
    StopIteration from 5.18's placeholder expansion). A prompt with no placeholder at all is left to
    the processor: some (PaliGemma's) place the image themselves.
    """
    own = placeholder(processor)
    texts = prompts if isinstance(prompts, (list, tuple)) else [prompts]
    n_placeholders = sum(str(t).count(own) for t in texts)
    n_images = _count_images(images)
    if n_placeholders == 0 or n_placeholders == n_images:
        return None
    return (f"the prompt has {n_placeholders} {own} placeholder{'s' * (n_placeholders != 1)} for {n_images} "
            f"image{'s' * (n_images != 1)}")


def run_processor(processor, where: str, text, images, **kwargs):
    """``processor(text=…, images=…, **kwargs)`` with the portable placeholder translated; its errors as one line.

    Args:
        processor: the checkpoint's processor.
        where: the model as the error names it (``--model …``).
        text: a prompt or a list of prompts, with the portable placeholder (one per image).
        images: the images, as the processor takes them.
        **kwargs: passed to the processor (e.g. ``return_tensors``, ``padding``, ``truncation``).

    Returns:
        The processor's outputs.

    Raises:
        UserError: the processor needs a package that is not installed, or refused the prompt and images (e.g. a
            placeholder count that does not match the images).
    """
    prompts = [processor_prompt(processor, t) for t in text] if isinstance(text, (list, tuple)) else \
        processor_prompt(processor, text)
    try:
        problem = _placeholder_problem(processor, prompts, images)
        if problem is not None:
            raise ValueError(problem)
        return processor(text=prompts, images=images, **kwargs)
    except ImportError as exc:
        raise UserError(f"--model {where}: its processor needs a package that is not installed ({first_line(exc)});"
                        " install it (e.g. pip install torchvision) or use a checkpoint whose processor runs "
                        "without it") from None
    except (ValueError, TypeError, KeyError, StopIteration) as exc:
        raise UserError(f"--model {where}: its processor refused the prompt and image ({first_line(exc)}); the prompt "
                        f"needs one {PORTABLE_PLACEHOLDER} per image (this processor's placeholder is "
                        f"{placeholder(processor)!r}): check --prompt, the image file and the checkpoint's processor "
                        "files") from None


def padded_inputs(lm, prompts: list[str], images: list) -> dict:
    """The processor's tensors for a batch of prompts (one image each), left-padded, on the model's device.

    With the ``position_ids`` each row runs at alone.

    Args:
        lm: the loaded model.
        prompts: one prompt a row, each with exactly one image placeholder.
        images: one image a row.

    Returns:
        The model inputs (``input_ids``, ``attention_mask``, ``position_ids``, the image fields).

    Raises:
        UserError: a prompt without exactly one placeholder, or a tokenizer without a pad token.
        ValueError: not one image per prompt, or no prompts (a programming error).
    """
    if len(prompts) != len(images) or not prompts:
        raise ValueError(f"need one image per prompt, got {len(prompts)} prompts and {len(images)} images")
    prompts = [processor_prompt(lm.processor, p) for p in prompts]  # the portable <image> → the processor's own
    placeholder = getattr(lm.processor, "image_token", None) or "<image>"
    if any(p.count(placeholder) != 1 for p in prompts):
        raise UserError(f"every prompt needs exactly one {placeholder} placeholder "
                        "(e.g. 'USER: <image>\n{question}\nASSISTANT:')")
    tok = lm.processor.tokenizer
    if tok.pad_token_id is None:
        raise UserError("the tokenizer has no pad token, so prompts cannot be batched; use --batch-size 1")
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = lm.processor(text=list(prompts), images=lm.image_scheme.processor_images(lm.processor, images),
                           return_tensors="pt", padding="longest")
    finally:
        tok.padding_side = side
    mask = enc["attention_mask"]
    pads = (mask == 0).sum(-1)
    if any(bool(mask[b, int(p):].eq(0).any()) for b, p in enumerate(pads)):
        raise RuntimeError("the processor did not pad on the left")  # programming error
    inputs = {k: (v.to(lm.device, lm.dtype) if v.is_floating_point() else v.to(lm.device)) for k, v in enc.items()}
    inputs["position_ids"] = position_ids(lm, inputs)  # cumsum − 1, or the family's own (Qwen-VL's 3-D M-RoPE)
    return inputs


def patch_grid_shape(pixel_values: torch.Tensor, patch_size: int) -> tuple[int, int]:
    """(rows, columns) of patches of one image ``pixel_values`` [..., H, W] under a tower of ``patch_size`` px."""
    height, width = int(pixel_values.shape[-2]), int(pixel_values.shape[-1])
    return height // int(patch_size), width // int(patch_size)


def check_image_grid(n_image_tokens: int, grid: tuple[int, int], where: str, extra: int = 0) -> tuple[int, int]:
    """The image's patch grid, or a UserError before the model runs when the overlay could not draw it.

    A count that is not ``rows · columns + extra`` does not form the grid; a grid that is not square is refused too,
    as the overlay draws square grids.

    Args:
        n_image_tokens: the prompt's count of image tokens.
        grid: the (rows, columns) patch grid of its ``pixel_values``.
        where: the model as the error names it (``--model …``).
        extra: the tokens beyond the patches (1: a CLS token kept by the ``full`` feature selection).

    Returns:
        ``grid``, checked.

    Raises:
        UserError: the count does not form the grid, or the grid is not square.
    """
    rows, cols = grid
    if n_image_tokens != rows * cols + extra:
        raise UserError(f"--model {where}: the image becomes {n_image_tokens} image tokens, which do not form its "
                        f"{rows} × {cols} patch grid ({rows * cols + extra} tokens): the processor and the vision "
                        "tower disagree; check the checkpoint's preprocessor_config.json (size, crop_size, patch_size)")
    if rows != cols:
        raise UserError(f"--model {where}: the image becomes a {rows} × {cols} patch grid ({n_image_tokens} image "
                        "tokens), not a square one, which the attention overlay cannot draw yet; give the image "
                        "processor a square crop (do_center_crop with crop_size height = width) or a square image")
    return grid
