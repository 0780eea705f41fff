"""The supported model families (mclcbf_diag.models.families): the adapter table is built from them.

An unsupported checkpoint is refused from config.json alone: one line, in under a second, before torch loads.

The configurations are the installed transformers' own defaults for each family (``AutoConfig.for_model``),
written to a folder as a user's checkpoint would be; nothing is downloaded.
"""

import json
import subprocess
import sys

import pytest
from cli_refusals import child_cpu, refused
from transformers import AutoConfig

from mclcbf_diag import shipped
from mclcbf_diag.errors import UserError
from mclcbf_diag.models.families import (
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
LLAVA_BACKBONES = list(TEXT_BACKBONES)  # Gemma 3's and Qwen-VL's text models: their own families only
TRIED = ["qwen3_vl_moe", "idefics3", "smolvlm", "paligemma", "mistral3", "mllama"]


# InternVL's remote-code form (native InternVL is a family: tests/test_models_internvl.py); AutoConfig cannot build it
REMOTE_INTERNVL = {"model_type": "internvl_chat", "architectures": ["InternVLChatModel"], "auto_map": {}}


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
    for model_type in ("llava_next_video",):
        problem = config_problem(_config(model_type))
        assert "LLaVA-family layout" in problem and "not LLaVA-style" not in problem
    assert config_problem(REMOTE_INTERNVL).startswith("an InternVL (remote code) checkpoint")
    assert config_problem(_config("idefics3")).startswith("an Idefics3 checkpoint")
    assert config_problem(_config("llava_next_video")).startswith("a LLaVA-NeXT-Video checkpoint")
    assert article("InternVL") == "an" and article("Qwen2-VL") == "a"


def test_llava_with_each_measured_text_model_is_accepted_and_others_are_refused():
    for backbone in LLAVA_BACKBONES:
        cfg = _config("llava")
        cfg["text_config"] = AutoConfig.for_model(backbone).to_dict()
        assert config_problem(cfg) is None, backbone
    cfg["text_config"] = AutoConfig.for_model("qwen2_5_vl_text").to_dict()  # Qwen2.5-VL's own text model
    assert "text model is 'qwen2_5_vl_text'" in config_problem(cfg)
    qwen = _config("qwen2_5_vl")
    qwen["text_config"] = AutoConfig.for_model("qwen2").to_dict()  # a plain Qwen2 under Qwen2.5-VL: no M-RoPE
    assert "supported text models: Qwen2.5-VL's Qwen2" in config_problem(qwen)
    cfg = _config("llava")
    cfg["text_config"] = AutoConfig.for_model("gemma2").to_dict()  # logit soft-capping: not reproduced
    assert "text model is 'gemma2'" in config_problem(cfg)
    assert "text-only 'qwen2' model" in config_problem(_config("qwen2"))
    assert "model_type is 'bert'" in config_problem({"model_type": "bert"})
    assert "model_type is missing" in config_problem({})
    assert [f.model_type for f in FAMILIES] == ["llava", "llava_next", "llava_onevision", "internvl", "gemma3",
                                                "qwen2_5_vl", "qwen2_vl", "qwen3_vl"]
    for backbone in LLAVA_BACKBONES:  # LLaVA-NeXT, OneVision: the same text models (tests/test_models_anyres.py,
        for family in ("llava_next", "llava_onevision"):  # tests/test_models_onevision.py run one each)
            cfg = _config(family)
            cfg["text_config"] = AutoConfig.for_model(backbone).to_dict()
            assert config_problem(cfg) is None, (family, backbone)


def test_gemma3_is_accepted_with_its_own_text_model_only():
    """Gemma 3's defaults (transformers' own config) are measured; its text model under LLaVA, or another text model
    under Gemma 3, is refused."""
    assert config_problem(_config("gemma3")) is None
    llava = _config("llava")
    llava["text_config"] = _config("gemma3")["text_config"]
    assert "text model is 'gemma3_text'" in config_problem(llava)
    gemma3 = _config("gemma3")
    gemma3["text_config"] = AutoConfig.for_model("llama").to_dict()
    problem = config_problem(gemma3)
    assert "text model is 'llama'" in problem and "supported text models: Gemma 3" in problem
    assert "soft-capping" in config_problem(_config("gemma3", attn_logit_softcapping=50.0))


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


@pytest.mark.parametrize("model_type,fragment", [("llava_next_video", "a LLaVA-NeXT-Video checkpoint"),
                                                 ("internvl_chat", "an InternVL (remote code) checkpoint"),
                                                 ("qwen3_vl_moe", "a Qwen3-VL-MoE checkpoint")])
def test_the_cli_refuses_in_under_a_second_before_torch(tmp_path, model_type, fragment):
    ckpt = tmp_path / model_type
    ckpt.mkdir()
    cfg = REMOTE_INTERNVL if model_type == "internvl_chat" else _config(model_type)
    (ckpt / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    (ckpt / "model.safetensors").write_bytes(b"never read")
    (line, torch_loaded), took = child_cpu(lambda: refused(
        ["trace", "--model", str(ckpt), "--out", str(tmp_path / "out")], tmp_path, f"--model {ckpt}: {fragment}",
        "mclcbf-diag models"))  # the process's CPU time
    assert not torch_loaded, line
    assert took < 1.0, f"refused after {took:.2f} s of CPU"
    assert not (tmp_path / "out").exists()


def test_qwen3_vl_is_accepted_from_its_config_json():
    """Qwen3-VL is a family (tests/test_models_qwen3_vl.py), with its own text model only."""
    assert config_problem(_config("qwen3_vl")) is None and config_problem({"model_type": "qwen3_vl"}) is None
    qwen = _config("qwen3_vl")
    qwen["text_config"] = AutoConfig.for_model("qwen3").to_dict()  # a plain Qwen3 under Qwen3-VL: no M-RoPE
    assert "supported text models: Qwen3-VL's Qwen3" in config_problem(qwen)


def test_a_cached_hub_id_is_checked_from_the_cache_before_torch(tmp_path):
    cache = tmp_path / "hub"
    snap = cache / "models--someone--internvl-tiny" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(REMOTE_INTERNVL), encoding="utf-8")
    (cache / "models--someone--internvl-tiny" / "refs").mkdir()
    (cache / "models--someone--internvl-tiny" / "refs" / "main").write_text("0" * 40)
    line, torch_loaded = refused(["trace", "--model", "someone/internvl-tiny", "--out", str(tmp_path / "out")],
                                 tmp_path, "--model someone/internvl-tiny: an InternVL (remote code) checkpoint",
                                 HF_HUB_CACHE=str(cache))
    assert not torch_loaded, line
