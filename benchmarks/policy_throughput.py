"""Policy-stage throughput (completions/s): `PolicyModule` (algo=rloo) vs `trl.RLOOTrainer`.

Both sides start from the same Llama policy (random init, saved once; its copy is the frozen
reference) and score with a seq-cls reward model of the same shape (`--size tiny`:
conf/model/tiny.yaml; `--size medium`: hidden 512, 8 layers, ~25M parameters), in fp32 on the CPU. Matched per
step: prompts per step P, samples per prompt k, response length max_new_tokens T (sampling at
temperature 1, no top-k/top-p), one optimisation epoch over one minibatch (one AdamW step, lr 2e-4,
betas (0.9, 0.95), grad-norm clip 1), β > 0 so both compute reference log-probs, and both compute
log p_old with a separate no-grad forward. TRL ≥ 1.0 implements RLOO on its GRPO-style trainer:
`per_device_train_batch_size` counts completions (P·k), `num_generations` is k, `num_iterations` is
the number of epochs. A random-init policy rarely samples EOS, so responses run to T on both sides
(the mean length is reported).

The time of each of our steps is split into phases by wrapping the functions `PolicyModule` calls
(`sample`, `forward_logprobs`, `decode_responses`, the reward and `_update`)
with `time.perf_counter`; the same is done on TRL's trainer methods for comparison.

`--prompt-tokens N` puts N words (≈ N tokens) of generated context before every prompt
(task.context_tokens; the same files for both sides; the models' position limit and our reward's
max_length are raised to fit, TRL truncates neither prompts nor reward inputs).
`--shared-prefix on|off|both` runs our side with each prompt once per group of k samples
(policy.shared_prefix, reward.shared_prefix), without it (side `ours_plain`), or both.

`--size smollm2`: the policy (and its reference) is SmolLM2-135M-Instruct, the reward model the
same checkpoint under a fresh score head, the prompts the chat-rendered user turns of
`common.prepare_chat_workspace` (the same text for both sides), lr 1e-6; 4 prompts × k=4, T=48,
3 steps (1 warm-up) by default. `--precision bf16`: our `bf16-mixed`, TRL's `bf16=True`.

`--reward-model DIR`: both sides optimise a trained reward model (e.g. artifacts/chat/rm of
`python train.py experiment=smollm2_rm`) instead of the fresh head. Ours reads it as `reward=learned`
does, normalised by the artifact's `reward_stats` (β is on that scale); TRL gets the same scale
through `reward_weights=[1/std]` (the mean cancels in the leave-one-out baseline), so one β means
the same penalty on both sides. `--missing-eos-penalty X` subtracts X from the normalised reward
of completions cut at T on both sides (ours: `policy.missing_eos_penalty`; TRL, which has no such
option: a second reward function, `MissingEosPenalty`, at weight 1). `--recipe` takes P, k, T, the
sampling temperature, the learning rate, β, the missing-EOS penalty and the precision from
conf/experiment/smollm2_policy.yaml and the policy stage's defaults (what `python train.py
experiment=smollm2_policy` trains with; --steps stays yours).

`--gold N`: after the runs, each side's final policy (its last run) is saved as a policy artifact
(`--policies DIR`, default <workspace>/policies/<side>; manifest reference_path = the initial
policy) and both are evaluated by `eval.py` on the task's first N held-out prompts, ours as
`policy`, TRL's as `compare`, the initial policy as `reference`, the RM as the proxy, with the
training T and temperature: gold and proxy reward, KL, win rates over the reference and between
the sides, paired differences with 95 % intervals over prompts (the JSON's `gold`; the eval
folder beside the policies).

    python benchmarks/policy_throughput.py [--quick] [--size tiny|medium|smollm2] [--runs N]
        [--prompts P] [--k K] [--tokens T] [--prompt-tokens N] [--shared-prefix on|off|both]
        [--precision fp32|bf16] [--reward-model DIR] [--recipe] [--temperature X] [--lr X]
        [--beta X] [--missing-eos-penalty X] [--pairs N] [--gold N] [--policies DIR] [--compare DIR]
        [--trl-reward text|eos|both]

`--trl-reward eos` (side trl_eos) gives TRL's trainer the RM as a reward function that puts the
closing EOS back on ended completions (`EndedTextReward`): TRL scores `prompt + completion` decoded
with skip_special_tokens, which drops SmolLM2's `<|im_end|>`, where an RM trained with it (ours or
TRL's RewardTrainer) reads its score. `--compare DIR` evaluates a one-side run against a policy an
earlier --gold run saved.

    # the gold of both policies after the same steps, at the SmolLM2 recipe's settings
    python benchmarks/policy_throughput.py --size smollm2 --recipe --reward-model artifacts/chat/rm \
        --pairs 900 --steps 20 --runs 1 --threads 2 --gold 64
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import common

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
RECIPE = ROOT / "conf" / "experiment" / "smollm2_policy.yaml"
PHASES = ("generate", "policy_logprobs", "reference_logprobs", "reward", "update", "other")
# per --size: prompts P, samples per prompt k, max_new_tokens T, steps, warm-up steps
SIZE_DEFAULTS = {
    "tiny": (16, 4, 32, 8, 2),
    "medium": (16, 4, 64, 4, 1),
    "smollm2": (4, 4, 48, 3, 1),
}
QUICK = {"tiny": (4, 2, 8, 3, 1), "medium": (2, 2, 8, 2, 1), "smollm2": (2, 2, 4, 2, 1)}
LR = {"tiny": 2e-4, "medium": 2e-4, "smollm2": 1e-6}  # conf/algo/rloo.yaml; a checkpoint's rate


class PhaseTimer:
    """Seconds per phase of each optimisation step (a step closes at `close_step`)."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.lengths: list[float] = []
        self.grad_norms: list[float] = []  # each optimiser step's global norm before clipping

    def timed(self, name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name] += time.perf_counter() - start

        return wrapper

    def close_step(self, step_s: float) -> None:
        self.current["step"] = step_s
        self.steps.append(dict(self.current))
        self.current.clear()

    def summary(self, warmup: int, derive) -> dict[str, float]:
        """Mean seconds per steady step of each phase; `derive` fills the derived phases."""
        steady = [derive(dict(s)) for s in self.steps[warmup:]]
        keys = sorted({k for s in steady for k in s})
        return {k: sum(s.get(k, 0.0) for s in steady) / len(steady) for k in keys}


