"""Reward-model training throughput (pairs/s): `RewardModelModule` vs `trl.RewardTrainer`.

Both sides train the same Llama (`--size tiny`: conf/model/tiny.yaml; `--size medium`: hidden 512,
8 layers, ~25M parameters, max length 512; `LlamaForSequenceClassification`, num_labels=1, the
same init seed) with the Bradley–Terry loss on the same 2,048 pairs of the
built-in reviews task, in fp32 on the CPU, with the same batch size, max length, AdamW
(lr, weight decay), cosine schedule with warm-up and number of steps; no gradient clipping,
checkpointing, logging or progress bars. TRL reads the pairs in its preference format
(prompt/chosen/rejected text) and tokenises them itself: its tokenizer is ours with a BOS-only
post-processor (TRL appends the EOS text), so both sides train on identical token ids (checked).
After training, one evaluator scores the held-out pairs for both (accuracy = P[r⁺ > r⁻]).

`--prompt-tokens N` puts N words (≈ N tokens) of generated context before every prompt
(task.context_tokens, the same files for both sides); the max length is raised to N + 128 where
smaller (nothing is truncated: TRL would drop longer pairs), and the position limit with it.
`--shared-prefix on|off|both`: our side with a pair's prompt run once (rm.shared_prefix), without
it (side `ours_plain`), or both.

`--size smollm2`: both sides train SmolLM2-135M-Instruct (`common.prepare_chat_workspace`: the
converted checkpoint under a score head drawn from the seed) on chat pairs of its own samples
(rendered with its chat template; chosen = the response the chat task's gold judge prefers), 8
steps of 8 pairs at lr 1e-5 by default, accuracy on the last held-out pairs of the samples.
`--precision bf16`: our `trainer.precision=bf16-mixed`, TRL's `bf16=True` (fp32 by default).

Learning per pair and per second (issue 15): `--eval-every K` scores the held-out pairs every K
steps with the clock paused, giving each run a learning curve (step, training seconds, accuracy);
the report adds the time to a target accuracy (`--target`, default: the lower side's mean final
accuracy minus 0.01) and each side's accuracy at equal training time (the shorter side's).
`--seeds 0 1 2` repeats everything per seed (own pairs, own init); accuracies are then given as
mean ± std over seeds. `--factors shuffle ...` adds our side with one setting changed (FACTORS).

    python benchmarks/rm_throughput.py [--quick] [--size tiny|medium|smollm2] [--runs N] [--epochs E]
        [--prompt-tokens N] [--shared-prefix on|off|both] [--eval-every K] [--target ACC]
        [--seeds S ...] [--val-pairs N] [--factors NAME ...] [--precision fp32|bf16]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import common

SCRIPT = Path(__file__).resolve()
# per --size: (pairs, epochs, batch size, max length, held-out pairs); options given win
SIZE_DEFAULTS = {
    "tiny": (2048, 3, 32, 128, 512),
    "medium": (384, 1, 32, 512, 128),
    "smollm2": (64, 1, 8, 512, 64),  # 8 steps of 8 chat pairs (~100 tokens a sequence)
}
QUICK = {"tiny": (256, 1, 32, 128, 64), "medium": (32, 1, 8, 512, 16), "smollm2": (4, 1, 2, 512, 4)}
# --lr default per --size: a pretrained checkpoint takes a fine-tuning rate
LR = {"tiny": 1e-3, "medium": 1e-3, "smollm2": 1e-5}
# --factors: our side with one setting changed (side `ours_<name>`), for per-factor tables
FACTORS = {
    "shuffle": {"length_group": 1},  # uniform batches, as TRL samples (no length grouping)
    "decay_all": {"no_decay": []},  # weight decay on biases, norms and embeddings too
    "zero_head": {"score_init_std": 0.0},  # every score starts at 0
    "constant_lr": {"scheduler": False},  # no warm-up, no cosine decay
    "top4": {"trainable_layers": 4},  # rm.trainable_layers=4: the top 4 blocks, norm and head
    "lora16": {"lora": {"r": 16, "alpha": 32}},  # rm.lora={r:16,alpha:32}: adapter + head
    "flash_backward": {"max_scores": 0},  # attention's backward SDPA's own (models/attention.py)
    "unfused": {"fused": False},  # AdamW per tensor, as before the stages' fused default
}


def build_reward_model(tokenizer, seed: int, ws: common.Workspace):
    """The seq-cls Llama both sides start from (same seed, same init; a checkpoint's backbone
    under a score head drawn from the seed)."""
    import torch

    torch.manual_seed(seed)
    return common.model_spec(ws).reward_model(tokenizer)


def count_tokens(model) -> dict:
    """Real and computed positions of every training pass of `model`'s backbone (a hook).

    On the backbone, not the classifier: our scoring calls the backbone directly, and with shared
    prompts in two passes (the prompt, then the responses against its cache); the new positions
    of a pass are its input's, its real ones the last columns of its attention mask.
    """
    counts = {"real": 0, "padded": 0}

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if module.training and ids is not None and mask is not None and mask.dim() == 2:
            counts["real"] += int(mask[:, -ids.shape[1] :].sum())
            counts["padded"] += ids.numel()

    model.base_model.register_forward_pre_hook(hook, with_kwargs=True)
    return counts


def pair_accuracy(model, tokenizer, records, max_length: int, batch_size: int = 128) -> float:
    """P[r(chosen) > r(rejected)] on `records` (ties count as wrong)."""
    import torch

    from rlhf_lightning.data.preference import PreferenceCollator, encode_pair

    collate = PreferenceCollator(tokenizer.pad_token_id)
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(records), batch_size):
            items = [
                encode_pair(tokenizer, r, max_length) for r in records[start : start + batch_size]
            ]
            batch = collate(items)
            scores = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            chosen, rejected = scores[:, 0].chunk(2)
            correct += int((chosen > rejected).sum())
    return correct / len(records)


def _load(spec: dict):
    from transformers import AutoTokenizer

    ws = common.Workspace(**spec["workspace"])
    data = common.preference_data(ws, spec["task"])
    return ws, data, AutoTokenizer.from_pretrained(ws.tokenizer_dir)


def _result(spec, clock, counts, setup_s, total_s, probe) -> dict:
    steps, seconds = clock.steady(spec["warmup"])
    return {
        "prompt_length": counts.get("prompt_length"),
        "throughput": steps * spec["batch_size"] / seconds,  # pairs/s
        "step_s": seconds / steps,
        "median_step_s": clock.median_step(spec["warmup"]),
        "steps": len(clock.ends),
        "setup_s": setup_s,
        "total_s": total_s,
        "train_s": clock.ends[-1] - clock.started,  # first to last step, evaluations excluded
        "padding_fraction": 1 - counts["real"] / max(counts["padded"], 1),
        "accuracy": probe.final(),
        "curve": probe.curve,
    }


def run_ours(spec: dict) -> dict:
    """`RewardModelModule` + `PreferenceDataModule` + `lightning.Trainer`."""
    import lightning as L
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from rlhf_lightning.data.preference import PreferenceDataModule
    from rlhf_lightning.modules.reward_model import RewardModelModule
    from rlhf_lightning.stages.rm import redraw_score_head

    start = time.perf_counter()
    ws, data, tokenizer = _load(spec)
    model = build_reward_model(tokenizer, spec["seed"], ws)
    counts = count_tokens(model)  # (the hook fills this very dict)
    counts.update(_lengths(data, tokenizer, spec["max_length"], spec.get("prompt_tokens", 0)))
    factor = spec.get("factor", {})
    if factor.get("trainable_layers") is not None:  # as the RM stage applies rm.trainable_layers
        from rlhf_lightning.models.factory import train_top_layers

        train_top_layers(model, factor["trainable_layers"])
    if factor.get("lora") is not None:  # ... and rm.lora
        from rlhf_lightning.models.lora import lora_settings, reward_model_with_lora

        model = reward_model_with_lora(model, lora_settings(factor["lora"]))
    if factor.get("score_init_std") is not None:
        redraw_score_head(model, factor["score_init_std"])
    scheduler = partial(get_cosine_schedule_with_warmup, num_warmup_steps=spec["warmup_steps"])
    module = RewardModelModule(
        model,
        optimizer=partial(
            torch.optim.AdamW,
            lr=spec["lr"],
            weight_decay=spec["weight_decay"],
            fused=factor.get("fused", True),
        ),
        scheduler=scheduler if factor.get("scheduler", True) else None,
        use_margin=False,
        shared_prefix=spec.get("shared_prefix", True),
        **({"no_decay": factor["no_decay"]} if "no_decay" in factor else {}),
    )
    datamodule = PreferenceDataModule(
        data,
        tokenizer,
        batch_size=spec["batch_size"],
        max_length=spec["max_length"],
        seed=spec["seed"],
        length_group=factor.get("length_group", 50),
    )
    clock = common.StepClock()
    probe = _probe(spec, clock, model, tokenizer, data)
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
        callbacks=[common.lightning_clock(clock, probe)],
    )
    trainer.fit(module, datamodule=datamodule)
    total_s = time.perf_counter() - start
    return _result(spec, clock, counts, clock.started - start, total_s, probe)


def _probe(spec: dict, clock, model, tokenizer, data):
    """Held-out accuracy every `eval_every` steps, the model put back in training mode after."""
    val = data.load("prefs", "val").records

    def evaluate() -> float:
        accuracy = pair_accuracy(model, tokenizer, val, spec["max_length"])
        model.train()
        return accuracy

    return common.Probe(clock, evaluate, spec.get("eval_every", 0), spec["steps"])


def _lengths(data, tokenizer, max_length: int, prompt_tokens: int) -> dict:
    """Mean prompt tokens of the training pairs; with --prompt-tokens, raises if a pair is longer
    than max_length (we would truncate it, TRL drop it: not the same work)."""
    from rlhf_lightning.data.preference import encode_pair

    records = data.load("prefs", "train").records
    items = [encode_pair(tokenizer, r, max_length + 1) for r in records]
    longest = max(len(ids) for item in items for ids in (item["chosen"], item["rejected"]))
    if prompt_tokens and longest > max_length:
        raise RuntimeError(f"a pair has {longest} tokens > max length {max_length}")
    prompts = [n for item in items for n in item["prompt_lengths"]]
    return {"prompt_length": sum(prompts) / len(prompts), "longest": longest}


def run_ours_plain(spec: dict) -> dict:
    """Our side without the shared prompt pass (--shared-prefix off/both)."""
    return run_ours({**spec, "shared_prefix": False})


def run_trl(spec: dict) -> dict:
    """`trl.RewardTrainer` + `RewardConfig`: the same model init, the same pairs (TRL format)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import RewardConfig, RewardTrainer

    start = time.perf_counter()
    ws, data, tokenizer = _load(spec)
    trl_tokenizer = AutoTokenizer.from_pretrained(ws.trl_tokenizer_dir)
    rows = common.read_jsonl(Path(ws.data_dir) / ws.task / "prefs_train.jsonl")
    check_same_ids(tokenizer, trl_tokenizer, rows[:256], spec["max_length"])
    model = build_reward_model(tokenizer, spec["seed"], ws)
    counts = count_tokens(model)
    clock = common.StepClock()
    probe = _probe(spec, clock, model, tokenizer, data)
    with tempfile.TemporaryDirectory(prefix="trl-rm-") as out:
        config = RewardConfig(
            output_dir=out,
            per_device_train_batch_size=spec["batch_size"],
            max_steps=spec["steps"],
            learning_rate=spec["lr"],
            weight_decay=spec["weight_decay"],
            lr_scheduler_type="cosine",
            warmup_steps=spec["warmup_steps"],
            optim="adamw_torch_fused",  # TRL's default; ours: AdamW(fused=True)
            max_grad_norm=0.0,
            max_length=spec["max_length"],
            center_rewards_coefficient=None,
            gradient_checkpointing=False,
            bf16=common.precision(spec)[1],
            fp16=False,
            use_cpu=True,
            seed=spec["seed"],
            report_to="none",
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
        )
        trainer = RewardTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=trl_tokenizer,
            callbacks=[common.trl_clock(clock, probe)],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    total_s = time.perf_counter() - start
    return _result(spec, clock, counts, clock.started - start, total_s, probe)


