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

    python benchmarks/dpo_throughput.py [--quick] [--runs N] [--pairs P] [--epochs E]
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


def _load(spec: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_lightning.data.spec import TaskData
    from rlhf_lightning.tasks.reviews import ReviewsTask

    ws = common.Workspace(**spec["workspace"])
    data = TaskData(ReviewsTask(**spec["task"]), ws.data_dir)
    policy = AutoModelForCausalLM.from_pretrained(ws.policy_dir)  # the same init for both sides
    return ws, data, AutoTokenizer.from_pretrained(ws.tokenizer_dir), policy


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
        optimizer=partial(torch.optim.AdamW, lr=spec["lr"], weight_decay=0.0),
        scheduler=partial(get_cosine_schedule_with_warmup, num_warmup_steps=spec["warmup_steps"]),
        beta=BETA,
        precompute_ref_logprobs=spec["precompute"],
        forward_batch_size=spec["batch_size"],
    )
    datamodule = PreferenceDataModule(
        data, tokenizer, batch_size=spec["batch_size"], max_length=spec["max_length"], seed=0
    )
    clock = common.StepClock()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
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


def run_trl(spec: dict) -> dict:
    """`trl.DPOTrainer` + `DPOConfig`: the same model init, the same pairs (TRL format)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    start = time.perf_counter()
    ws, data, tokenizer, policy = _load(spec)
    trl_tokenizer = AutoTokenizer.from_pretrained(ws.trl_tokenizer_dir)
    rows = common.read_jsonl(Path(ws.data_dir) / "reviews" / "prefs_train.jsonl")
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
            optim="adamw_torch",
            max_grad_norm=0.0,
            max_length=spec["max_length"],
            gradient_checkpointing=False,
            bf16=False,
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


WORKERS = {"ours": run_ours, "trl": run_trl, "prepare": common.prepare_worker}


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=1024, help="training pairs")
    p.add_argument("--epochs", type=int, default=1, help="passes over the pairs")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per step")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sequence")
    args = p.parse_args()
    if args.worker:
        return common.worker_main(args, WORKERS)
    if args.quick:
        args.in_process, args.runs, args.pairs = True, 1, 256
    settings = common.task_settings(args.pairs, 64, args.seed)
    steps = args.epochs * -(-args.pairs // args.batch_size)
    sides = ["ours"] + ([] if args.ours_only or not common.has_trl() else ["trl"])
    ws = common.workspace_for(args, settings)
    payload = {}
    for precompute in (True, False):
        spec = {
            "workspace": vars(ws),
            "task": settings,
            "steps": steps,
            "warmup": min(3, steps - 1),
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "lr": 5e-4,
            "warmup_steps": min(10, steps // 4),
            "precompute": precompute,
        }
        print(
            f"DPO throughput: {args.pairs} pairs x {args.epochs} epoch(s) = {steps} steps of "
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
        payload[f"precompute={precompute}"] = {"spec": spec, "median": med, "ratio": ratio}
    common.write_json(args, "dpo_throughput", {"environment": common.environment(args), **payload})


if __name__ == "__main__":
    sys.exit(main())
