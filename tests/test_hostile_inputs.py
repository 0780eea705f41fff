"""Issue #34, second round of hardening: one section per item of its "Deliver" list.

Every refusal that needs no model runs in a fresh process (:func:`refused_fast`): exit status 2,
one line naming the input, the problem and the fix, ``main`` back in under 0.5 s without torch
imported, and not one byte changed under the test's folder (no ``--out``, no ``run.json``, no
lock). The cases that need a run use the embedded model on two or four questions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from mclcbf_diag import shipped, storage
from mclcbf_diag.cli import build_parser, main

IMAGES = shipped.IMAGES
# From the import of the CLI to its return (#34: "every refusal that needs no model"): the process's CPU seconds,
# which waiting for a core on a loaded machine does not inflate, and wall seconds, what a user waits
FAST, WAIT = 0.5, 2.0
_PROBE = ("import json, sys, time\nt, c = time.monotonic(), time.process_time()\nfrom mclcbf_diag.cli import main\n"
          "rc = main(json.loads(sys.argv[1]))\n"
          "print(json.dumps({'rc': rc, 'took': time.monotonic() - t, 'cpu': time.process_time() - c, "
          "'torch': 'torch' in sys.modules}))")
ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict:
    """Every path under ``folder`` with its kind and content hash (what 'writes nothing' compares)."""
    seen = {}
    for p in sorted(folder.rglob("*")):
        if p.is_fifo():
            seen[str(p)] = "fifo"
        elif p.is_file():
            seen[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            seen[str(p)] = "dir"
    return seen


def refused_fast(argv: list[str], cwd: Path, *fragments: str, **env) -> str:
    """Refused in a fresh process: status 2, one line with ``fragments``, < FAST s, no torch, nothing written."""
    before = snapshot(cwd)
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argv)], capture_output=True, text=True,
                          cwd=cwd, timeout=300, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                               "PYTHONPATH": str(ROOT), **env})
    err = proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rc"] == 2 and "Traceback" not in err, (argv, err)
    assert err.count("\n") == 1 and err.startswith("mclcbf-diag: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert result["cpu"] < FAST, f"{argv}: refused after {result['cpu']:.2f} s of CPU"
    assert result["took"] < WAIT, f"{argv}: refused after {result['took']:.2f} s"
    assert not result["torch"], f"{argv}: torch was imported before the refusal"
    assert snapshot(cwd) == before, "the refusal wrote or changed files"
    return err.strip()


def pope_file(folder: Path, rows: list[tuple], name: str = "q.jsonl") -> Path:
    """A POPE file of ``(question_id, image, text)`` rows, label yes."""
    path = folder / name
    path.write_text("".join(json.dumps({"question_id": q, "image": img, "text": text, "label": "yes"},
                                       ensure_ascii=False) + "\n" for q, img, text in rows), encoding="utf-8")
    return path


def with_images(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(IMAGES / n, folder / n)
    return folder


def png(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` (8-bit gray), with a token IDAT: tiny on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


Q = "Is there a dog in the image?"
COMMANDS = {"trace": ["trace"], "explain --split": ["explain", "--split", "random"], "pope": ["pope", "--split",
                                                                                              "random"]}


def one_image_run(tmp_path: Path, image_bytes: bytes | None, command: str, name: str = "img.png") -> list[str]:
    data = tmp_path / "data"
    data.mkdir()
    if image_bytes is not None:
        (data / name).write_bytes(image_bytes)
    pope = pope_file(data, [(1, name, Q)])
    return [*COMMANDS[command], "--pope-file", str(pope), "--image-dir", str(data), "--out", str(tmp_path / "out")]


# ============================================================================= 1. image limits on what the model sees
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_thin_image_is_refused_by_the_size_the_processor_makes(tmp_path, command):
    # 2000x1: 2000 source pixels, but the processor scales the short edge to 336: a 672000x336 float32 array
    from PIL import Image

    Image.new("L", (2000, 1)).save(tmp_path / "thin.png")
    argv = one_image_run(tmp_path, (tmp_path / "thin.png").read_bytes(), command)
    refused_fast(argv, tmp_path, "img.png", "2000x1", "672000x336", "2.5 GB", "aspect ratio of at most 49:1",
                 "MCLCBF_DIAG_MAX_IMAGE_MB")


def test_the_processor_size_limit_has_an_override(monkeypatch):
    from mclcbf_diag.data.pope import check_image_size, resized_size
    from mclcbf_diag.errors import UserError

    assert resized_size((2000, 1)) == (672000, 336) and resized_size((640, 480)) == (448, 336)
    check_image_size(Path("x.png"), (640, 480))  # an ordinary COCO image passes
    with pytest.raises(UserError, match="20160x336 .78 MB as float32.*at most 49:1"):
        check_image_size(Path("wide.png"), (60, 1))
    monkeypatch.setenv("MCLCBF_DIAG_MAX_IMAGE_MB", "100")
    check_image_size(Path("wide.png"), (60, 1))
    with pytest.raises(UserError, match="shortest edge to 672"):  # the model's processor size, when it says one
        check_image_size(Path("wide.png"), (60, 1), shortest_edge=672)


@pytest.mark.parametrize("width, height, shown", [(50_000_000, 1, "50000000x1"), (30000, 30000, "30000x30000")])
def test_huge_headers_are_refused_with_their_real_size(tmp_path, width, height, shown):
    # 50,000,000x1 used to pass the pixel limit; 30000x30000 was reported as "50000001x1"
    refused_fast(one_image_run(tmp_path, png(width, height), "pope"), tmp_path, "img.png", shown,
                 "question_id 1")


# ============================================================================= 2. question ids
@pytest.mark.parametrize("command", ["trace", "pope"])
def test_an_id_beyond_64_bits_is_refused_at_load(tmp_path, command):
    data = with_images(tmp_path / "data", "emb_000000.png")
    pope = pope_file(data, [(10 ** 25, "emb_000000.png", Q)])
    refused_fast([*COMMANDS[command], "--pope-file", str(pope), "--out", str(tmp_path / "out")], tmp_path,
                 "line 1", "does not fit in a 64-bit integer")


def test_mixed_ids_are_refused_at_load(tmp_path):
    data = with_images(tmp_path / "data", "emb_000000.png")
    pope = pope_file(data, [(1, "emb_000000.png", Q), ("q2", "emb_000000.png", "Is there a cat?")])
    refused_fast(["explain", "--split", "random", "--pope-file", str(pope), "--out", str(tmp_path / "out")],
                 tmp_path, "mix integers (line 1) and strings (line 2)")


ID_KINDS = {"int": [7, 12], "str": ["q7", "q12"], "unicode": ["frage-ü7", "問題/12"]}


@pytest.fixture(scope="module", params=list(ID_KINDS))
def id_kind(request):
    return request.param


@pytest.fixture(scope="module")
def id_data(tmp_path_factory, id_kind):
    folder = with_images(tmp_path_factory.mktemp(f"ids-{id_kind}"), "emb_000000.png", "emb_000001.png")
    ids = ID_KINDS[id_kind]
    pope_file(folder, [(ids[0], "emb_000000.png", Q), (ids[1], "emb_000001.png", "Is there a cat in the image?")])
    return folder, ids


def test_pope_and_merge_write_every_output_with_these_ids(tmp_path, id_data):
    import pandas as pd

    folder, ids = id_data
    argv = ["pope", "--split", "random", "--pope-file", str(folder / "q.jsonl"), "--batch-size", "2"]
    for i in (0, 1):
        assert main([*argv, "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}")]) == 0
    assert main(["merge", str(tmp_path / "m"), str(tmp_path / "s0"), str(tmp_path / "s1")]) == 0
    for out in (tmp_path / "s0", tmp_path / "m"):
        rows = [json.loads(line) for line in (out / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
        assert [r["question_id"] for r in rows] == ids[:len(rows)] and all(type(r["question_id"]) is type(ids[0])
                                                                           for r in rows)
        assert (out / "summary.html").stat().st_size > 0 and len(pd.read_csv(out / "metrics.csv")) > 0
        pd.read_csv(out / "flips.csv")


def test_explain_split_writes_every_output_with_these_ids(tmp_path, id_data):
    import pandas as pd

    folder, ids = id_data
    out = tmp_path / "e"
    assert main(["explain", "--split", "random", "--pope-file", str(folder / "q.jsonl"), "--k-max", "2",
                 "--bisect-steps", "1", "--no-sweep", "--out", str(out)]) == 0
    questions = pd.read_parquet(out / "questions.parquet")
    assert sorted(map(str, questions.question_id)) == sorted(map(str, ids))
    records = pd.read_parquet(out / "records.parquet")
    assert set(records.question_id) == {str(i) for i in ids}
    for name in ("causes.csv", "doses.csv", "fixes.csv", "questions.csv"):
        pd.read_csv(out / name)
    assert (out / "population.html").stat().st_size > 0 and (out / "answer.txt").read_text(encoding="utf-8")


def test_one_sample_commands_write_their_outputs_with_these_ids(tmp_path, id_data):
    import pandas as pd

    folder, ids = id_data
    base = ["--pope-file", str(folder / "q.jsonl"), "--question-id", str(ids[1])]
    assert main(["trace", *base, "--out", str(tmp_path / "t")]) == 0
    meta = json.loads((tmp_path / "t" / "config.json").read_text(encoding="utf-8"))
    assert meta["question"]["question_id"] == ids[1]
    assert len(pd.read_parquet(tmp_path / "t" / "records.parquet")) > 0
    assert main(["flow", *base, "--window", "4", "--out", str(tmp_path / "f")]) == 0
    assert [p.suffix for p in sorted((tmp_path / "f").glob("flow-*"))] == [".csv", ".html"]
    assert main(["explain", *base, "--k-max", "2", "--out", str(tmp_path / "x")]) == 0
    assert sorted(p.suffix for p in (tmp_path / "x").glob("explain-*")) == [".html", ".parquet"]


# ============================================================================= 3. merge: complete, or marked partial
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    for i in (0, 1):
        assert main(["pope", "--split", "random", "--limit", "4", "--batch-size", "2", "--shard", f"{i}/2",
                     "--out", str(root / f"s{i}")]) == 0
    return root


def test_a_merge_with_a_missing_shard_is_refused(tmp_path, shards):
    refused_fast(["merge", str(tmp_path / "m"), str(shards / "s0")], tmp_path, "shards 1/2 missing",
                 "2 of 4 questions present", "--partial")


def test_partial_merge_is_marked_in_run_json(tmp_path, shards, capsys):
    assert main(["merge", "--partial", str(tmp_path / "m"), str(shards / "s0")]) == 0
    run = json.loads((tmp_path / "m" / "run.json").read_text())
    assert run["partial"] == {"expected": 4, "present": 2, "missing_shards": ["1/2"]}
    assert "partial" in capsys.readouterr().err  # the warning goes to stderr
    assert main(["merge", str(tmp_path / "m"), str(shards / "s0"), str(shards / "s1")]) == 0
    assert "partial" not in json.loads((tmp_path / "m" / "run.json").read_text())


# ============================================================================= 4. one command's folder, locked
def test_merge_into_an_earlier_merge_starts_from_an_empty_folder(tmp_path, shards):
    m = tmp_path / "m"
    assert main(["merge", "--partial", str(m), str(shards / "s0")]) == 0
    (m / "answer.txt").write_text("an earlier run's answer\n")  # what an earlier population merge left
    (m / "records.parquet").write_bytes(b"PAR1")
    assert main(["merge", str(m), str(shards / "s0"), str(shards / "s1")]) == 0
    assert not (m / "answer.txt").exists() and not (m / "records.parquet").exists()
    assert len((m / "answers.jsonl").read_text().splitlines()) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary folder was left"


def test_merge_refuses_a_folder_of_other_files(tmp_path, shards):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    refused_fast(["merge", str(tmp_path / "m"), str(shards / "s0"), str(shards / "s1")], tmp_path,
                 "other files (notes.txt)", "pass an empty or new folder")


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("split") / "e"
    assert main(["explain", "--split", "random", "--limit", "2", "--k-max", "2", "--bisect-steps", "1",
                 "--no-sweep", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("command", [["trace", "--sample", "1"], ["flow", "--sample", "1"],
                                     ["explain", "--sample", "1"], ["pope", "--split", "random", "--limit", "2"]])
def test_a_folder_of_another_commands_run_is_refused(tmp_path, split_run, command):
    out = tmp_path / "e"
    shutil.copytree(split_run, out)
    refused_fast([*command, "--out", str(out)], tmp_path, "holds an explain --split run", "--force")


def test_force_writes_beside_another_run(tmp_path, split_run):
    out = tmp_path / "e"
    shutil.copytree(split_run, out)
    assert main(["trace", "--sample", "1", "--force", "--out", str(out)]) == 0
    assert (out / "run.json").is_file()


def test_a_locked_folder_is_refused_at_once_with_the_holders_pid(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with storage.FolderLock(out):
        for command in (["trace", "--sample", "1"], ["pope", "--split", "random", "--limit", "2"],
                        ["flow", "--sample", "1"]):
            refused_fast([*command, "--out", str(out)], tmp_path, "is in use by", f"pid {os.getpid()}")


# ============================================================================= 5. JSON Lines split at \n only
def test_a_line_separator_inside_a_question_is_not_a_record_end(tmp_path):
    from mclcbf_diag.data import load_pope

    pope = pope_file(tmp_path, [("a", "x.png", "Is there a dog\u2028or a cat?"), ("b", "y.png", "Is it red\x85?")])
    assert [q.text for q in load_pope(pope)] == ["Is there a dog\u2028or a cat?", "Is it red\x85?"]


# ============================================================================= 6. model-free checks come first
def _truncated_png() -> bytes:
    return (IMAGES / "emb_000000.png").read_bytes()[:-200]


def _float_tiff(tmp_path) -> bytes:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.ones((40, 40), dtype=np.float32)).save(tmp_path / "f.tif")
    return (tmp_path / "f.tif").read_bytes()


@pytest.mark.parametrize("command", ["pope", "explain --split"])
@pytest.mark.parametrize("kind, fragments", [("truncated", ["cannot be read", "truncated"]),
                                             ("float", ["floating-point image (mode F)"])])
def test_a_bad_image_is_refused_before_the_model_loads(tmp_path, command, kind, fragments):
    data = _truncated_png() if kind == "truncated" else _float_tiff(tmp_path)
    refused_fast(one_image_run(tmp_path, data, command, "img.png" if kind == "truncated" else "img.tif"), tmp_path,
                 "question_id 1 (random)", *fragments)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_image_placeholder_in_a_question_is_refused_with_its_line(tmp_path, command):
    data = with_images(tmp_path / "data", "emb_000000.png")
    pope = pope_file(data, [("q1", "emb_000000.png", Q), ("q2", "emb_000000.png", "Is <image> a dog?")])
    refused_fast([*COMMANDS[command], "--pope-file", str(pope), "--out", str(tmp_path / "out")], tmp_path,
                 "line 2", "question_id 'q2'", "'<image>'", "remove")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_prompt_beyond_the_context_is_refused_before_transformers_loads(tmp_path, command):
    data = with_images(tmp_path / "data", "emb_000000.png")
    pope = pope_file(data, [("long", "emb_000000.png", "Is there a dog " * 250 + "?")])  # 3751 characters
    refused_fast([*COMMANDS[command], "--pope-file", str(pope), "--out", str(tmp_path / "out")], tmp_path,
                 "question_id 'long'", "576 of them for the image", "limit of 1024", "max_position_embeddings")


def test_the_quick_prompt_count_is_the_processors(embedded_model):
    from mclcbf_diag.cli.common import quick_prompt_lengths
    from mclcbf_diag.data import build_prompt
    from mclcbf_diag.models.loading import check_prompt_lengths

    prompt = build_prompt("Is there a dog " * 28 + "?")
    n = check_prompt_lengths(embedded_model, [prompt])
    quick_prompt_lengths(None, [prompt], ["p"], max_new_tokens=1024 - n)  # exactly the context: accepted
    with pytest.raises(Exception, match=f"the prompt is {n} tokens"):
        quick_prompt_lengths(None, [prompt], ["p"], max_new_tokens=1024 - n + 1)


# ============================================================================= 7. clear messages
def test_a_fifo_is_named_a_fifo(tmp_path):
    data = with_images(tmp_path / "data", "emb_000000.png")
    os.mkfifo(tmp_path / "q.jsonl")
    refused_fast(["trace", "--pope-file", str(tmp_path / "q.jsonl")], tmp_path, "is a FIFO (named pipe)",
                 "not a regular file")
    os.mkfifo(data / "pipe.png")
    pope = pope_file(data, [(1, "pipe.png", Q)])
    refused_fast(["pope", "--split", "random", "--pope-file", str(pope), "--out", str(tmp_path / "out")], tmp_path,
                 "pipe.png", "is a FIFO (named pipe)")


# ============================================================================= 8. image paths after symbolic links
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_link_out_of_the_image_dir_is_refused(tmp_path, command):
    outside = with_images(tmp_path / "outside", "emb_000000.png")
    data = tmp_path / "data"
    data.mkdir()
    (data / "img.png").symlink_to(outside / "emb_000000.png")
    pope = pope_file(data, [(1, "img.png", Q)])
    refused_fast([*COMMANDS[command], "--pope-file", str(pope), "--out", str(tmp_path / "out")], tmp_path,
                 "'img.png' is a symbolic link to", "outside")


# ============================================================================= 9. the run's identity
def _interrupted_pope(tmp_path, *extra):
    from mclcbf_diag.cli import pope as pope_cli

    out = tmp_path / "p"
    argv = ["pope", "--split", "random", "--limit", "2", "--batch-size", "1", "--out", str(out), *extra]

    def stop(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pope_cli.cmd_pope(build_parser().parse_args(argv), on_batch=stop)
    return out, argv


def test_identity_holds_what_changes_numbers(tmp_path, capsys):
    import torch
    import transformers

    out, argv = _interrupted_pope(tmp_path)
    run = json.loads((out / "run.json").read_text())
    assert run["batch_size"] == 1 and run["device"] == "cpu" and run["dtype"] == "float32"
    assert run["versions"]["torch"] == torch.__version__ and run["versions"]["transformers"] == \
        transformers.__version__ and "nnsight" in run["versions"]
    assert main([*argv[:-4], "--batch-size", "2", "--out", str(out)]) == 2
    assert "differs in: batch_size (1 in run.json, now 2)" in capsys.readouterr().err
    assert len((out / "answers.jsonl").read_text().splitlines()) == 1


def test_a_moved_project_resumes_its_runs_but_changed_questions_do_not(tmp_path, capsys):
    """The question files' place is not the run's identity (their digest is): run.json written where the project
    sat before resumes here and then names the files where they are; a file whose content differs is refused."""
    out, argv = _interrupted_pope(tmp_path)
    here = json.loads((out / "run.json").read_text())
    moved = {**here, "pope_files": ["/elsewhere/checkout/embedded_pope_random.json"]}
    (out / "run.json").write_text(json.dumps(moved))
    assert main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["pope_files"] == here["pope_files"] and run["pope_sha256"] == here["pope_sha256"]
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and len({r["run_id"] for r in rows}) == 1
    (out / "run.json").write_text(json.dumps({**moved, "pope_sha256": ["0" * 64]}))
    capsys.readouterr()
    assert main(argv) == 2
    assert "differs in: pope_sha256" in capsys.readouterr().err


def test_a_moved_image_folder_option_resumes_and_is_recorded(tmp_path):
    """explain --split's identity names its --image-dir as given (image_dir_option) and image_dirs resolved: a
    location, not compared; on resume both are rewritten to where the files are now. Its images' digest is."""
    from plain_refs import run_folder_with_one_answer

    from mclcbf_diag.errors import UserError
    from mclcbf_diag.pope.store import claim_out_dir, run_id

    old = {"format": 2, "images": "abc", "image_dir_option": "/old/images", "image_dirs": ["/old/images"]}
    out = run_folder_with_one_answer(tmp_path / "run", old, split="random")
    now = {**old, "image_dir_option": "data/images", "image_dirs": ["/new/data/images"]}
    assert run_id(now) == run_id(old) and claim_out_dir(out, now) is False
    assert json.loads((out / "run.json").read_text()) == now
    with pytest.raises(UserError, match="images") as refused:
        claim_out_dir(out, {**now, "images": "abd"})
    # only a content digest differs: the fix names the files' bytes (or a path-and-time identity), not the options
    assert "now hold other bytes" in str(refused.value) and "rerun with the same options" not in str(refused.value)
    with pytest.raises(UserError, match="rerun with the same options") as refused:
        claim_out_dir(out, {**now, "images": "abd", "limit": 8})
    assert "other bytes" not in str(refused.value)


