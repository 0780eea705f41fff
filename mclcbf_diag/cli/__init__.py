"""The ``mclcbf-diag`` command line: one thin module per command over the library.

Commands: ``trace`` (:mod:`.trace`), ``explain`` (:mod:`.explain`), ``flow`` (:mod:`.flow`), ``pope`` and ``merge``
(:mod:`.pope`), ``compare`` (:mod:`.compare`), ``embedded`` (:mod:`.embedded`), ``attribute``
(:mod:`.attribute`), ``interventions`` (:mod:`.interventions`) and ``models`` (:mod:`.models`), which list
what the others offer, without torch; what they share (options, the checks that run before
any model loads, printing) is in :mod:`.common`. Nothing in the package imports this one.

Every user mistake is a :class:`~mclcbf_diag.errors.UserError`: one line on stderr, exit
status 2, and a traceback only with ``--debug``. argparse's own errors (a missing value,
``--shard -1/2``) are one line too, and Ctrl-C at any moment is one line with status 130.

Order of work: every argument, knob, file, image (decoded whole, sized as the processor will
make it) and the output folder (writable, not locked, holding no other command's run) is
validated first (``--set layers=…`` against the depth read from ``config.json``), with each
prompt's length against the model's context (``tokenizer.json``, ``config.json``), all before
torch loads; then the processor measures the prompt (a prompt it would cut is refused), then
the weights are read, then the
computation runs, and only then is anything written, atomically (see
:mod:`mclcbf_diag.storage`). Limits with their overrides: ``--max-new-tokens`` ≤ 512
(``MCLCBF_DIAG_MAX_NEW_TOKENS``), question text ≤ 4000 characters
(``MCLCBF_DIAG_MAX_QUESTION_CHARS``), images ≤ 50 megapixels
(``MCLCBF_DIAG_MAX_IMAGE_PIXELS``) and ≤ 64 MB as the processor's float32 output
(``MCLCBF_DIAG_MAX_IMAGE_MB``), integers in ``--set`` ≤ 10⁶ and ``layers`` ranges ≤
4096 entries.
"""

from __future__ import annotations

import os
import sys

from ..errors import UserError
from ..memory import reuse_freed_memory
from ..shipped import POPE as EMBEDDED_POPE
from . import attribute, compare, embedded, explain, flow, pope, trace
from . import interventions as interventions_cli
from . import models as models_cli
from .common import Parser, one_line

__all__ = ["main", "build_parser", "EMBEDDED_POPE"]


def build_parser() -> Parser:
    parser = Parser(prog="mclcbf-diag", description=(
        "Measure why an attention-steering intervention (MC-LCBF by default) does or does not change a "
        "LLaVA-style model's POPE answers."))
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    trace.add_parser(sub)
    explain.add_parser(sub)
    flow.add_parser(sub)
    embedded.add_parser(sub)
    pope.add_parser(sub)
    pope.add_merge_parser(sub)
    compare.add_parser(sub)
    attribute.add_parser(sub)
    interventions_cli.add_parser(sub)
    models_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        reuse_freed_memory()  # large tensors reuse freed memory instead of fresh pages (mclcbf_diag.memory)
        parser = build_parser()
        args = parser.parse_args(argv)
        debug = args.debug
        if getattr(args, "help_knobs", False):  # before anything loads: the knobs of --intervention
            return interventions_cli.cmd_interventions(args)
        return args.func(args)
    except UserError as exc:
        if debug:
            raise
        print(f"mclcbf-diag: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`mclcbf-diag interventions | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 0
    except KeyboardInterrupt:
        print("mclcbf-diag: interrupted (pope: rerun the same command to resume; nothing is half-written)",
              file=sys.stderr)
        return 130
    except MemoryError:
        if debug:
            raise
        print("mclcbf-diag: error: out of memory; lower --batch-size, --max-new-tokens or the image size "
              "(see the limits in `mclcbf-diag --help`)", file=sys.stderr)
        return 2

