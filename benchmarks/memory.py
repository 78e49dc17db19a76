"""Peak memory (RSS) of one optimiser step: what micro-batches, activation checkpointing and
response-only chunked logits save, and the padding a token budget removes (issue #11).

1. `rm`: one step of `RewardModelModule` (a `lightning.Trainer` with max_steps=1) at `--size medium`
   (hidden 512, 8 layers) on 16 pairs of 512 random token ids each, against `rm.micro_batch_size`
   16/8/4/2/1, with and without `model.gradient_checkpointing` (`ModelSpec.trainable`).
2. `policy`: one forward/backward of the policy update (`PolicyModule.minibatch_loss`) of a
   tiny-width Llama (hidden 64, 2 layers) with a 32k or 152k vocabulary on B × 512 random ids, the
   last 32–64 of each row a response. `before`: the old path, full logits [B, T, V] then log-softmax
   (`sequence_logprobs`: `aligned_logprobs(model(...).logits, ...)`); `after`: `response_logprobs`
   (logits at response positions only, in chunks recomputed in backward).
3. `padding`: the padded share of the positions the reward model computes on the default reviews
   task's training batches (32 pairs, max length 128), whole batches vs micro-batches vs token
   budgets (`microbatch.plan`), in our length-grouped order and in a random order.

Method: each memory setting runs in a fresh interpreter (`--worker`), one torch thread. The
worker builds the model and the batch, then just before the step (Lightning's
`on_train_batch_start` for the RM) runs `gc.collect()`, records the resident set size and resets
the kernel's high-water mark (`/proc/self/clear_refs` ← 5, Linux); after the step it reads the
high-water mark (`VmHWM`). `step MiB` = high-water mark − resident size before the step: what the
step itself added at its peak (activations, logits, gradients, AdamW state). Where the reset is
not available the high-water mark is `getrusage`'s `ru_maxrss` (then a peak during the build can
hide a smaller step peak; the JSON says which was used).

    python benchmarks/memory.py [--quick] [--parts rm policy padding] [--micro-batches 16 8 4 2 1]
        [--vocabs 32000 152064] [--policy-batch 4] [--policy-large-batch 64]
"""

from __future__ import annotations

import gc
import os
import sys
import time
from functools import partial
from pathlib import Path

import common

SCRIPT = Path(__file__).resolve()
RM_LENGTH, RM_PAIRS = 512, 16
POLICY_LENGTH, RESPONSE = 512, (32, 64)  # tokens per row; response tokens per row (min, max)


class StepPeak:
    """Resident memory before a step and its high-water mark during it (MiB)."""

    def start(self) -> None:
        gc.collect()
        self.method = "VmHWM" if _reset_high_water() else "ru_maxrss"
        self.before = common.status_mb("VmRSS")
        self.started = time.perf_counter()

    def stop(self) -> dict:
        seconds = time.perf_counter() - self.started
        peak = common.status_mb("VmHWM") if self.method == "VmHWM" else common.peak_rss_mb()
        return {
            "rss_before_mb": self.before,
            "peak_mb": peak,
            "step_mb": peak - self.before,
            "step_s": seconds,
            "peak_method": self.method,
        }


def _reset_high_water() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --- 1. reward-model step ----------------------------------------------------------------------
def random_pairs(n_pairs: int, length: int, vocab: int, seed: int = 0) -> dict:
    """A preference batch of random ids: chosen rows [0, n), rejected rows [n, 2n), [2n, length]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2 * n_pairs, length), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "margin": torch.zeros(n_pairs),
    }


def rm_worker(spec: dict) -> dict:
    """One `RewardModelModule` step through a `lightning.Trainer` (max_steps=1)."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    from rlhf_lightning.models.factory import ModelSpec
    from rlhf_lightning.modules.reward_model import RewardModelModule

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    model_spec = ModelSpec(config=spec["config"], gradient_checkpointing=spec["checkpointing"])
    torch.manual_seed(0)
    model = model_spec.trainable(model_spec.reward_model(tokenizer))
    batch = random_pairs(spec["pairs"], spec["length"], len(tokenizer))
    module = RewardModelModule(
        model,
        optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.01),
        use_margin=False,
        micro_batch_size=spec["micro_batch_size"],
    )
    peak, out = StepPeak(), {}

    class _Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            peak.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            out.update(peak.stop())

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[_Probe()],
    )
    common.quiet_lightning()
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    params = sum(p.numel() for p in model.parameters())
    return {**out, "parameters": params, "weights_mb": params * 4 / 2**20}


