"""Shared test setup: fully offline Hugging Face, one CPU thread, cached tiny model parts."""

import atexit
import os
import shutil
import tempfile

# Set before transformers / huggingface_hub are imported anywhere, so nothing is fetched.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# the files' sha256 cache (mclcbf_diag.fingerprints) in a folder of this run's, not the user's, removed at exit
if "MCLCBF_DIAG_CACHE" not in os.environ:
    os.environ["MCLCBF_DIAG_CACHE"] = tempfile.mkdtemp(prefix="mclcbf-diag-cache-")
    atexit.register(shutil.rmtree, os.environ["MCLCBF_DIAG_CACHE"], ignore_errors=True)

import logging  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from mclcbf_diag.memory import reuse_freed_memory  # noqa: E402

reuse_freed_memory()  # as the command line does: freed tensors reused, not mapped afresh


class _DeprecationLog(logging.Handler):
    """Collects the deprecation notices transformers logs (not warns), e.g. on renamed kwargs."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        text = record.getMessage()
        if "deprecat" in text.lower():
            self.messages.append(text)


@pytest.fixture(autouse=True)
def no_deprecated_calls():
    """Fail any test in which transformers logs a deprecation notice.

    transformers announces renamed arguments (``past_key_values`` → ``cache`` in 5.24)
    through its logger, which pytest's ``filterwarnings = error`` (pyproject.toml) does not
    see; this catches the next rename while the old name still works.
    """
    handler = _DeprecationLog()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not handler.messages, f"deprecated call(s) into transformers: {handler.messages}"


class _CurrentStderr:
    """A stream that writes to whatever ``sys.stderr`` is at the write (pytest swaps it per test and for capsys)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_CURRENT_STDERR = _CurrentStderr()


@pytest.fixture(autouse=True)
def transformers_logs_to_the_current_stderr():
    """transformers' default log handler writes to, and flushes, the ``sys.stderr`` of the moment its logging was first
    configured (its first import). In a test session that is the capture of the test that first imported it: a later
    test's transformers warning went to that closed stream (a "--- Logging error ---" traceback on the later test's
    stderr) or to one no test reads, so what a command's stderr holds depended on the order of the tests. Once
    transformers is imported, its handler writes to the current ``sys.stderr`` at each write, as in a process of its
    own, where there is one stderr."""
    if "transformers" in sys.modules:
        for handler in logging.getLogger("transformers").handlers:
            if type(handler) is logging.StreamHandler and handler.stream is not _CURRENT_STDERR:
                handler.__dict__.pop("flush", None)  # transformers binds the first stream's flush to its handler
                handler.stream = _CURRENT_STDERR  # not setStream: it flushes the old stream, maybe closed
    yield


# A random model with the embedded model's processor and layout (576 image tokens at 5–580),
# smaller than the shipped one: 4 language layers.
TINY_SIZES = {"text_layers": 4, "hidden": 128, "heads": 4, "intermediate": 320, "vision_hidden": 64,
              "vision_layers": 3}


@pytest.fixture(scope="session")
def tiny_processor():
    """The embedded model's LlavaProcessor (subword tokenizer, 336 px CLIP preprocessing)."""
    from mclcbf_diag.embedded.build import build_processor

    return build_processor()


@pytest.fixture(scope="session")
def tiny_model(tiny_processor):
    """A freshly built (random, untrained) small LLaVA in eval mode. Do not mutate it."""
    from mclcbf_diag.embedded.build import build_model

    return build_model(tiny_processor.tokenizer, seed=0, **TINY_SIZES).eval()


@pytest.fixture(scope="session")
def tiny_prompt():
    from mclcbf_diag.embedded.build import PROMPT, QUESTION

    return PROMPT.format(question=QUESTION.format(name="dog"))


@pytest.fixture(scope="session")
def tiny_image():
    from mclcbf_diag.embedded.world import sample_scene

    return sample_scene(0, 0).image()


@pytest.fixture(scope="session")
def saved_tiny_dir(tmp_path_factory, tiny_processor, tiny_model):
    """Processor + model saved with save_pretrained (safetensors) in a temp directory."""
    out = tmp_path_factory.mktemp("tiny_saved")
    tiny_processor.save_pretrained(out)
    tiny_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def embedded_model():
    """The shipped, trained model, loaded the way users load it (float32, CPU)."""
    from mclcbf_diag.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def tiny_gqa_model(tmp_path_factory, tiny_processor):
    """A random LLaVA with a different shape: 5 layers, 4 query heads sharing 2 KV heads."""
    from transformers import LlavaForConditionalGeneration

    from mclcbf_diag.embedded.build import build_config
    from mclcbf_diag.models import load_model

    config = build_config(tiny_processor.tokenizer, **TINY_SIZES)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 64, 96, 5
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = 4, 2, 16
    config.text_config = text
    torch.manual_seed(1)
    model = LlavaForConditionalGeneration(config)
    out = tmp_path_factory.mktemp("tiny_gqa")
    model.save_pretrained(out)
    tiny_processor.save_pretrained(out)
    return load_model(str(out))
