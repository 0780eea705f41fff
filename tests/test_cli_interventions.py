"""``mclcbf-diag interventions`` and ``--help-knobs``: every registered intervention from the registry, fast,
without torch."""

from dataclasses import dataclass

import pytest
from cli_refusals import child_cpu, ran, refused

from mclcbf_diag import interventions
from mclcbf_diag.cli import build_parser, main
from mclcbf_diag.cli.interventions import describe
from mclcbf_diag.interventions.catalog import SPECS
from mclcbf_diag.knobs import knob, knob_rows

LISTING_LIMIT = 0.5  # CPU seconds, the whole process: python, the CLI's imports and the listing (issue #35)


def test_interventions_lists_every_builtin_in_a_fresh_process_fast_without_torch(tmp_path):
    runs, cpu = zip(*(child_cpu(lambda: ran(["interventions"], tmp_path)) for _ in range(3)))
    status, out, _, torch_loaded = runs[0]
    assert status == 0 and not torch_loaded, out
    for spec in SPECS.values():
        block = "\n".join(describe(spec))
        assert block in out  # summary, paper, every preset and every knob with its type, default and help
        for name, kind, default, text in knob_rows(next(iter(spec.presets.values()))):
            assert text and name in block and kind in block
    assert out.startswith(f"{len(SPECS)} interventions")
    # the process's CPU time, the least of three (wall time on an idle 2-core CPU: 0.34-0.40 s; beside two busy
    # processes 0.53-0.67 s, the CPU time then 0.27-0.32 s)
    fastest = min(cpu)
    assert fastest < LISTING_LIMIT, f"mclcbf-diag interventions took {fastest:.2f} s of CPU (limit {LISTING_LIMIT} s)"


def test_the_listing_shows_defaults_presets_and_aliases():
    text = "\n".join(describe(SPECS["mclcbf"]))
    assert "    original   the same as seed-exp6" in text
    assert "    fixed      grad_dtype=float32 clamp=step_norm span=detected site=attn_logits" in text
    assert "--set tau=V sets tau_prefill, tau_decode" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("fixed_span "))
    assert row.split()[1:3] == ["int,int", "1,577"]
    adhh = "\n".join(describe(SPECS["adhh"]))
    assert "llava-1.5-7b  heads=16.29,26.9," in adhh and "(20 entries)" in adhh  # a long value is cut, counted


@dataclass(frozen=True)
class EchoKnobs:
    gain: float = knob(2.5, "how loud the echo is")
    plain: int = 3  # a knob without a description is listed with its type and default


def test_a_registered_intervention_appears_in_the_listing_without_any_docs_edit(monkeypatch, capsys):
    from mclcbf_diag.interventions import Intervention

    class Echo(Intervention):
        """Repeat the decision token's residual, louder."""

        name = "echo-test"
        Knobs = EchoKnobs
        presets = {"soft": EchoKnobs(), "loud": EchoKnobs(gain=9.0)}
        paper = "Nobody et al., a test, 2026"

    interventions.registry()  # the built-ins first, as the command line sees them
    monkeypatch.setitem(interventions._REGISTRY, "echo-test", Echo)
    assert main(["interventions"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{len(SPECS) + 1} interventions")
    block = out[out.index("echo-test: "):]
    assert block.startswith("echo-test: Repeat the decision token's residual, louder.\n"
                            "  paper: Nobody et al., a test, 2026\n")
    assert "    loud  gain=9.0" in block
    rows = [line.split() for line in block.splitlines() if line.startswith(("    gain ", "    plain "))]
    assert rows == [["gain", "float", "2.5", "how", "loud", "the", "echo", "is"], ["plain", "int", "3"]]
    # and the commands that take --intervention name it and show its knobs
    assert main(["explain", "--intervention", "echo-test", "--help-knobs"]) == 0
    assert capsys.readouterr().out.startswith("echo-test: Repeat")
    helped = build_parser()._subparsers._group_actions[0].choices["trace"].format_help()
    assert "echo-test" in "".join(helped.split())  # argparse may wrap the list at the hyphen


@pytest.mark.parametrize("command", ["trace", "explain", "pope", "attribute"])
def test_help_knobs_shows_one_intervention_on_every_command_that_takes_one(command, capsys):
    assert main([command, "--help-knobs", "--intervention", "vaf"]) == 0
    assert capsys.readouterr().out == "\n".join(describe(SPECS["vaf"])) + "\n"
    assert main([command, "--help-knobs"]) == 0  # the default intervention
    assert capsys.readouterr().out.startswith("mclcbf: ")


def test_help_knobs_exits_before_anything_loads(tmp_path):
    # a question that does not exist and a model folder that does not exist: never looked at
    status, out, _, torch_loaded = ran(["trace", "--intervention", "pai", "--help-knobs", "--sample", "99999",
                                         "--model", str(tmp_path / "missing")], tmp_path)
    assert status == 0 and not torch_loaded
    assert out == "\n".join(describe(SPECS["pai"]))


def test_help_knobs_refuses_an_unknown_intervention_before_torch(tmp_path):
    _, torch_loaded = refused(["pope", "--intervention", "paj", "--help-knobs"], tmp_path, "unknown intervention 'paj'",
                              "choose one of mclcbf, knockout, block, pai,", "`mclcbf-diag interventions` lists")
    assert not torch_loaded


@pytest.mark.parametrize("command", ["trace", "explain", "pope", "attribute"])
def test_help_names_the_interventions_instead_of_the_readme(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    text = " ".join(sub.format_help().split())
    assert "see README" not in text
    assert f"which intervention: {', '.join(SPECS)}" in text and "--help-knobs" in text