def _clock_callback(clock: common.StepClock, timer: PhaseTimer):
    import lightning as L

    common.quiet_lightning()

    class _Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.mark()
            previous = clock.ends[-2] if len(clock.ends) > 1 else clock.started
            timer.close_step(clock.ends[-1] - previous)

    return _Clock()


def instrument_ours(module, timer: PhaseTimer):
    """Wrap what `PolicyModule.training_step` calls with phase timers (no change to the maths).

    Returns a function that puts the module-level functions back.
    """
    import torch

    import rlhf_lightning.modules.policy as policy_module
    import rlhf_lightning.sharding as sharding

    sample = policy_module.sample

    def timed_sample(*args, **kwargs):
        out = timer.timed("generate", sample)(*args, **kwargs)
        timer.lengths.append(float(out[2].sum(-1).float().mean()))  # response tokens incl. EOS
        return out

    forward = policy_module.forward_logprobs

    def timed_forward(model, *args, **kwargs):
        if torch.is_grad_enabled():  # the update's own forward: inside `_update`
            return forward(model, *args, **kwargs)
        name = "reference_logprobs" if model is module.reference else "policy_logprobs"
        return timer.timed(name, forward)(model, *args, **kwargs)

    # (the entropy is left in whichever phase computes it: the rollout, or the fused update)
    # the reward through `rewards.base.score`, the one call that hands it `ended` and `group_size`
    # (a wrapper object around the reward once hid what it reads: cut responses scored as ended,
    # prompts not shared)
    names = ("sample", "forward_logprobs", "decode_responses", "score")
    originals = {name: getattr(policy_module, name) for name in names}
    policy_module.sample = timed_sample
    policy_module.forward_logprobs = timed_forward
    policy_module.decode_responses = timer.timed("reward", policy_module.decode_responses)
    policy_module.score = timer.timed("reward", policy_module.score)
    for name in ("_update", "_fused_update"):  # the fused one: log p_old from the update's pass
        if hasattr(module, name):
            setattr(module, name, timer.timed("update", getattr(module, name)))
    module.rollout = timer.timed("rollout", module.rollout)
    clip = sharding.clip_grad_norm  # `optimiser_step` imports it at each call

    def recorded_clip(lightning_module, optimizer, max_norm):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        timer.grad_norms.append(float(torch.nn.utils.get_total_norm(grads)))
        return clip(lightning_module, optimizer, max_norm)

    sharding.clip_grad_norm = recorded_clip

    def restore():
        sharding.clip_grad_norm = clip
        for name, value in originals.items():
            setattr(policy_module, name, value)

    return restore


