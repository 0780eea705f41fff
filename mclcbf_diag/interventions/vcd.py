"""VCD: contrast the answer with the same question asked of a noised image.

Paper: Leng, Zhang, Chen et al., "Mitigating Object Hallucinations in Large Vision-Language
Models through Visual Contrastive Decoding", CVPR 2024. Released code:
github.com/DAMO-NLP-SG/VCD (``vcd_utils/vcd_add_noise.py``: ``add_diffusion_noise``;
``vcd_utils/vcd_sample.py``: the contrast; POPE script ``experiments/cd_scripts/llava1.5_pope.bash``:
``noise_step=500 cd_alpha=1 cd_beta=0.2``, the defaults here; the driver's argparse default is β = 0.1).

* **Distorted view.** The image tensor, as the processor normalised it, taken to step t of the
  forward diffusion process: x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε over a 1000-step sigmoid β
  schedule (:func:`~.views.diffusion_noise`). The released code draws ε from the global RNG;
  here each image draws it from a generator seeded with ``seed``, so a question's view is the
  same alone and in any batch.
* **Contrast.** scores = (1 + α)·ℓ − α·ℓ_distorted on the next-token logits, with the adaptive
  plausibility constraint on the clean logits: tokens whose probability is under β × the top
  token's get −inf (``logits < log β + max logits``). The released code then samples; the
  first-token answer here is the greedy one (the Yes − No sign of the scores).
* ``dose`` scales α (a dose-response sweeps the contrast's strength; the cutoff stays).
* **Batched.** The noised view has the question's tokens at the same positions, only other image
  features: a runner runs it as rows of the question's own forward (:meth:`VCD.aux_features`, see
  :mod:`.decoding`), the vision tower once per distinct noised image.
* **Families.** The noise is added to each image's pixel tensor ([3, H, W] per image, or per tile for InternVL;
  LLaVA-NeXT's and OneVision's [tiles, 3, H, W] per image, its base view and tiles noised by one draw), so VCD
  reads pixels (``reads_pixels``); a family whose processor gives none (flattened patches,
  :attr:`~mclcbf_diag.models.families.Family.flat_pixels`) is refused by the command line from
  ``config.json``, before the model loads. The batched path is tested against the released construction of each
  question alone on LLaVA-1.5, LLaVA-NeXT and OneVision (tests/test_interventions_vcd.py, test_models_anyres.py,
  test_models_onevision.py), its auxiliary rows against the view's own forward on InternVL, and its trace against
  its batched run on Gemma 3.
"""

from __future__ import annotations

import torch

from .base import Row
from .catalog import SPECS, VCDKnobs  # noqa: F401 - VCDKnobs re-exported
from .decoding import DecodingMethod
from .views import diffusion_noise, last_logits, pixels_of, row_inputs, shares_image_features, with_pixels


class VCD(DecodingMethod, spec=SPECS["vcd"]):
    cutoff_knob, strength_knob = "beta", "alpha"  # the default combine: (1 + α·dose)·ℓ − α·dose·ℓ', cut under β
    reads_pixels = True

    def auxiliary(self, lm, inputs: dict, rows: list[Row]):
        return last_logits(lm, self.views(lm, inputs, rows)["noised image"])

    def auxiliary_forwards(self) -> int | None:
        return 1  # the noised view

    def noised(self, inputs: dict, rows: list[Row]) -> tuple[dict, torch.Tensor]:
        """The model inputs of ``rows`` and their noised image tensor (:func:`~.views.diffusion_noise` at the knobs'
        step and seed): the one view both routes run."""
        mine = row_inputs(inputs, rows)
        return mine, diffusion_noise(pixels_of(mine), self.knobs.noise_step, self.knobs.seed)

    def aux_features(self, lm, inputs: dict, rows: list[Row]):
        """The noised images' features (the tower once per distinct noised image), for a runner that runs the view as
        rows of the main rows' forward; None where the inputs carry no shared image features."""
        if not shares_image_features(inputs):
            return None
        mine, noised = self.noised(inputs, rows)
        with torch.no_grad():
            return lm.image_scheme.features(lm, mine, noised)[0]

    def views(self, lm, inputs: dict, rows: list[Row]) -> dict:
        mine, noised = self.noised(inputs, rows)
        return {"noised image": with_pixels(mine, noised)}
