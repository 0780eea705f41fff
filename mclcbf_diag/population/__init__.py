"""The answer over a whole POPE split: ``explain``'s verdict for every question, counted.

``mclcbf-diag explain --split S`` (no ``--sample``/``--question-id``) runs the per-question
verdict of :func:`mclcbf_diag.experiments.explain.explain_sample` (without the cause chain and the
per-layer doses) for every question, batched (:mod:`.verdict`): every experiment of a batch
continues from one baseline forward's KV cache and embeddings (:mod:`.units`), so a knockout,
a sweep setting, a dose or a fix costs the decision token (or the text after the image), not a
prompt. Rows go to the resumable, sharded store of ``pope`` (:mod:`.run`,
:mod:`mclcbf_diag.pope.store`); the aggregate (:mod:`.aggregate`), separately for wrong and
right answers, and the page and files (:mod:`.outputs`, :mod:`.page`) are computed from the
rows alone, so ``merge`` of shards gives what one process gives.

A row per question: split, question_id, label, kind (wrong/right), the baseline and intervened
answer, margin and validity, the outcome (unchanged/fixed/broken/derailed/non_finite), the top
decisive cause (the first cause in explain's ranking whose own counterfactual changes the result,
a joint cause ``joint:a+b`` included; empty when none is), the detected and decisive causes, the dose-response's k*
(smallest multiplier
reaching the label's goal), its outcome and the derailing multiplier, the graded sweep's
smallest decision-token image mass that changes the answer with a valid output (fixes a wrong
one, breaks a right one), whether some change at every text token after the image changes it,
every sweep setting's outcome as one letter (``sweep``, in the order of ``run.json``'s
``sweep`` list: u/f/b/d/c/n = unchanged/fixed/broken/derailed/changed/non_finite), and each counterfactual fix's
outcome (``fix:NAME``; ``n/a`` where it cannot apply) with the lists of fixes that fix, break or
derail it.
"""