def _ours_other(s: dict) -> dict:
    for name in PHASES:  # a phase that did not run this step (e.g. log p_old, fused) took 0 s
        s.setdefault(name, 0.0)
    s["other"] = s["step"] - s.get("rollout", 0.0) - s.get("update", 0.0)  # loop, logging, β
    s["rollout_other"] = s.pop("rollout", 0.0) - sum(
        s.get(k, 0.0) for k in ("generate", "policy_logprobs", "reference_logprobs", "reward")
    )
    return s


def run_ours(spec: dict) -> dict:
    """`PolicyModule` (rloo, fixed β) + `PromptDataModule` + `lightning.Trainer`."""
    from functools import partial

    import lightning as L
    import torch
    from transformers import AutoTokenizer

    from rlhf_lightning.control.beta import FixedBeta
    from rlhf_lightning.data.encoding import encode_prompts
    from rlhf_lightning.data.prompts import PromptDataModule
    from rlhf_lightning.generation.settings import GenerationSettings
    from rlhf_lightning.modules.algorithm import Algorithm
    from rlhf_lightning.modules.policy import PolicyModule
    from rlhf_lightning.rewards.learned import LearnedReward

    start = time.perf_counter()
    ws = common.Workspace(**spec["workspace"])
    tokenizer = AutoTokenizer.from_pretrained(ws.tokenizer_dir)
    shared = spec.get("shared_prefix", True)
    reward_dir = reward_model_dir(spec, ws)
    ctx = _Context(common.model_spec(ws), reward_dir, tokenizer)
    torch.manual_seed(spec["seed"])
    module = PolicyModule(
        policy=common.causal_lm(ws, tokenizer),
        reference=common.causal_lm(ws, tokenizer),
        reward=LearnedReward(
            path=str(reward_dir),
            max_length=spec.get("reward_max_length", 256),
            shared_prefix=shared,
        ).setup(ctx),
        tokenizer=tokenizer,
        algorithm=Algorithm(name="rloo", group_size=spec["k"], epochs=1, minibatches=1),
        beta_controller=FixedBeta(spec["beta"]),
        optimizer=partial(
            torch.optim.AdamW, lr=spec["lr"], weight_decay=0.0, betas=(0.9, 0.95), fused=True
        ),
        generation=GenerationSettings(
            max_new_tokens=spec["tokens"], temperature=spec.get("temperature", 1.0)
        ),
        max_grad_norm=1.0,
        missing_eos_penalty=spec.get("missing_eos_penalty"),
        shared_prefix=shared,
    )
    timer, clock = PhaseTimer(), common.StepClock()
    restore = instrument_ours(module, timer) if spec.get("phases", True) else lambda: None
    data = common.preference_data(ws, spec["task"])
    datamodule = PromptDataModule(data, tokenizer, spec["prompts"], spec["seed"])
    prompts = [r.prompt for r in data.load("prompts", "train").records[:256]]
    prompt_tokens = sum(map(len, encode_prompts(tokenizer, prompts))) / len(prompts)  # as sampled
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
        callbacks=[_clock_callback(clock, timer)],
    )
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        restore()
    result = {**_result(spec, clock, timer, start, _ours_other), "prompt_length": prompt_tokens}
    if spec.get("policies"):
        side = "ours" if shared else "ours_plain"
        result["policy_dir"] = save_policy(module.policy, spec, ws, side)
    return result


def run_ours_plain(spec: dict) -> dict:
    """Our side without the shared prompt pass (--shared-prefix off/both)."""
    return run_ours({**spec, "shared_prefix": False})


def reward_model_dir(spec: dict, ws: common.Workspace) -> Path:
    """The RM both sides optimise: --reward-model, else the workspace's fresh-head one."""
    return Path(spec.get("reward_model") or ws.reward_dir)


def save_policy(model, spec: dict, ws: common.Workspace, side: str) -> str:
    """A side's final policy as a policy artifact eval.py reads (our tokenizer on both sides: the
    same vocabulary; the manifest's reference_path is the initial policy both started from)."""
    from transformers import AutoTokenizer

    from rlhf_lightning.artifacts import save_model_artifact

    target = Path(spec["policies"]) / side
    keys = ("steps", "prompts", "k", "tokens", "temperature", "lr", "beta", "precision", "seed")
    keys += ("missing_eos_penalty",)
    manifest = {
        "stage": "policy",
        "reference": "checkpoint" if ws.model_path else "initial",
        "reference_path": ws.policy_dir,
        "reward_model": str(reward_model_dir(spec, ws)),
        "benchmark": {"side": side, **{k: spec.get(k) for k in keys}},
    }
    tokenizer = AutoTokenizer.from_pretrained(ws.tokenizer_dir)
    save_model_artifact(model, tokenizer, target, manifest)
    return str(target)