# --- 2. policy update forward/backward ---------------------------------------------------------
def policy_batch(batch: int, vocab: int, length: int, response: tuple[int, int], seed: int = 0):
    """A rollout-shaped batch of random ids: a full prompt of length − max response tokens, then
    a response of 32–64 tokens, right padding (id 0). Returns (rollout, advantages [B, T])."""
    import torch

    from rlhf_lightning.modules.rollout import Rollout

    g = torch.Generator().manual_seed(seed)
    width = length - response[1]  # prompt columns
    lengths = torch.randint(response[0], response[1] + 1, (batch,), generator=g)
    cols = torch.arange(length)
    attention = (cols < width + lengths[:, None]).long()  # [B, T]
    response_mask = ((cols >= width) & attention.bool()).float()  # [B, T]
    ids = torch.randint(3, vocab, (batch, length), generator=g) * attention
    advantages = torch.randn(batch, 1, generator=g) * response_mask  # [B, T]
    rollout = Rollout(
        prompts=[""] * batch,
        responses=[""] * batch,
        input_ids=ids,
        attention_mask=attention,
        response_mask=response_mask,
        logprobs=-torch.log(torch.tensor(float(vocab))) * response_mask,  # log p_old
        ref_logprobs=torch.zeros(batch, length),
        scores=torch.zeros(batch),
        ended=torch.ones(batch, dtype=torch.bool),
        entropy=None,
        prompt_width=width,
    )
    return rollout, advantages


def policy_worker(spec: dict) -> dict:
    """One forward/backward of `PolicyModule.minibatch_loss` (no optimiser step)."""
    import torch
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_lightning.control.beta import FixedBeta
    from rlhf_lightning.generation.settings import GenerationSettings
    from rlhf_lightning.models.factory import train_without_dropout
    from rlhf_lightning.models.heads import position_ids
    from rlhf_lightning.models.logprobs import CHUNK_TOKENS, response_logprobs, sequence_logprobs
    from rlhf_lightning.modules.algorithm import Algorithm
    from rlhf_lightning.modules.policy import PolicyModule

    vocab, length = spec["vocab"], spec["length"]
    config = {**common.TINY_CONFIG, "max_position_embeddings": length}
    torch.manual_seed(0)
    policy = LlamaForCausalLM(
        LlamaConfig(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2, **config)
    )
    train_without_dropout(policy)
    module = PolicyModule(
        policy=policy,
        reference=nn.Identity(),  # unused by minibatch_loss
        reward=lambda prompts, responses: None,
        tokenizer=None,
        algorithm=Algorithm(name="rloo", group_size=4),
        beta_controller=FixedBeta(0.05),
        optimizer=torch.optim.AdamW,
        generation=GenerationSettings(max_new_tokens=RESPONSE[1]),
    )
    rollout, advantages = policy_batch(spec["batch"], vocab, length, tuple(spec["response"]))
    peak = StepPeak()
    peak.start()
    logprobs, ids, mask = None, rollout.input_ids, rollout.attention_mask
    if spec["path"] == "before":  # the old update: full [B, T, V] logits, then log-softmax
        logprobs, _ = sequence_logprobs(policy, ids, mask, rollout.response_mask)
    elif spec["chunk_tokens"] != CHUNK_TOKENS:  # forward_logprobs with another chunk size
        logprobs = response_logprobs(
            policy,
            ids,
            mask,
            rollout.response_mask,
            position_ids=position_ids(mask),
            chunk_tokens=spec["chunk_tokens"],
        ).logprobs
    out = module.minibatch_loss(rollout, advantages, None, logprobs=logprobs)
    out["loss"].backward()
    result = peak.stop()
    full_logits = spec["batch"] * length * vocab * 4 / 2**20
    return {
        **result,
        "loss": float(out["loss"]),
        "response_tokens": int(rollout.response_mask.sum()),
        "full_logits_mb": full_logits,  # one [B, T, V] fp32 tensor
        "parameters": sum(p.numel() for p in policy.parameters()),
    }


