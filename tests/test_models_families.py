"""The supported model families (mclcbf_diag.models.families): the adapter table is built from them.

An unsupported checkpoint is refused from config.json alone: one line, in under a second, before torch loads.

The configurations are the installed transformers' own defaults for each family (``AutoConfig.for_model``),
written to a folder as a user's checkpoint would be; nothing is downloaded.
"""

import json
import subprocess
import sys
import time

import pytest
from cli_refusals import refused
from transformers import AutoConfig

from mclcbf_diag import shipped
from mclcbf_diag.errors import UserError
from mclcbf_diag.models.families import (
    DEFAULT_BACKBONE,
    FAMILIES,
    KNOWN_UNSUPPORTED,
    TEXT_BACKBONES,
    article,
    check_config,
    config_problem,
)


def test_every_family_has_an_adapter_and_every_adapter_a_family():
    from mclcbf_diag.models.adapter import ADAPTERS, LLAVA

    assert list(ADAPTERS) == [f.architecture for f in FAMILIES]
    assert ADAPTERS["LlavaForConditionalGeneration"] is LLAVA
    assert len({f.name for f in FAMILIES}) == len(FAMILIES)


def test_the_embedded_model_is_a_listed_family():
    cfg = json.loads((shipped.WEIGHTS / "config.json").read_text(encoding="utf-8"))
    family = next(f for f in FAMILIES if f.architecture in cfg["architectures"])
    assert family.model_type == cfg["model_type"]
    assert any("embedded" in c for c in family.checked)


def test_families_load_without_torch():
    code = "import sys\nfrom mclcbf_diag.models.families import FAMILIES\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------ refusals from config.json
# Families users try (issue 32) that the toolkit does not measure yet, as transformers spells them.
LLAVA_BACKBONES = [b for b in TEXT_BACKBONES if b not in DEFAULT_BACKBONE.values()]  # Qwen-VL's: their own family
TRIED = ["llava_onevision", "qwen3_vl", "idefics3", "smolvlm", "paligemma", "gemma3",
         "internvl", "mistral3", "mllama"]


def _config(model_type: str, **text) -> dict:
    cfg = AutoConfig.for_model(model_type).to_dict()
    if text:
        cfg["text_config"] = {**cfg["text_config"], **text}
    return cfg


@pytest.mark.parametrize("model_type", TRIED)
def test_each_family_tried_is_refused_by_name(model_type):
    problem = config_problem(_config(model_type))
    name, why = KNOWN_UNSUPPORTED[model_type]
    assert problem.startswith(f"{article(name)} {name} checkpoint (model_type {model_type!r})")
    assert why in problem and "llava (LlavaForConditionalGeneration" in problem and "\n" not in problem


def test_llava_relatives_are_named_as_llava_layouts_and_articles_are_right():
    for model_type in ("llava_next_video", "llava_onevision"):
        problem = config_problem(_config(model_type))
        assert "LLaVA-family layout" in problem and "not LLaVA-style" not in problem
    assert config_problem(_config("internvl")).startswith("an InternVL checkpoint")
    assert config_problem(_config("idefics3")).startswith("an Idefics3 checkpoint")
    assert config_problem(_config("llava_next_video")).startswith("a LLaVA-NeXT-Video checkpoint")
    assert article("InternVL") == "an" and article("Qwen2-VL") == "a"


def test_llava_with_each_measured_text_model_is_accepted_and_others_are_refused():
    for backbone in LLAVA_BACKBONES:
        cfg = _config("llava")
        cfg["text_config"] = AutoConfig.for_model(backbone).to_dict()
        assert config_problem(cfg) is None, backbone
    cfg["text_config"] = AutoConfig.for_model("qwen2_5_vl_text").to_dict()  # Qwen2.5-VL's own text model
    assert "3-D M-RoPE positions only its own family computes" in config_problem(cfg)
    cfg = _config("llava")
    cfg["text_config"] = AutoConfig.for_model("gemma2").to_dict()  # logit soft-capping: not reproduced
    assert "text model is 'gemma2'" in config_problem(cfg)
    assert "text-only 'qwen2' model" in config_problem(_config("qwen2"))
    assert "model_type is 'bert'" in config_problem({"model_type": "bert"})
    assert "model_type is missing" in config_problem({})
    assert [f.model_type for f in FAMILIES] == ["llava", "llava_next", "qwen2_5_vl", "qwen2_vl"]
    for backbone in LLAVA_BACKBONES:  # LLaVA-NeXT: the same text models (tests/test_models_anyres.py runs one)
        cfg = _config("llava_next")
        cfg["text_config"] = AutoConfig.for_model(backbone).to_dict()
        assert config_problem(cfg) is None, backbone


def test_a_vision_tower_needing_a_missing_package_is_refused_naming_the_fix(monkeypatch):
    import importlib.util

    cfg = _config("llava")
    cfg["vision_config"] = AutoConfig.for_model("pixtral").to_dict()
    problem = config_problem(cfg, has_package=lambda name: False)
    assert "'pixtral' vision tower needs the torchvision package" in problem and "pip install torchvision" in problem
    assert config_problem(cfg, has_package=lambda name: True) is None
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchvision" else real(name, *a))
    with pytest.raises(UserError, match=r"^--model ckpt: its 'pixtral' vision tower .*; run `mclcbf-diag models`"):
        check_config(cfg, "ckpt")


@pytest.mark.parametrize("model_type,fragment", [("llava_onevision", "a LLaVA-OneVision checkpoint"),
                                                 ("internvl", "an InternVL checkpoint"),
                                                 ("qwen3_vl", "a Qwen3-VL checkpoint")])
def test_the_cli_refuses_in_under_a_second_before_torch(tmp_path, model_type, fragment):
    ckpt = tmp_path / model_type
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(_config(model_type)), encoding="utf-8")
    (ckpt / "model.safetensors").write_bytes(b"never read")
    start = time.monotonic()
    line, torch_loaded = refused(["trace", "--model", str(ckpt), "--out", str(tmp_path / "out")], tmp_path,
                                 f"--model {ckpt}: {fragment}", "mclcbf-diag models")
    took = time.monotonic() - start
    assert not torch_loaded, line
    assert took < 1.0, f"refused after {took:.2f} s"
    assert not (tmp_path / "out").exists()


def test_a_cached_hub_id_is_checked_from_the_cache_before_torch(tmp_path):
    cache = tmp_path / "hub"
    snap = cache / "models--someone--internvl-tiny" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(_config("internvl")), encoding="utf-8")
    (cache / "models--someone--internvl-tiny" / "refs").mkdir()
    (cache / "models--someone--internvl-tiny" / "refs" / "main").write_text("0" * 40)
    line, torch_loaded = refused(["trace", "--model", "someone/internvl-tiny", "--out", str(tmp_path / "out")],
                                 tmp_path, "--model someone/internvl-tiny: an InternVL checkpoint",
                                 HF_HUB_CACHE=str(cache))
    assert not torch_loaded, line
