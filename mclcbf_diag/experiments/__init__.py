"""The experiments: what is run on the model, and read back as records, for one question or many.

* :mod:`.trace`: the baseline and the intervened run of one question, with every probe.
* :mod:`.sweep`: the graded image-mass sweep (the evidence a negative claim needs).
* :mod:`.verdict`: the verdict's stages, batched over questions (one algorithm for
  ``explain --sample`` and ``explain --split``).
* :mod:`.explain`: one question's verdict, with the cause chain and per-layer doses.
* :mod:`.flow`: where the image reaches the decision token, by token group.

``mclcbf_diag.experiments`` was the sweep's module; its names stay importable from here for
one release (:mod:`.sweep` is their home).
"""

from .sweep import (  # noqa: F401  (the old module's names, for one release)
    FACTORS,
    TARGETS,
    GradedKnockout,
    edits,
    image_mass_sweep,
    layer_windows,
    sweep_edit,
    sweep_records,
    sweep_row,
    sweep_sentence,
    sweep_settings,
    sweep_summary,
    sweep_windows,
    window_name,
)