class _Context:
    """A `rewards.base.RewardContext` for `LearnedReward.setup`: the RM folder as its artifact."""

    def __init__(self, model_spec, reward_dir: Path, tokenizer):
        self.model_spec, self.reward_dir, self.tokenizer = model_spec, reward_dir, tokenizer
        self.data = None  # no task: only the learned reward is set up here

    def artifact(self, stage: str) -> Path:
        return self.reward_dir


def _result(spec: dict, clock, timer: PhaseTimer, start: float, derive) -> dict:
    steps, seconds = clock.steady(spec["warmup"])
    completions = spec["prompts"] * spec["k"]
    return {
        "throughput": steps * completions / seconds,  # completions/s
        "step_s": seconds / steps,
        "median_step_s": clock.median_step(spec["warmup"]),
        "steps": len(clock.ends),
        "setup_s": clock.started - start,
        "total_s": time.perf_counter() - start,
        "response_length": (sum(timer.lengths) / len(timer.lengths)) if timer.lengths else None,
        "phases": timer.summary(spec["warmup"], derive) if timer.steps else {},
        # the update's gradient before clipping at max_grad_norm 1 (ours: the token mean of
        # A·log p over the batch; TRL's RLOO: the sequence mean of A·Σ log p, ~tokens/seq × ours)
        "grad_norms": timer.grad_norms,
        "grad_norm": statistics.median(timer.grad_norms) if timer.grad_norms else None,
    }


def instrument_trl(trainer, timer: PhaseTimer) -> None:
    """Wrap `RLOOTrainer`'s rollout methods with the same phase timers."""
    import torch

    generate = trainer._generate

    def timed_generate(prompts):
        out = timer.timed("generate", generate)(prompts)
        timer.lengths.append(sum(len(c) for c in out[1]) / len(out[1]))
        return out

    logprobs = trainer._get_per_token_logps_and_entropies

    def timed_logprobs(model, *args, **kwargs):
        if torch.is_grad_enabled():
            return logprobs(model, *args, **kwargs)
        name = "reference_logprobs" if model is trainer.ref_model else "policy_logprobs"
        return timer.timed(name, logprobs)(model, *args, **kwargs)

    trainer._generate = timed_generate
    trainer._get_per_token_logps_and_entropies = timed_logprobs
    trainer._calculate_rewards = timer.timed("reward", trainer._calculate_rewards)
    trainer._generate_and_score_completions = timer.timed(
        "rollout", trainer._generate_and_score_completions
    )


def _trl_other(s: dict) -> dict:
    s["update"] = s["step"] - s.get("rollout", 0.0)  # loss, backward, step and the loop
    s["rollout_other"] = s.pop("rollout", 0.0) - sum(
        s.get(k, 0.0) for k in ("generate", "policy_logprobs", "reference_logprobs", "reward")
    )
    return s


