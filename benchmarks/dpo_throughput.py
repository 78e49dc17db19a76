"""DPO training throughput (pairs/s): `DPOModule` vs `trl.DPOTrainer`, reference log-probs
precomputed (both) or recomputed every step (both).

Both sides train the same Llama causal LM (conf/model/tiny.yaml shape, the same init; the frozen
reference a copy of it) with the sigmoid DPO loss at β = 0.1 on the same pairs of the built-in
reviews task, in fp32 on the CPU, with the same batch size, max length, AdamW, cosine schedule
with warm-up and number of steps; no gradient clipping, checkpointing, logging or progress bars;
dropout off on both (TRL's default). TRL reads the pairs in its preference format and tokenises
them itself with our vocabulary and a BOS-only post-processor (it appends the EOS text), so both
train on identical token ids (checked, as in rm_throughput.py). pairs/s is measured over the
steady steps (after `warmup` steps); the one-off reference pass is in `setup s` / `total s`.

`--size smollm2`: both sides train SmolLM2-135M-Instruct (the reference a copy) on chat pairs of
its own samples (`common.prepare_chat_workspace`), 8 steps of 8 pairs at lr 1e-6 by default.
`--precision bf16`: our `bf16-mixed`, TRL's `bf16=True`. `--reference precomputed|every-step`
measures one of the two settings (default both). `--shared-prefix on|off|both`: our side with a
pair's prompt run once (dpo.shared_prefix, the default), without it (side `ours_plain`), or both.

    python benchmarks/dpo_throughput.py [--quick] [--size tiny|medium|smollm2] [--runs N]
        [--pairs P] [--epochs E] [--precision fp32|bf16] [--reference both|precomputed|every-step]
        [--shared-prefix on|off|both]
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import common
from rm_throughput import check_same_ids

SCRIPT = Path(__file__).resolve()
BETA = 0.1
# per --size: (pairs, batch size, max length, lr); options given win
SIZE_DEFAULTS = {
    "tiny": (1024, 32, 128, 5e-4),
    "medium": (1024, 32, 128, 5e-4),
    "smollm2": (64, 8, 512, 1e-6),  # chat pairs of ~100 tokens a sequence
}
QUICK = {"tiny": (256, 32, 128, 5e-4), "medium": (256, 32, 128, 5e-4), "smollm2": (4, 2, 512, 1e-6)}
REFERENCE = {"both": (True, False), "precomputed": (True,), "every-step": (False,)}


def _load(spec: dict):
    from transformers import AutoTokenizer

    ws = common.Workspace(**spec["workspace"])
    data = common.preference_data(ws, spec["task"])
    tokenizer = AutoTokenizer.from_pretrained(ws.tokenizer_dir)
    policy = common.causal_lm(ws, tokenizer)  # the same init for both sides
    return ws, data, tokenizer, policy


def _result(spec, clock, setup_s, total_s) -> dict:
    steps, seconds = clock.steady(spec["warmup"])
    return {
        "throughput": steps * spec["batch_size"] / seconds,  # pairs/s
        "step_s": seconds / steps,
        "median_step_s": clock.median_step(spec["warmup"]),
        "steps": len(clock.ends),
        "setup_s": setup_s,
        "total_s": total_s,
    }


def run_ours(spec: dict) -> dict:
    """`DPOModule` + `PreferenceDataModule` + `lightning.Trainer`."""
    import lightning as L
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from rlhf_lightning.data.preference import PreferenceDataModule
    from rlhf_lightning.modules.dpo import DPOModule

    start = time.perf_counter()
    ws, data, tokenizer, policy = _load(spec)
    module = DPOModule(
        policy,
        copy.deepcopy(policy),
        tokenizer,
        optimizer=partial(torch.optim.AdamW, lr=spec["lr"], weight_decay=0.0, fused=True),
        scheduler=partial(get_cosine_schedule_with_warmup, num_warmup_steps=spec["warmup_steps"]),
        beta=BETA,
        precompute_ref_logprobs=spec["precompute"],
        forward_batch_size=spec["batch_size"],
        shared_prefix=spec.get("shared_prefix", True),
    )
    datamodule = PreferenceDataModule(
        data, tokenizer, batch_size=spec["batch_size"], max_length=spec["max_length"], seed=0
    )
    clock = common.StepClock()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=common.precision(spec)[0],
        max_steps=spec["steps"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[common.lightning_clock(clock)],
    )
    trainer.fit(module, datamodule=datamodule)
    return _result(spec, clock, clock.started - start, time.perf_counter() - start)


def run_ours_plain(spec: dict) -> dict:
    """Our side without the shared prompt pass (--shared-prefix off/both): a pair's prompt twice."""
    return run_ours({**spec, "shared_prefix": False})