# --- 3. padded fraction ------------------------------------------------------------------------
def padding_worker(spec: dict) -> dict:
    """Padded share of the reward model's positions on the default reviews task, per setting."""
    import torch

    from rlhf_lightning.data.preference import PreferenceCollator, PreferenceDataModule
    from rlhf_lightning.data.spec import TaskData
    from rlhf_lightning.microbatch import padded_fraction, plan
    from rlhf_lightning.models.factory import ModelSpec
    from rlhf_lightning.modules.reward_model import RewardModelModule
    from rlhf_lightning.tasks.reviews import ReviewsTask

    task = ReviewsTask(**spec["task"])
    root = Path(spec["root"])
    task.write(root / "data" / task.name)
    tokenizer = ModelSpec().tokenizer(task.corpus, cache_dir=root / "tokenizer")
    data = TaskData(task, str(root / "data"))
    dm = PreferenceDataModule(data, tokenizer, spec["batch_size"], spec["max_length"], seed=0)
    dm.setup("fit")
    train = dm.datasets["train"]
    collate = PreferenceCollator(tokenizer.pad_token_id)
    grouped = list(dm.train_dataloader())  # our order: LengthGroupedBatchSampler
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    size = spec["batch_size"]
    shuffled = [
        collate([train[i] for i in order[s : s + size]]) for s in range(0, len(order), size)
    ]
    rows = []
    for sampler, batches in (("length-grouped", grouped), ("random", shuffled)):
        for name, micro, budget in spec["settings"]:
            module = RewardModelModule(
                torch.nn.Linear(1, 1),
                optimizer=torch.optim.AdamW,
                micro_batch_size=micro,
                max_tokens_per_micro_batch=budget,
            )
            real = computed = forwards = widest = 0
            unit_fractions = []
            for batch in batches:
                lengths = module.unit_lengths(batch)
                unit_fractions.append(
                    padded_fraction(lengths, plan(len(lengths), micro, lengths, budget))
                )
                for part in module.parts(batch):  # what the network is fed
                    real += int(part["attention_mask"].sum())
                    computed += part["input_ids"].numel()
                    widest = max(widest, part["input_ids"].numel())
                    forwards += 1
            rows.append(
                {
                    "sampler": sampler,
                    "setting": name,
                    "micro_batch_size": micro,
                    "max_tokens_per_micro_batch": budget,
                    "padded_fraction": 1 - real / computed,
                    "unit_padded_fraction": sum(unit_fractions) / len(unit_fractions),
                    "forwards_per_batch": forwards / len(batches),
                    "max_positions_per_forward": widest,
                }
            )
    return {"batches": len(grouped), "pairs": len(train), "rows": rows}


WORKERS = {
    "rm": rm_worker,
    "policy": policy_worker,
    "padding": padding_worker,
    "prepare": common.prepare_worker,
}


# --- settings, runs and tables -----------------------------------------------------------------
def rm_settings(args, ws: common.Workspace) -> list[dict]:
    config = common.SIZES["tiny" if args.quick else "medium"]
    return [
        {
            "tokenizer_dir": ws.tokenizer_dir,
            "config": config,
            "pairs": args.rm_pairs,
            "length": args.rm_length,
            "micro_batch_size": micro,
            "checkpointing": checkpointing,
        }
        for checkpointing in {"both": (False, True), "off": (False,), "on": (True,)}[
            args.checkpointing
        ]
        for micro in args.micro_batches
    ]


def policy_settings(args) -> list[dict]:
    """Per vocabulary: before and after at --policy-batch; after at --policy-large-batch with
    the library's chunk size and each of --chunk-tokens."""
    from rlhf_lightning.models.logprobs import CHUNK_TOKENS

    out = []
    for vocab in args.vocabs:
        small = [("before", args.policy_batch, None), ("after", args.policy_batch, CHUNK_TOKENS)]
        large = args.policy_large_batch
        chunks = [CHUNK_TOKENS, *args.chunk_tokens] if large else []
        for path, batch, chunk in small + [("after", large, c) for c in chunks]:
            out.append(
                {
                    "vocab": vocab,
                    "batch": batch,
                    "length": args.policy_length,
                    "response": list(args.response),
                    "path": path,
                    "chunk_tokens": chunk,
                }
            )
    return out


def padding_spec(args, root: Path) -> dict:
    task = common.task_settings(256, 16, args.seed) if args.quick else {}  # {}: the default task
    budgets = [(f"budget {b}", None, b) for b in args.budgets]
    return {
        "root": str(root / ("padding-quick" if args.quick else "padding-default")),
        "task": task,
        "batch_size": 32,  # conf/rm/default.yaml
        "max_length": 128,
        "settings": [("whole batch", None, None), ("micro 8", 8, None), *budgets],
    }


def run_all(args, kind: str, specs: list[dict]) -> list[dict]:
    results = []
    for spec in specs:
        if args.in_process:
            result = WORKERS[kind](spec)
        else:
            result = common.run_worker(SCRIPT, kind, spec, args.threads)
        result = {**spec, **result}
        print(f"  {kind}: {_label(kind, result)}", flush=True)
        results.append(result)
    return results


def _label(kind: str, r: dict) -> str:
    if kind == "rm":
        setting = f"micro {r['micro_batch_size']}, checkpointing {r['checkpointing']}"
    else:
        setting = f"V={r['vocab']}, B={r['batch']}, {r['path']} (chunk {r['chunk_tokens']})"
    return (
        f"{setting}: step {r['step_mb']:.0f} MiB, peak {r['peak_mb']:.0f} MiB, {r['step_s']:.1f} s"
    )