def run_trl(spec: dict) -> dict:
    """`trl.RLOOTrainer` + `RLOOConfig` with the same model, reward model, prompts and sizes."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import RLOOConfig, RLOOTrainer

    start = time.perf_counter()
    ws = common.Workspace(**spec["workspace"])
    prompts_file = Path(ws.data_dir) / ws.task / "prompts_train.jsonl"
    dataset = Dataset.from_list(common.read_jsonl(prompts_file))
    timer, clock = PhaseTimer(), common.StepClock()

    class _Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.mark()
            previous = clock.ends[-2] if len(clock.ends) > 1 else clock.started
            timer.close_step(clock.ends[-1] - previous)

    reward_dir = reward_model_dir(spec, ws)
    std, penalty = _reward_std(reward_dir), spec.get("missing_eos_penalty")
    with tempfile.TemporaryDirectory(prefix="trl-rloo-") as out:
        config = RLOOConfig(
            output_dir=out,
            per_device_train_batch_size=spec["prompts"] * spec["k"],
            num_generations=spec["k"],
            max_completion_length=spec["tokens"],
            num_iterations=1,
            beta=spec["beta"],
            epsilon=0.2,
            temperature=spec.get("temperature", 1.0),
            # our LearnedReward's scale: (raw - mean) / std; the penalty is on that scale already
            reward_weights=[1.0 / std] + [1.0] * bool(penalty),
            top_p=1.0,
            top_k=0,
            learning_rate=spec["lr"],
            weight_decay=0.0,
            adam_beta2=0.95,
            optim="adamw_torch_fused",  # TRL's default; ours: AdamW(fused=True)
            lr_scheduler_type="constant",
            max_grad_norm=1.0,
            max_steps=spec["steps"],
            gradient_checkpointing=False,
            bf16=common.precision(spec)[1],
            fp16=False,
            use_cpu=True,
            seed=spec["seed"],
            report_to="none",
            logging_strategy="steps",  # each step's grad_norm (before clipping) in log_history
            logging_steps=1,
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
        )
        reward_model = AutoModelForSequenceClassification.from_pretrained(reward_dir)
        if spec.get("trl_reward_eos"):  # side trl_eos: a callable reward, the RM as TRL loads it
            reward_model = EndedTextReward(reward_model, ws.trl_tokenizer_dir, config.bf16)
        reward_tokenizer = AutoTokenizer.from_pretrained(ws.trl_tokenizer_dir)
        penalties = [MissingEosPenalty(penalty, reward_tokenizer.eos_token_id)] if penalty else []
        trainer = RLOOTrainer(
            model=ws.policy_dir,
            reward_funcs=[reward_model, *penalties],
            args=config,
            train_dataset=dataset,
            processing_class=AutoTokenizer.from_pretrained(
                ws.trl_tokenizer_dir, padding_side="left"
            ),
            # the RM's tokenizer (a model reward), then None for each function
            reward_processing_classes=[reward_tokenizer] + [None] * len(penalties),
            callbacks=[_Clock()],
        )
        trainer.remove_callback(PrinterCallback)
        if spec.get("phases", True):
            instrument_trl(trainer, timer)
        trainer.train()
        timer.grad_norms = [
            float(e["grad_norm"]) for e in trainer.state.log_history if "grad_norm" in e
        ]
    result = _result(spec, clock, timer, start, _trl_other)
    if spec.get("policies"):
        policy = trainer.accelerator.unwrap_model(trainer.model)
        side = "trl_eos" if spec.get("trl_reward_eos") else "trl"
        result["policy_dir"] = save_policy(policy, spec, ws, side)
    return result


def run_trl_eos(spec: dict) -> dict:
    """TRL with the RM reading ended completions with their closing EOS (--trl-reward eos)."""
    return run_trl({**spec, "trl_reward_eos": True})


class EndedTextReward:
    """The RM as a TRL reward function that scores prompt + completion + EOS for a completion that
    ended (its last id is EOS), as the RM was trained (ours and TRL's RewardTrainer append EOS).

    TRL's own path scores `prompt + completion` with the completion decoded by
    `batch_decode(skip_special_tokens=True)`, which drops the closing `<|im_end|>`: an RM that
    reads its score at the closing EOS then reads a position it never trained at (trl#2897).
    Otherwise as TRL's `_calculate_rewards`: right padding, no added special tokens, logits[:, 0].
    """

    __name__ = "reward_model_eos"

    def __init__(self, model, tokenizer_dir: str, bf16: bool):
        from transformers import AutoTokenizer

        self.model, self.bf16 = model.eval(), bf16
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        import torch

        eos, eos_id = self.tokenizer.eos_token, self.tokenizer.eos_token_id
        texts = [
            p + c + (eos if ids and ids[-1] == eos_id else "")
            for p, c, ids in zip(prompts, completions, completion_ids, strict=True)
        ]
        batch = self.tokenizer(
            text=texts,
            return_tensors="pt",
            padding=True,
            padding_side="right",
            add_special_tokens=False,
        )
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=self.bf16):
            return self.model(**batch).logits[:, 0].float().tolist()


class MissingEosPenalty:
    """`policy.missing_eos_penalty` as a TRL reward function (weight 1, added to the RM's 1/std-
    weighted score): −penalty for a completion cut at max_completion_length (its last id is not
    EOS), 0 for one that ended — what `PolicyModule` subtracts from the normalised reward.
    TRL's RLOOConfig has no such option (only `mask_truncated_completions`)."""

    __name__ = "missing_eos_penalty"

    def __init__(self, penalty: float, eos_id: int):
        self.penalty, self.eos_id = float(penalty), eos_id

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        return [0.0 if ids and ids[-1] == self.eos_id else -self.penalty for ids in completion_ids]


def _reward_std(reward_dir: Path) -> float:
    """The RM artifact's reward_stats std (1 without one), as `LearnedReward` reads it."""
    from rlhf_lightning.artifacts import read_manifest

    stats = read_manifest(reward_dir).get("reward_stats") or {}
    return max(float(stats.get("std", 1.0)), 1e-6)


WORKERS = {
    "ours": run_ours,
    "ours_plain": run_ours_plain,
    "trl": run_trl,
    "trl_eos": run_trl_eos,
    "prepare": common.prepare_worker,
}


def policy_spec(args, ws: common.Workspace, settings: dict, **overrides) -> dict:
    spec = {
        "workspace": vars(ws),
        "task": settings,
        "seed": args.seed,
        "prompts": args.prompts,
        "k": args.k,
        "tokens": args.tokens,
        "steps": args.steps,
        "warmup": args.warmup,
        "beta": args.beta,
        "lr": args.lr or LR[args.size],
        "temperature": args.temperature,
        "precision": args.precision,
        "missing_eos_penalty": getattr(args, "missing_eos_penalty", None),
        # add_gold_options' (scaling.py takes only add_policy_options)
        "reward_model": str(reward.resolve())
        if (reward := getattr(args, "reward_model", None))
        else None,
        "policies": str(policies_dir(args, ws)) if getattr(args, "gold", None) else None,
        # our reward's truncation length: the model's position limit (256 unless --prompt-tokens)
        "reward_max_length": max(256, ws.model_config["max_position_embeddings"]),
    }
    return {**spec, **overrides}


def add_policy_options(p) -> None:
    """Options whose defaults depend on --size (SIZE_DEFAULTS; `size_defaults` fills them)."""
    p.add_argument("--prompts", type=int, help="prompts per step P (16)")
    p.add_argument("--k", type=int, help="samples per prompt (4)")
    p.add_argument("--tokens", type=int, help="max_new_tokens T (tiny 32, medium 64)")
    p.add_argument("--steps", type=int, help="optimisation steps per run (tiny 8, medium 4)")
    p.add_argument("--warmup", type=int, help="steps left out of the timing (tiny 2, medium 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (1.0)")
    p.add_argument("--lr", type=float, help="learning rate (tiny/medium 2e-4, smollm2 1e-6)")
    p.add_argument("--beta", type=float, default=0.05, help="KL coefficient β (0.05)")
    p.add_argument(
        "--missing-eos-penalty",
        type=float,
        help="subtracted from the normalised reward of completions cut at T, on both sides "
        "(policy.missing_eos_penalty; none unless --recipe, which takes the recipe's 1.0)",
    )
    p.add_argument(
        "--pairs",
        type=int,
        default=64,
        help="task pairs whose distinct prompts the policy trains on (64; smollm2: ≤ ~1000)",
    )


def add_gold_options(p) -> None:
    p.add_argument(
        "--reward-model",
        type=Path,
        help="a trained RM artifact both sides optimise (default: the workspace's fresh head)",
    )
    p.add_argument(
        "--recipe",
        action="store_true",
        help=f"P, k, T, temperature, lr, β, missing-EOS penalty and precision of "
        f"{RECIPE.relative_to(ROOT)}",
    )
    p.add_argument(
        "--gold",
        type=int,
        metavar="N",
        help="save both final policies and evaluate them with eval.py on N held-out prompts",
    )
    p.add_argument("--policies", type=Path, help="--gold: where the policies go")
    p.add_argument(
        "--compare",
        type=Path,
        help="--gold with one side: a saved policy it is compared with (e.g. an earlier run's)",
    )
    p.add_argument(
        "--trl-reward",
        choices=("text", "eos", "both"),
        default="text",
        help="TRL's RM input: its own prompt + decoded completion (text, side trl), the closing "
        "EOS put back on ended completions (eos, side trl_eos), or both sides",
    )


def recipe_settings(path: Path = RECIPE) -> dict:
    """The policy recipe's settings this benchmark matches on both sides (`--recipe`)."""
    from omegaconf import OmegaConf

    import rlhf_lightning  # noqa: F401  (registers the recipe precision's `bf16_if_native`)

    trainer = OmegaConf.load(ROOT / "conf" / "trainer" / "default.yaml")  # accelerator: cpu
    cfg = OmegaConf.merge({"trainer": trainer}, OmegaConf.load(path))
    stage = OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "policy" / "default.yaml"), cfg.policy)
    return {
        "prompts": int(cfg.policy.prompts_per_step),
        "k": int(cfg.algo.group_size),
        "tokens": int(cfg.policy.generation.max_new_tokens),
        "temperature": float(cfg.policy.generation.temperature),
        "lr": float(cfg.policy.optimizer.lr),
        "beta": float(cfg.algo.beta),
        # bf16 where this CPU computes it natively, fp32 where it would emulate it
        "precision": {"bf16-mixed": "bf16", "32-true": "fp32"}[str(cfg.trainer.precision)],
        "missing_eos_penalty": stage.missing_eos_penalty,  # the policy stage's default (1.0)
    }


