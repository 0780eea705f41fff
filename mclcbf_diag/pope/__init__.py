"""POPE at scale as a library: baseline vs intervened answers, resumable, sharded and merged.

The command line (``mclcbf-diag pope`` and ``merge``, :mod:`mclcbf_diag.cli.pope`) is a thin layer
over this package: :mod:`.jobs` (what to answer), :mod:`.store` (the run folder),
:mod:`.answer` (batches) and :mod:`.metrics` (metrics and outputs).

How a run works
---------------
* The questions are the selected splits' files, each cut to its first ``--limit``
  questions; ``--shard i/n`` (0-based ``i``, ``0 ≤ i < n``) keeps the questions whose
  position in that list satisfies ``position % n == i``.
* Each batch is answered twice by :mod:`mclcbf_diag.engine.batch` (first-token margin
  ``logit Yes − logit No``, baseline then steered, the steered run reusing the
  baseline's cached prefix); ``--generate N`` adds greedy text of both conditions,
  scored with POPE's official parser (steering acts on the prefill only).
* ``--out`` (default ``reports/pope``, ``reports/pope-shard-I-of-N`` for a shard) holds
  ``run.json`` (the resolved configuration), ``answers.jsonl`` (one line per question),
  then ``metrics.csv``, ``flips.csv`` and ``summary.html`` (metrics over "all" pool the
  splits' questions).
* **Checks first.** Every option, knob (``layers`` against the depth in ``config.json``),
  question file, image path and header, prompt length (with the tokenizer) and the
  output folder is checked BEFORE anything is written or the weights are read; a
  mistake costs no time and leaves nothing behind.
* **Identity.** ``run.json`` holds everything that changes an answer: the model (a hub id,
  or a folder and a digest of its weight, config and tokenizer files' names and bytes), dtype,
  device, batch size, the torch/transformers/nnsight versions, knobs, prompt, limit, the POPE
  files' SHA-256, a digest of every image the questions name and a labels file's SHA-256. Every
  answers line carries ``run_id``, a digest of that identity with the shard and where the files
  sit left out, so rows of different runs can never be mixed, even when ``run.json`` is lost,
  while a project, model folder or labels file moved or copied elsewhere resumes, and shards
  run where the model sits at other paths merge (``store.unlocated``).
* **One writer.** ``--out`` is locked (``flock`` on ``.mclcbf-diag.lock``, see
  :mod:`mclcbf_diag.storage`) for the whole run; a second process on the same folder is
  refused, naming the holder. The kernel drops the lock of a killed process.
* **Crash safety.** A batch's lines are appended with ONE ``write`` followed by
  ``fsync``, so a kill leaves whole batches plus at most one partial last line. On
  resume the partial line is cut off, the questions already in the file are skipped,
  and the run continues; a different configuration in ``run.json`` is refused, naming
  the keys that differ with both values (batch size, device and the torch/transformers/nnsight
  versions included: they change the numbers in the last digits; ``--resume-anyway`` accepts
  other versions and records them in ``run.json``). A folder with a ``run.json`` but no
  answers yet (a run that failed before its first batch) is simply taken over. A damaged or missing ``run.json`` is
  rebuilt from the command line when every answers line carries this run's ``run_id``
  (the damaged file is kept as ``run.json.damaged``). ``run.json``, the CSVs and the page
  are replaced atomically (temporary file, fsync, rename).
* **Bounded memory.** Decoded images are cached up to ``MCLCBF_DIAG_IMAGE_CACHE_MB``
  megabytes (default 512), not by count.
* ``merge OUT SHARD_DIR…`` joins shard runs with the same configuration, drops duplicate
  (split, question_id) rows, reports missing shards and questions, and recomputes the
  metrics and the summary page.
"""

from .answer import MAX_BATCH_SIZE, ImageCache, answer_jobs, image_of, run_jobs
from .jobs import (
    EMBEDDED_POPE,
    SPLITS,
    Job,
    check_images,
    job_image,
    parse_shard,
    question_files,
    select_jobs,
)
from .store import (
    ANSWERS,
    FORMAT,
    RUN,
    append_records,
    claim_out_dir,
    differing_keys,
    pending,
    read_records,
    resumed,
    run_id,
    unique_sorted,
)

__all__ = ["ANSWERS", "RUN", "SPLITS", "EMBEDDED_POPE", "Job", "parse_shard", "question_files", "select_jobs",
           "job_image", "check_images", "FORMAT", "differing_keys", "run_id", "claim_out_dir", "read_records",
           "append_records", "unique_sorted", "resumed", "MAX_BATCH_SIZE", "ImageCache", "image_of", "answer_jobs",
           "pending", "run_jobs", "metrics_table", "flips_table", "write_outputs"]


def __getattr__(name: str):
    """The metrics (numpy, pandas, scipy) load on first use, so a refusal never waits for them."""
    if name in ("flips_table", "metrics_table", "write_outputs"):
        from . import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