def test_the_identity_of_a_fresh_copy_of_the_same_files_is_the_same(tmp_path):
    """A checkout elsewhere (other paths, other modification times) of the same question file, images and model
    files has the same run_id; a changed image or weight file changes it."""
    import shutil

    from mclcbf_diag import shipped
    from mclcbf_diag.cli import build_parser
    from mclcbf_diag.cli.pope import run_identity
    from mclcbf_diag.interventions import resolve
    from mclcbf_diag.pope.jobs import question_files, select_jobs
    from mclcbf_diag.pope.store import run_id

    copy = tmp_path / "checkout"
    shutil.copytree(shipped.POPE, copy / "pope", copy_function=shutil.copyfile)  # new times
    shutil.copytree(shipped.WEIGHTS, copy / "weights", copy_function=shutil.copyfile)

    def identity(pope_file, image_dir, weights):
        args = build_parser().parse_args(["pope", "--pope-file", str(pope_file), "--image-dir", str(image_dir)])
        files = question_files(None, args.pope_file, args.image_dir)
        return run_identity(args, resolve("mclcbf"), files, None, select_jobs(files, None, None), str(weights))

    name = "embedded_pope_random.json"
    here = identity(shipped.POPE / name, shipped.IMAGES, shipped.WEIGHTS)
    there = identity(copy / "pope" / name, copy / "pope" / "images", copy / "weights")
    assert run_id(here) == run_id(there)
    image = copy / "pope" / "images" / json.loads((shipped.POPE / name).read_text().splitlines()[0])["image"]
    image.write_bytes(image.read_bytes() + b"\0")
    assert run_id(identity(copy / "pope" / name, copy / "pope" / "images", copy / "weights")) != run_id(here)
    weights = sorted((copy / "weights").glob("*.safetensors"))[0]
    shutil.copyfile(shipped.IMAGES / image.name, image)
    weights.write_bytes(weights.read_bytes()[:-1] + b"\1")
    assert run_id(identity(copy / "pope" / name, copy / "pope" / "images", copy / "weights")) != run_id(here)


def test_other_versions_resume_only_with_resume_anyway(tmp_path, capsys, monkeypatch):
    from mclcbf_diag.cli import pope as pope_cli

    out, argv = _interrupted_pope(tmp_path)
    real = pope_cli._versions()
    monkeypatch.setattr(pope_cli, "_versions", lambda: {**real, "torch": "99.0"})
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f'versions.torch ("{real["torch"]}" in run.json, now "99.0")' in err and "--resume-anyway" in err
    assert main([*argv, "--resume-anyway"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["versions"] == real and run["resumed_anyway"][0]["versions"]["torch"] == "99.0"
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and len({r["run_id"] for r in rows}) == 1