def apply_recipe(args, argv: list[str]) -> None:
    """--recipe: the recipe's settings, except those given on the command line."""
    if not args.recipe:
        return
    if args.size != "smollm2":
        raise SystemExit(f"--recipe is {RECIPE.name}'s settings: it needs --size smollm2")
    given = {a.split("=", 1)[0].removeprefix("--").replace("-", "_") for a in argv}
    for name, value in recipe_settings().items():
        if name not in given:
            setattr(args, name, value)


def policies_dir(args, ws: common.Workspace) -> Path:
    return (args.policies or Path(ws.root) / "policies").resolve()


def size_defaults(args, table: dict = SIZE_DEFAULTS) -> None:
    """Fill the policy options left unset from `table[args.size]`."""
    names = ("prompts", "k", "tokens", "steps", "warmup")
    for name, value in zip(names, table[args.size]):
        if getattr(args, name) is None:
            setattr(args, name, value)


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    add_policy_options(p)
    add_gold_options(p)
    args = p.parse_args()
    if args.worker:
        return common.worker_main(args, WORKERS)
    if args.quick:
        args.in_process, args.runs = True, 1
        args.prompts, args.k, args.tokens, args.steps, args.warmup = QUICK[args.size]
    apply_recipe(args, sys.argv[1:])
    size_defaults(args)
    if args.reward_model and not (args.reward_model / "config.json").exists():
        raise SystemExit(f"--reward-model {args.reward_model}: no model there (config.json)")
    sides = trl_sides(common.our_sides(args), args.trl_reward)
    settings = common.task_settings(args.pairs, 16, args.seed, args.prompt_tokens)
    if args.size in common.CHECKPOINTS:  # its workspace saves a 135M-parameter RM only when asked
        settings["reward_model"] = True
    ws = common.workspace_for(args, settings)
    spec = policy_spec(args, ws, settings)
    print(
        f"policy throughput ({args.size}, {args.precision}): {args.prompts} prompts x k={args.k} = {args.prompts * args.k} "
        f"completions/step, T={args.tokens}, {args.steps} steps ({args.warmup} warm-up), "
        f"context {args.prompt_tokens} tokens, shared prefix {args.shared_prefix}, "
        f"{args.runs} run(s) per side, {args.threads} thread(s)"
    )
    results = common.measure(SCRIPT, args, sides, spec, WORKERS, args.runs)
    gold = gold_eval(args, ws, spec, results) if args.gold else None
    report(args, spec, results, gold)