def check_same_ids(tokenizer, trl_tokenizer, rows: list[dict], max_length: int) -> None:
    """TRL's tokenisation (prompt + chosen + EOS text) must give our ids, or the race is unfair."""
    from rlhf_lightning.data.preference import encode_pair
    from rlhf_lightning.data.records import PreferenceRecord

    for row in rows:
        ours = encode_pair(tokenizer, PreferenceRecord(**row), max_length)
        for side in ("chosen", "rejected"):
            theirs = trl_tokenizer(text=row["prompt"] + row[side] + trl_tokenizer.eos_token)
            if theirs["input_ids"] != ours[side]:
                raise RuntimeError(f"TRL tokenises {row!r} differently: {theirs} vs {ours[side]}")


def run_factor(spec: dict, name: str) -> dict:
    """Our side with one setting of FACTORS changed (side `ours_<name>`)."""
    from rlhf_lightning.models import attention

    kept = attention.MAX_SCORES  # restored: --in-process runs the other sides after this one
    attention.MAX_SCORES = FACTORS[name].get("max_scores", kept)
    try:
        return run_ours({**spec, "factor": FACTORS[name]})
    finally:
        attention.MAX_SCORES = kept


WORKERS = {
    "ours": run_ours,
    "ours_plain": run_ours_plain,
    "trl": run_trl,
    "prepare": common.prepare_worker,
    **{f"ours_{name}": partial(run_factor, name=name) for name in FACTORS},
}


