"""GPU benchmark: the full LLaVA-1.5-7B configuration, random weights, every command and intervention.

    python benchmarks/gpu_7b.py [--dtype bfloat16|float16] [--layers 32] [--batch-size 8] [--questions 32]
    python benchmarks/gpu_7b.py --dry-run          # CPU, 2 language + 2 vision layers, reduced widths

Prints, in one run on one device: the matmul rate it measures (TFLOP/s), then for trace,
explain (reduced experiments) and the batched POPE path of every registered intervention
the time per question, its ratio to one bare batched forward of the same questions, and its
ratio to the physical floor (the forward's FLOPs ÷ the measured matmul rate), plus peak
device memory. In float16 it first checks the eager attention for non-finite values (a
known problem of LLaVA-1.5 in fp16) and warns. Random weights give meaningless answers; the
timings and memory are what a real checkpoint costs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_width import POPE, REDUCED  # noqa: E402

from mclcbf_diag import barrier as B  # noqa: E402
from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image  # noqa: E402
from mclcbf_diag.embedded.build import build_processor  # noqa: E402
from mclcbf_diag.engine.batch import answer_pair, batch_inputs  # noqa: E402
from mclcbf_diag.experiments.explain import explain_sample  # noqa: E402
from mclcbf_diag.experiments.trace import trace_sample  # noqa: E402
from mclcbf_diag.interventions import MCLCBF, REGISTRY  # noqa: E402
from mclcbf_diag.memory import reuse_freed_memory
from mclcbf_diag.models import load_model  # noqa: E402
from mclcbf_diag.models.real_width import build_random_llava, llava15_7b_config, parameter_count  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device, dtype, n=4096, repeats=10) -> float:
    """Measured dense matmul rate in FLOP/s on this device and dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t)


def forward_flops(config, seq: int) -> float:
    """FLOPs of one prefill forward: 2 × parameters touched per token, plus attention scores."""
    t = config.text_config
    params = parameter_count(config) - t.vocab_size * t.hidden_size  # the embedding is a lookup
    attn = 4 * t.num_hidden_layers * seq * seq * t.hidden_size
    return 2 * params * seq + attn


def peak_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--vision-layers", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--dry-run", action="store_true", help="CPU, 2 + 2 layers, reduced widths: checks the script")
    args = ap.parse_args(argv)
    if args.dry_run:
        device, args.dtype, args.layers, args.vision_layers = torch.device("cpu"), "float32", 2, 2
        args.batch_size, args.questions = 2, 2
        torch.set_num_threads(1)
        reuse_freed_memory()  # freed tensors reused, not mapped afresh (mclcbf_diag.memory)
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    processor = build_processor()
    tok = processor.tokenizer
    config = llava15_7b_config(args.layers, args.vision_layers, image_token_id=tok.convert_tokens_to_ids("<image>"),
                               pad_token_id=tok.pad_token_id, widths=REDUCED if args.dry_run else None)
    questions = load_pope(POPE / "embedded_pope_adversarial.json")[: args.questions]
    images = [load_image(resolve_image(q, POPE / "images")) for q in questions]
    prompts = [build_prompt(q.text) for q in questions]
    rate = matmul_rate(device, dtype, n=256 if args.dry_run else 8192)
    print(f"device {device}, {args.dtype}, {args.layers} + {args.vision_layers} layers, "
          f"{parameter_count(config) / 1e9:.2f} B parameters; measured matmul rate {rate / 1e12:.2f} TFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        build_random_llava(config, dtype=dtype).save_pretrained(tmp)
        processor.save_pretrained(tmp)
        lm = load_model(tmp, dtype=args.dtype, device=str(device))
        inputs = batch_inputs(lm, prompts[: args.batch_size], images[: args.batch_size])
        seq = inputs["input_ids"].shape[1]
        with torch.no_grad():
            if args.dtype == "float16":
                out = lm.model(**inputs, output_attentions=True, logits_to_keep=1)
                bad = [i for i, a in enumerate(out.attentions) if not torch.isfinite(a).all()]
                if bad:
                    print(f"WARNING: eager fp16 attention is non-finite at layers {bad[:8]}…; use --dtype bfloat16")
            lm.model(**inputs, logits_to_keep=1)  # warm-up
            sync(device)
            t = time.perf_counter()
            lm.model(**inputs, logits_to_keep=1)
            sync(device)
        bare = (time.perf_counter() - t) / inputs["input_ids"].shape[0]
        floor = forward_flops(config, seq) / rate
        print(f"bare batched forward: {bare * 1e3:.1f} ms per question at batch {args.batch_size} "
              f"(floor {floor * 1e3:.1f} ms; {bare / floor:.2f}× the floor)")

        def report(name, seconds_per_question):
            print(f"{name:<28} {seconds_per_question * 1e3:9.1f} ms/question   {seconds_per_question / bare:6.2f}× bare"
                  f"   {seconds_per_question / floor:6.2f}× floor")

        iv = MCLCBF(B.apply_overrides(B.get_preset("seed-exp6"), ["span=detected"]))
        t = time.perf_counter()
        trace_sample(lm, questions[0], images[0], iv)
        sync(device)
        report("trace (both runs, probes)", time.perf_counter() - t)
        t = time.perf_counter()
        explain_sample(lm, questions[0], images[0], iv, k_max=4, bisect_steps=2)
        sync(device)
        report("explain (reduced)", time.perf_counter() - t)
        for name, cls in REGISTRY.items():
            iv_p = cls.from_preset("llava-1.5-7b" if name == "adhh" and args.layers == 32 else None,
                                   ["heads=0.0,1.1"] if name == "adhh" and args.layers != 32 else [])
            total = 0.0
            for i in range(0, len(prompts), args.batch_size):
                batch = batch_inputs(lm, prompts[i:i + args.batch_size], images[i:i + args.batch_size])
                sync(device)
                t = time.perf_counter()
                answer_pair(lm, prompts[i:i + args.batch_size], images[i:i + args.batch_size], iv_p, inputs=batch)
                sync(device)
                total += time.perf_counter() - t
            report(f"pope {name} (both conditions)", total / len(prompts))
        print(f"peak memory {peak_gb(device):.1f} GB; prompt {seq} tokens")
    print("ratio: see the '× bare' and '× floor' columns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