def eval_command(args, ws: common.Workspace, spec: dict, policy: str, compare: str | None):
    """eval.py on the saved policies: the workspace's task and held-out prompts, the initial
    policy as reference, the RM as proxy, the training T and temperature, keyed samples."""
    cmd = [sys.executable, str(ROOT / "eval.py")]
    if ws.task == "chat":  # the chat task's held-out requests (its cache under the repo's data/),
        # from the samples the workspace's pairs came from, whatever task.seed drew them; --seed
        # is the training runs' seed (sampling keys only)
        cmd += ["task=chat", "model=smollm2", f"task.seed={common.chat_samples_seed()}"]
    else:  # the workspace's own reviews task files
        cmd += ["task=reviews", "model=tiny", f"paths.data_dir={ws.data_dir}"]
        cmd += [f"++task.{k}={v}" for k, v in spec["task"].items() if k != "reward_model"]
    cmd += [f"policy={policy}", f"reference={ws.policy_dir}"]
    cmd += [f"compare={compare}"] if compare else []
    cmd += [
        f"reward_model={reward_model_dir(spec, ws)}",
        f"n_prompts={args.gold}",
        f"generation.max_new_tokens={spec['tokens']}",
        f"generation.temperature={spec['temperature']}",
        f"seed={args.seed}",
        "best_of_n.enabled=false",
        "logger=none",
        f"hydra.run.dir={policies_dir(args, ws) / 'eval'}",
    ]
    return cmd


def trl_sides(sides: list[str], trl_reward: str) -> list[str]:
    """--trl-reward: TRL's side as trl (text), trl_eos (eos) or both."""
    if "trl" not in sides:
        return sides
    extra = {"text": ["trl"], "eos": ["trl_eos"], "both": ["trl", "trl_eos"]}[trl_reward]
    return [s for s in sides if s != "trl"] + extra