def size_defaults(args) -> int:
    """Fill the options left unset from `SIZE_DEFAULTS[args.size]`; return the held-out pairs."""
    pairs, epochs, batch_size, max_length, val_pairs = SIZE_DEFAULTS[args.size]
    args.pairs = args.pairs or pairs
    args.epochs = args.epochs or epochs
    args.batch_size = args.batch_size or batch_size
    args.max_length = args.max_length or max_length
    return args.val_pairs or val_pairs


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, help="training pairs (tiny 2048, medium 384)")
    p.add_argument("--epochs", type=int, help="passes over the pairs (tiny 3 as conf, medium 1)")
    p.add_argument("--batch-size", type=int, help="pairs per step (32)")
    p.add_argument("--max-length", type=int, help="tokens per sequence (tiny 128, medium 512)")
    p.add_argument("--val-pairs", type=int, help="held-out pairs (tiny 512, medium 128)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between held-out scorings")
    p.add_argument("--target", type=float, help="accuracy for the time-to-target column")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds to repeat over (default --seed)")
    p.add_argument("--factors", nargs="*", default=[], choices=sorted(FACTORS))
    p.add_argument("--lr", type=float, help="AdamW learning rate, both sides (LR per --size)")
    args = p.parse_args()
    if args.worker:
        return common.worker_main(args, WORKERS)
    if args.quick:
        args.in_process, args.runs = True, 1
        args.pairs, args.epochs, args.batch_size, args.max_length, val_pairs = QUICK[args.size]
    else:
        val_pairs = size_defaults(args)
    args.lr = args.lr or LR[args.size]
    if args.prompt_tokens:  # room for the context (never truncated) and positions for it
        args.max_length = max(args.max_length, args.prompt_tokens + 128)
    steps = args.epochs * -(-args.pairs // args.batch_size)
    sides = common.our_sides(args)
    at = sides.index("trl") if "trl" in sides else len(sides)
    sides[at:at] = [f"ours_{name}" for name in args.factors]  # ours, ours_<factor>..., trl
    seeds = args.seeds or [args.seed]
    print(
        f"RM throughput ({args.size}, {args.precision}): {args.pairs} pairs x {args.epochs} epoch(s) = {steps} "
        f"steps of {args.batch_size} pairs (max length {args.max_length}), context "
        f"{args.prompt_tokens} tokens, shared prefix {args.shared_prefix}, {args.runs} run(s) "
        f"per side, {args.threads} thread(s), seeds {seeds}, held-out pairs {val_pairs}"
    )
    results: dict[str, list[dict]] = {side: [] for side in sides}
    for seed in seeds:
        args.seed = seed
        settings = common.task_settings(args.pairs, val_pairs, seed, args.prompt_tokens)
        ws = common.workspace_for(args, settings)
        spec = {
            "workspace": vars(ws),
            "task": settings,
            "seed": seed,
            "steps": steps,
            "warmup": min(5 if args.size == "tiny" else 2, steps - 1),
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "prompt_tokens": args.prompt_tokens,
            "lr": args.lr,
            "precision": args.precision,
            "weight_decay": 0.01,
            "warmup_steps": min(20, steps // 4),  # conf/rm/default
            "eval_every": args.eval_every,
        }
        for side, runs in common.measure(SCRIPT, args, sides, spec, WORKERS, args.runs).items():
            results[side] += [{**run, "seed": seed} for run in runs]
    report(args, spec, results)


def report(args, spec: dict, results: dict[str, list[dict]]) -> None:
    med = {side: {k: common.median(runs, k) for k in runs[0]} for side, runs in results.items()}
    columns = {
        "pairs/s": "throughput",
        "ms/step": "step_s",
        "median ms/step": "median_step_s",
        "val acc": "accuracy",
        "pad frac": "padding_fraction",
        "prompt len": "prompt_length",
        "setup s": "setup_s",
        "total s": "total_s",
        "peak RSS MiB": "peak_rss_mb",
    }
    rows = [
        [side, len(results[side]), *(m.get(k) for k in columns.values())] for side, m in med.items()
    ]
    for row in rows:  # seconds -> milliseconds
        row[3], row[4] = row[3] * 1e3, row[4] * 1e3
    common.print_table("reward-model training (medians)", ["side", "runs", *columns], rows)
    every = common.all_ratios(results, "pairs/s")  # printed; ours/trl as before
    ratio = every.get("ours/trl")
    payload = {"spec": spec, "median": med, "ratio_pairs_per_s": ratio, "ratios": every}
    payload["learning"] = learning(args, results)
    payload["runs"] = results
    common.write_json(args, "rm_throughput", {"environment": common.environment(args), **payload})


def learning(args, results: dict[str, list[dict]]) -> dict | None:
    """Accuracy over seeds, time to the target accuracy and accuracy at equal training time.

    Per seed, a side's runs are summarised by their medians; the table gives mean ± std over
    seeds. Equal time: per seed, the shorter of the sides' median training times; each side's
    accuracy is its last evaluation at or before it. Printed, and returned for the JSON."""
    if not any(run.get("curve") for runs in results.values() for run in runs):
        return None
    seeds = sorted({run["seed"] for runs in results.values() for run in runs})
    per_seed = {side: {seed: [r for r in runs if r["seed"] == seed] for seed in seeds}
                for side, runs in results.items()}  # fmt: skip
    final = {side: [common.median(by[seed], "accuracy") for seed in seeds]
             for side, by in per_seed.items()}  # fmt: skip
    target = args.target or min(statistics.mean(v) for v in final.values()) - 0.01
    trained = {side: [common.median(by[seed], "train_s") for seed in seeds]
               for side, by in per_seed.items()}  # fmt: skip
    equal = [min(t[i] for t in trained.values()) for i in range(len(seeds))]
    rows, out = [], {"target": target, "seeds": seeds, "equal_time_s": equal, "sides": {}}
    for side, by in per_seed.items():
        reach = [_median_or_none([common.time_to_target(r["curve"], target) for r in by[seed]])
                 for seed in seeds]  # fmt: skip
        at_equal = [_median_or_none([common.value_at(r["curve"], equal[i]) for r in by[seed]])
                    for i, seed in enumerate(seeds)]  # fmt: skip
        side_out = {"final": final[side], "train_s": trained[side], "time_to_target_s": reach,
                    "accuracy_at_equal_time": at_equal}  # fmt: skip
        out["sides"][side] = side_out
        rows.append([side, len(seeds), _mean_std(final[side]), _mean_std(reach),
                     _mean_std(at_equal), _mean_std(trained[side])])  # fmt: skip
    header = ["side", "seeds", "final acc", f"s to {target:.3f}", "acc at equal s", "train s"]
    common.print_table("learning per pair and per second (mean ± std over seeds)", header, rows)
    return out


def _median_or_none(values: list) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if len(found) == len(values) and found else None


def _mean_std(values: list) -> str:
    """'mean ± std' of the values, or 'not reached (k/n)' when some are None."""
    found = [v for v in values if v is not None]
    if len(found) < len(values):
        return f"not reached ({len(values) - len(found)}/{len(values)})"
    spread = statistics.stdev(found) if len(found) > 1 else 0.0
    return f"{statistics.mean(found):.3f} ± {spread:.3f}"


if __name__ == "__main__":
    sys.exit(main())