def report_rm(results: list[dict]) -> None:
    rows = [
        [
            r["micro_batch_size"],
            "on" if r["checkpointing"] else "off",
            r["step_mb"],
            r["peak_mb"],
            r["rss_before_mb"],
            r["step_s"],
        ]
        for r in results
    ]
    weights = results[0]["weights_mb"]
    common.print_table(
        f"RM step: {results[0]['pairs']} pairs x {results[0]['length']} tokens, "
        f"{results[0]['parameters'] / 1e6:.1f}M parameters ({weights:.0f} MiB of weights; "
        f"gradients + AdamW state add {3 * weights:.0f} MiB)",
        ["micro", "checkpointing", "step MiB", "peak MiB", "before MiB", "step s"],
        rows,
    )


def report_policy(results: list[dict]) -> None:
    rows = [
        [
            r["vocab"],
            r["batch"],
            r["response_tokens"],
            r["path"],
            r["chunk_tokens"],
            r["step_mb"],
            r["peak_mb"],
            r["full_logits_mb"],
            r["step_s"],
        ]
        for r in results
    ]
    common.print_table(
        f"policy update forward/backward: B x {results[0]['length']} tokens, tiny-width Llama",
        [
            "vocab",
            "B",
            "resp tokens",
            "path",
            "chunk",
            "step MiB",
            "peak MiB",
            "[B,T,V] MiB",
            "step s",
        ],
        rows,
    )


def report_padding(result: dict) -> None:
    rows = [
        [
            r["sampler"],
            r["setting"],
            r["padded_fraction"],
            r["unit_padded_fraction"],
            r["forwards_per_batch"],
            r["max_positions_per_forward"],
        ]
        for r in result["rows"]
    ]
    common.print_table(
        f"RM padding: {result['pairs']} pairs in {result['batches']} batches of 32",
        ["order", "setting", "pad frac", "pair pad frac", "forwards/batch", "max positions"],
        rows,
    )


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["rm", "policy", "padding"])
    p.add_argument("--micro-batches", type=int, nargs="+", default=[16, 8, 4, 2, 1])
    p.add_argument("--checkpointing", choices=["both", "off", "on"], default="both")
    p.add_argument("--rm-pairs", type=int, default=RM_PAIRS)
    p.add_argument("--rm-length", type=int, default=RM_LENGTH)
    p.add_argument("--vocabs", type=int, nargs="+", default=[32000, 152064])
    p.add_argument("--policy-batch", type=int, default=4, help="B of before vs after")
    p.add_argument("--policy-large-batch", type=int, default=64, help="B of after only (0: none)")
    p.add_argument("--policy-length", type=int, default=POLICY_LENGTH)
    p.add_argument(
        "--chunk-tokens", type=int, nargs="*", default=[512], help="extra chunk sizes (after path)"
    )
    p.add_argument("--response", type=int, nargs=2, default=list(RESPONSE))
    p.add_argument("--budgets", type=int, nargs="+", default=[512, 1024])
    args = p.parse_args()
    if args.worker:
        return common.worker_main(args, WORKERS)
    if args.quick:
        args.in_process = True
        args.micro_batches, args.rm_pairs, args.rm_length = [4, 1], 4, 64
        args.vocabs, args.policy_batch, args.policy_large_batch = [16000], 2, 4
        args.policy_length, args.response, args.chunk_tokens = 64, [4, 8], [8]
    # glibc keeps freed blocks below its mmap threshold resident for reuse; set
    # MALLOC_MMAP_THRESHOLD_ (bytes) to see the live tensors' peak rather than the heap's
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    payload: dict = {"environment": {**common.environment(args), "malloc": malloc}}
    root = args.workdir or Path(common.tempfile.gettempdir()) / "rlhf-bench-memory"
    if "rm" in args.parts:
        ws = common.workspace_for(args, common.task_settings(64, 16, args.seed))
        settings = rm_settings(args, ws)
        print(f"RM step, {len(settings)} settings, one worker each")
        payload["rm"] = run_all(args, "rm", settings)
        report_rm(payload["rm"])
    if "policy" in args.parts:
        print("\npolicy update forward/backward, one worker each")
        payload["policy"] = run_all(args, "policy", policy_settings(args))
        report_policy(payload["policy"])
    if "padding" in args.parts:
        spec = padding_spec(args, Path(root))
        payload["padding"] = (
            padding_worker(spec)
            if args.in_process
            else common.run_worker(SCRIPT, "padding", spec, args.threads)
        )
        report_padding(payload["padding"])
    name = (
        "memory"
        if set(args.parts) == {"rm", "policy", "padding"}
        else "memory." + "-".join(args.parts)
    )
    common.write_json(args, name, payload)


if __name__ == "__main__":
    sys.exit(main())