def gold_eval(args, ws: common.Workspace, spec: dict, results: dict[str, list[dict]]) -> dict:
    """The first two sides' final policies through eval.py (the first as policy, the second — or
    --compare — as compare: ours against TRL's by default); its numbers, named by side."""
    saved = {side: runs[-1]["policy_dir"] for side, runs in results.items()}
    first, *others = saved
    if not others and args.compare:
        saved["compare"] = str(args.compare.resolve())
    second = next(iter(s for s in saved if s != first), None)
    cmd = eval_command(args, ws, spec, saved[first], saved.get(second))
    print(f"\ngold: {' '.join(cmd[1:])}", flush=True)
    env = {**os.environ, **common.QUIET_ENV, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"eval.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads((policies_dir(args, ws) / "eval" / "eval.json").read_text())
    names = {"policy": first, "compare": second, "reference": "reference"}
    rename = lambda key: "/".join(names.get(part, part) for part in key.split("_vs_"))  # noqa: E731
    return {
        "command": cmd[1:],
        "eval_s": time.perf_counter() - start,
        "eval_dir": str(policies_dir(args, ws) / "eval"),
        "policies": saved,
        "judges": result["judges"],
        "n_prompts": result["n_prompts"],
        "samples_per_prompt": result["samples_per_prompt"],
        "sides": {names[side]: value for side, value in result["sides"].items()},
        "win_rates": {
            rename(key.split("/")[0]) + "/" + key.split("/")[1]: value
            for key, value in result["win_rates"].items()
        },
        "paired": result.get("paired", {}),  # first − second side, same prompts and keys
    }


def median_phases(runs: list[dict]) -> dict[str, float]:
    keys = sorted({k for r in runs for k in r["phases"]})
    return {k: common.median([r["phases"] for r in runs], k) for k in keys}


def report(args, spec: dict, results: dict[str, list[dict]], gold: dict | None = None) -> None:
    med = {
        side: {k: common.median(runs, k) for k in runs[0] if k not in ("phases", "policy_dir")}
        for side, runs in results.items()
    }
    phases = {side: median_phases(runs) for side, runs in results.items()}
    columns = {
        "completions/s": "throughput",
        "s/step": "step_s",
        "median s/step": "median_step_s",
        "resp len": "response_length",
        "prompt len": "prompt_length",
        "setup s": "setup_s",
        "peak RSS MiB": "peak_rss_mb",
        "|g| before clip": "grad_norm",
    }
    rows = [
        [side, len(results[side]), *(m.get(k) for k in columns.values())] for side, m in med.items()
    ]
    common.print_table("policy stage (medians)", ["side", "runs", *columns], rows)
    names = ["step", *PHASES[:-2], "rollout_other", "update", "other"]
    common.print_table(
        "time per step by phase, s (medians; TRL 'update' includes its training loop)",
        ["side", *names],
        [[side, *(phases[side].get(n) for n in names)] for side in phases],
    )
    every = common.all_ratios(results, "completions/s")  # printed; ours/trl as before
    ratio = every.get("ours/trl")
    payload = {
        "spec": spec,
        "median": med,
        "phases": phases,
        "ratio_completions_per_s": ratio,
        "ratios": every,
    }
    if gold:
        print_gold(gold)
        payload["gold"] = gold
    common.write_json(
        args,
        "policy_throughput",
        {"environment": common.environment(args), **payload, "runs": results},
        tag="gold" if gold else "",
    )


def print_gold(gold: dict) -> None:
    """Each side's gold, proxy and KL, then the win rates (95 % intervals over prompts)."""

    def cell(stat: dict | None) -> str:
        return "-" if stat is None else f"{stat['mean']:.3f} [{stat['lo']:.3f}, {stat['hi']:.3f}]"

    judges = [f"reward/{j}" for j in gold["judges"]]
    common.print_table(
        f"after the same steps: eval.py on {gold['n_prompts']} held-out prompts × "
        f"{gold['samples_per_prompt']} samples ({gold['eval_s']:.0f} s)",
        ["side", *judges, "kl"],
        [[side, *(cell(v.get(k)) for k in [*judges, "kl"])] for side, v in gold["sides"].items()],
    )
    common.print_table(
        "win rates", ["pair/judge", "rate"], [[k, cell(v)] for k, v in gold["win_rates"].items()]
    )


if __name__ == "__main__":
    sys.exit(main())