def run_trl(spec: dict) -> dict:
    """`trl.DPOTrainer` + `DPOConfig`: the same model init, the same pairs (TRL format)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    start = time.perf_counter()
    ws, data, tokenizer, policy = _load(spec)
    trl_tokenizer = AutoTokenizer.from_pretrained(ws.trl_tokenizer_dir)
    rows = common.read_jsonl(Path(ws.data_dir) / ws.task / "prefs_train.jsonl")
    check_same_ids(tokenizer, trl_tokenizer, rows[:256], spec["max_length"])
    clock = common.StepClock()
    with tempfile.TemporaryDirectory(prefix="trl-dpo-") as out:
        config = DPOConfig(
            output_dir=out,
            beta=BETA,
            per_device_train_batch_size=spec["batch_size"],
            precompute_ref_log_probs=spec["precompute"],
            precompute_ref_batch_size=spec["batch_size"],
            max_steps=spec["steps"],
            learning_rate=spec["lr"],
            weight_decay=0.0,
            lr_scheduler_type="cosine",
            warmup_steps=spec["warmup_steps"],
            optim=spec.get("trl_optim", "adamw_torch_fused"),  # TRL's default; ours: fused
            max_grad_norm=0.0,
            max_length=spec["max_length"],
            gradient_checkpointing=False,
            bf16=common.precision(spec)[1],
            fp16=False,
            use_cpu=True,
            seed=0,
            report_to="none",
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
        )
        trainer = DPOTrainer(
            model=policy,
            ref_model=copy.deepcopy(policy),
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=trl_tokenizer,
            callbacks=[common.trl_clock(clock)],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return _result(spec, clock, clock.started - start, time.perf_counter() - start)


def run_trl_torch(spec: dict) -> dict:
    """TRL with the per-tensor AdamW (`optim="adamw_torch"`), beside its fused default."""
    return run_trl({**spec, "trl_optim": "adamw_torch"})


WORKERS = {
    "ours": run_ours,
    "ours_plain": run_ours_plain,
    "trl": run_trl,
    "trl_torch": run_trl_torch,
    "prepare": common.prepare_worker,
}


def with_trl_optim(sides: list[str], trl_optim: str) -> list[str]:
    """The sides for --trl-optim: TRL's fused AdamW as `trl`, its per-tensor one as `trl_torch`
    (both: `trl`, then `trl_torch`); without TRL, unchanged."""
    if "trl" not in sides or trl_optim == "fused":
        return sides
    return [s for s in sides if s != "trl" or trl_optim == "both"] + ["trl_torch"]


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, help="training pairs (tiny 1024, smollm2 64)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the pairs")
    p.add_argument("--batch-size", type=int, help="pairs per step (tiny 32, smollm2 8)")
    p.add_argument("--max-length", type=int, help="tokens per sequence (tiny 128, smollm2 512)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (tiny 5e-4, smollm2 1e-6)")
    p.add_argument("--reference", choices=sorted(REFERENCE), default="both")
    p.add_argument(
        "--trl-optim",
        choices=["fused", "torch", "both"],
        default="fused",
        help="TRL's AdamW: fused (its default, side trl), per tensor (side trl_torch), or both",
    )
    args = p.parse_args()
    if args.worker:
        return common.worker_main(args, WORKERS)
    table = QUICK if args.quick else SIZE_DEFAULTS
    if args.quick:
        args.in_process, args.runs, args.pairs = True, 1, None
    for name, value in zip(("pairs", "batch_size", "max_length", "lr"), table[args.size]):
        if getattr(args, name) is None:
            setattr(args, name, value)
    held_out = 64 if args.size != "smollm2" else 8  # (DPO reports no held-out metric)
    settings = common.task_settings(args.pairs, held_out, args.seed)
    steps = args.epochs * -(-args.pairs // args.batch_size)
    sides = common.our_sides(args)  # --shared-prefix on|off|both: ours, ours_plain
    sides = with_trl_optim(sides, args.trl_optim)
    ws = common.workspace_for(args, settings)
    payload = {}
    for precompute in REFERENCE[args.reference]:
        spec = {
            "workspace": vars(ws),
            "task": settings,
            "steps": steps,
            "warmup": min(3 if args.size != "smollm2" else 2, steps - 1),
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "lr": args.lr,
            "precision": args.precision,
            "warmup_steps": min(10, steps // 4),
            "precompute": precompute,
        }
        print(
            f"DPO throughput ({args.size}, {args.precision}): {args.pairs} pairs x {args.epochs} epoch(s) = {steps} steps of "
            f"{args.batch_size} pairs (max length {args.max_length}), reference precomputed: "
            f"{precompute}, {args.runs} run(s) per side, {args.threads} thread(s)"
        )
        results = common.measure(SCRIPT, args, sides, spec, WORKERS, args.runs)
        med = {s: {k: common.median(r, k) for k in r[0]} for s, r in results.items()}
        columns = ["throughput", "median_step_s", "setup_s", "total_s", "peak_rss_mb"]
        rows = [[s, len(results[s]), *(m.get(k) for k in columns)] for s, m in med.items()]
        header = ["side", "runs", "pairs/s", "median s/step", "setup s", "total s", "RSS MiB"]
        common.print_table(f"DPO training, precompute={precompute} (medians)", header, rows)
        ratio = common.ratios(results, "pairs/s")
        if "trl_torch" in results:
            ratio = {
                **(ratio or {}),
                "trl_torch": common.ratios(results, "pairs/s", "ours", "trl_torch"),
            }
        payload[f"precompute={precompute}"] = {"spec": spec, "median": med, "ratio": ratio}
    common.write_json(args, "dpo_throughput", {"environment": common.environment(args), **payload})


if __name__ == "__main__":
    sys.exit(main())
