"""Shared test setup: fully offline Hugging Face, one CPU thread, cached tiny zoo parts."""

import os

# Set before transformers / huggingface_hub are imported anywhere, so nothing is fetched.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def zoo_processor():
    """The embedded model's LlavaProcessor (word-level tokenizer, 64×64 CLIP preprocessing)."""
    from mclcbf_diag.zoo.build import build_processor

    return build_processor()


@pytest.fixture(scope="session")
def zoo_model(zoo_processor):
    """A freshly built (random, untrained) tiny LLaVA in eval mode. Do not mutate it."""
    from mclcbf_diag.zoo.build import build_model

    return build_model(zoo_processor.tokenizer, seed=0).eval()


@pytest.fixture(scope="session")
def zoo_prompt():
    from mclcbf_diag.zoo.build import PROMPT, QUESTION

    return PROMPT.format(question=QUESTION.format(name="dog"))


@pytest.fixture(scope="session")
def zoo_image():
    from mclcbf_diag.zoo.world import sample_scene

    return sample_scene(0, 0).image()


@pytest.fixture(scope="session")
def saved_zoo_dir(tmp_path_factory, zoo_processor, zoo_model):
    """Processor + model saved with save_pretrained (safetensors) in a temp directory."""
    out = tmp_path_factory.mktemp("zoo_saved")
    zoo_processor.save_pretrained(out)
    zoo_model.save_pretrained(out)
    return out
