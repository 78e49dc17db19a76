"""`stage=dpo` on the TINY config: the loss starts at log 2, equals TRL's DPO loss (and implicit
rewards and gradients) on a fixed batch, the cached reference changes nothing, the stage runs
after SFT from the command line and saves an ordinary causal LM, and impossible values fail."""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import TINY, TINY_MODEL, compose, train_cli, with_paths
from hydra.utils import instantiate
from omegaconf import open_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhf_lightning.artifacts import MANIFEST
from rlhf_lightning.config import validate
from rlhf_lightning.context import RunContext
from rlhf_lightning.data.preference import PreferenceCollator, PreferenceDataModule
from rlhf_lightning.errors import ArtifactError, ConfigError
from rlhf_lightning.models import shared_prefix as S
from rlhf_lightning.run import run
from rlhf_lightning.stages.dpo import build_dpo_module

TINY_DPO = [*TINY, "dpo.max_epochs=1", "dpo.eval_samples=16"]


@pytest.fixture(scope="module")
def sft_ctx(tmp_path_factory):
    """A TINY SFT artifact and a `RunContext` of `stage=dpo` that reads it."""
    root = tmp_path_factory.mktemp("dpo_sft")
    run(compose(["stage=sft", *TINY_DPO], root))
    return RunContext(compose(["stage=dpo", *TINY_DPO], root))


@pytest.fixture(scope="module")
def pair_batch(sft_ctx):
    """Eight validation pairs as one [16, T] batch, and their encoded items."""
    data = PreferenceDataModule(sft_ctx.data, sft_ctx.tokenizer, max_length=128)
    data.setup()
    items = data.datasets["val"][:8]
    return PreferenceCollator(sft_ctx.tokenizer.pad_token_id)(items), items


def dpo_module(ctx, **overrides):
    cfg = copy.deepcopy(ctx.cfg)
    with open_dict(cfg):
        for key, value in overrides.items():
            cfg.dpo.module[key] = value
    ctx = copy.copy(ctx)
    ctx.cfg = cfg
    return build_dpo_module(ctx)


def perturb(model, seed: int = 0, scale: float = 0.05) -> None:
    """Move the policy away from the reference, so ρ ≠ 0 and the loss is not trivially log 2."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_loss_is_log2_when_the_policy_is_the_reference(sft_ctx, pair_batch):
    for loss_type in ("sigmoid", "robust"):
        module = dpo_module(sft_ctx, loss_type=loss_type, label_smoothing=0.1)
        out = module(pair_batch[0])
        assert float(out["loss"].detach()) == pytest.approx(math.log(2), abs=1e-6)
        assert out["logratio_chosen"].abs().max() < 1e-5
        assert float(out["implicit_accuracy"]) == 0.5


def test_cached_reference_changes_nothing(sft_ctx, pair_batch):
    batch, items = pair_batch
    cached, fresh = (dpo_module(sft_ctx, precompute_ref_logprobs=flag) for flag in (True, False))
    cached.precompute_reference(items)
    table = cached.reference_table  # [P, 2] by pair index: the 8 pairs scored, the rest NaN
    assert table.shape == (max(it["index"] for it in items) + 1, 2)
    assert int(torch.isfinite(table).sum()) == 2 * len(items)
    for module in (cached, fresh):
        perturb(module.policy)
    losses = []
    for module in (cached, fresh):
        loss = module(batch)["loss"]
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], atol=1e-6) and losses[0] != math.log(2)
    cached.micro_batch_size = 3  # trimmed micro-batches find their pairs by index: no pass

    def no_reference_pass(*args):
        raise AssertionError("a reference pass for a precomputed pair")

    cached._chunked_reference = no_reference_pass
    for part in cached.parts(batch):
        cached.micro_loss(part)
    for a, b in zip(cached.policy.parameters(), fresh.policy.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_each_rank_scores_its_own_share_of_the_reference(sft_ctx, pair_batch, monkeypatch):
    """Under W ranks each scores every W-th pair; the shares summed (the all-reduce) are the
    one-process table."""
    import rlhf_lightning.modules.dpo as dpo

    _, items = pair_batch
    whole = dpo_module(sft_ctx)
    whole.precompute_reference(items)
    shares = []
    monkeypatch.setattr(dpo, "all_reduce_sum", lambda x: x)  # this rank's share alone
    monkeypatch.setattr(dpo, "world_size", lambda: 2)
    for rank in range(2):
        monkeypatch.setattr(dpo, "rank", lambda rank=rank: rank)
        module = dpo_module(sft_ctx)
        module.precompute_reference(items)
        scored = torch.isfinite(module.reference_table[:, 0]).nonzero().flatten().tolist()
        assert scored == [it["index"] for it in items[rank::2]]
        shares.append(module.reference_table.nan_to_num(0.0))
    summed = shares[0] + shares[1]
    known = torch.isfinite(whole.reference_table)
    assert torch.allclose(summed[known], whole.reference_table[known], atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_precomputed_reference_has_the_policys_precision(sft_ctx, pair_batch, precision):
    """At step 0 (policy = reference) every log-ratio is 0 under `bf16-mixed` too: the cache is
    filled in the context Lightning runs the step's forward in (bf16 autocast), as the policy's
    pass. Measured exactly 0 on this CPU (≤ 7.6e-6 in micro-batches of 3 pairs, whose shared
    prompts are padded to another width); an fp32 cache read by a bf16 policy was up to 5e-3 off."""
    batch, items = pair_batch
    module = dpo_module(sft_ctx)
    module.trainer = L.Trainer(
        accelerator="cpu", precision=precision, logger=False, enable_checkpointing=False
    )
    module.precompute_reference(items)
    with module.trainer.precision_plugin.forward_context():  # what the training step runs in
        out = module(batch)
        assert torch.is_autocast_enabled("cpu") == (precision == "bf16-mixed")
        for key in ("logratio_chosen", "logratio_rejected"):
            assert float(out[key].abs().max()) == 0.0, key
        module.micro_batch_size = 3  # parts lay their pairs' prompts out at their own width:
        for part in module.parts(batch):  # a few float32 ulps of sums ~ -100 (measured 7.6e-6)
            out = module(part)
            for key in ("logratio_chosen", "logratio_rejected"):
                assert float(out[key].abs().max()) < 3e-5, key


def test_a_pairs_prompt_runs_once_with_the_same_loss_gradients_and_reference(
    sft_ctx, pair_batch, monkeypatch
):
    """`shared_prefix`: each pair's prompt runs once for chosen and rejected (policy and reference
    passes, the precomputed table too): the same log-probs, loss and gradients as the plain pass
    (tolerance 1e-6 relative to the log-prob sums, ~ -100: float32 sums in another order; the
    log-ratios of order 1 differ by 2 ulps of the sums, 1.5e-5)."""
    batch, items = pair_batch
    shared, plain = (
        dpo_module(sft_ctx, shared_prefix=flag, precompute_ref_logprobs=False) for flag in (1, 0)
    )
    for module in (shared, plain):
        perturb(module.policy)
    seen, rows = [], len(batch["input_ids"])
    original = S.shared_prefix_states
    monkeypatch.setattr(S, "shared_prefix_states", lambda *a: seen.append(a[1:4]) or original(*a))

    def calls() -> list[tuple[int, int]]:  # (rows, k) of the passes, not of the one-time probes
        return [(len(ids), k) for ids, _, k in seen if len(ids) != 4]

    outs = [module(batch) for module in (shared, plain)]
    assert calls() == [(rows, 2), (rows, 2)]  # the policy's pass and the reference's, in pairs
    with torch.no_grad():  # the sums each log-ratio is a difference of (~ -100): their ulps
        sums = float(plain._pair_logprobs(plain.reference, batch).abs().max())
    for key in ("loss", "logratio_chosen", "logratio_rejected", "reward_chosen"):
        a, b = outs[0][key].detach(), outs[1][key].detach()
        scale = {"loss": float(b.abs().max()), "reward_chosen": plain.beta.value * sums}.get(
            key, sums
        )  # a log-ratio's round-off is its sums'; a reward is β times one
        assert torch.allclose(a, b, rtol=0, atol=1e-6 * scale + 1e-7), key
    assert float(outs[0]["loss"].detach()) != pytest.approx(math.log(2), abs=1e-4)  # moved
    for out in outs:
        out["loss"].backward()
    for a, b in zip(shared.policy.parameters(), plain.policy.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6 * float(b.grad.abs().max()) + 1e-9)
    for module in (shared, plain):
        module.precompute_reference(items)
    assert calls() == [(rows, 2)] * 3  # the table: one shared pass for the 8 pairs
    known = torch.isfinite(plain.reference_table)
    assert torch.equal(known, torch.isfinite(shared.reference_table))
    a, b = shared.reference_table[known], plain.reference_table[known]
    assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max())  # sums ~ -100: a few ulp


def test_a_pair_whose_prompts_differ_takes_the_plain_pass(sft_ctx, pair_batch, monkeypatch):
    """Rows of a pair cut to different prompts cannot share one: the plain pass, same numbers."""
    batch, _ = pair_batch
    batch = {k: v.clone() for k, v in batch.items()}
    half = len(batch["input_ids"]) // 2
    batch["input_ids"][half, 0] = (batch["input_ids"][half, 0] + 1) % 50  # a rejected prompt
    module = dpo_module(sft_ctx, precompute_ref_logprobs=False)
    calls = []
    monkeypatch.setattr(S, "shared_prefix_states", lambda *a: calls.append(1))
    mask = module._response_mask(batch)
    ours = module._pair_logprobs(module.policy, batch)
    assert calls == []
    assert torch.equal(ours, module._sequence_logprobs(module.policy, batch, mask))


@pytest.mark.slow
def test_dpo_runs_with_the_shared_prompt_on_equal_runs_with_it_off(sft_ctx, tmp_path):
    """`dpo.shared_prefix=true|false` from the same SFT artifact, under plain SGD steps (Adam
    would turn float32 round-off of near-zero gradients into ±lr steps, see test_shared_prefix):
    the same DPO policy to 1e-5."""
    sgd = ["~dpo.module.optimizer.weight_decay", "dpo.module.optimizer._target_=torch.optim.SGD"]
    args = [*TINY_DPO, "callbacks=none", *sgd, "dpo.module.optimizer.lr=1.0"]
    for flag in ("true", "false"):  # the module's SFT (TINY_DPO: the same SFT settings)
        shutil.copytree(
            Path(sft_ctx.cfg.paths.root_dir, "artifacts"), tmp_path / flag / "artifacts"
        )
    weights = {}
    for flag in ("true", "false"):
        proc = train_cli(["stage=dpo", *args, f"dpo.shared_prefix={flag}"], tmp_path / flag)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "[shared-prefix]" not in proc.stdout
        weights[flag] = load_file(tmp_path / flag / "artifacts/reviews/dpo/model.safetensors")
    sft = load_file(tmp_path / "true" / "artifacts/reviews/sft/model.safetensors")
    assert max(float((weights["true"][k] - weights["false"][k]).abs().max()) for k in sft) <= 1e-5
    assert max(float((weights["true"][k] - sft[k]).abs().max()) for k in sft) > 1e-3  # it moved


# TRL 1.16's sigmoid loss has no label smoothing (cDPO): that case is checked by hand only
def test_micro_batches_give_the_full_batch_gradient(sft_ctx, pair_batch):
    """The parts `MicroBatchedModule` cuts (pairs travel together, each part trimmed), weighted
    by their pair counts as `microbatch.accumulate` weights them, give the full-batch gradient."""
    batch, _ = pair_batch
    full, micro = (dpo_module(sft_ctx, micro_batch_size=size) for size in (None, 3))
    for module in (full, micro):
        perturb(module.policy)
    full(batch)["loss"].backward()
    parts = micro.parts(batch)
    assert [micro.loss_count(p) for p in parts] == [3, 3, 2]
    for part in parts:
        (micro.micro_loss(part)["loss"] * micro.loss_count(part) / 8).backward()
    for a, b in zip(full.policy.parameters(), micro.policy.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6 * float(a.grad.abs().max()) + 1e-9)


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"), [("sigmoid", 0.0), ("robust", 0.1), ("ipo", 0.0)]
)
def test_equals_trl_dpo_on_a_fixed_batch(sft_ctx, pair_batch, tmp_path, loss_type, label_smoothing):
    """Loss, implicit rewards, accuracy, margin and every gradient equal TRL's `DPOTrainer` on the
    same token ids (TRL's own collator), same policy and reference weights."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    batch, items = pair_batch
    beta = 0.3
    ours = dpo_module(
        sft_ctx,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        precompute_ref_logprobs=False,
    )
    perturb(ours.policy)
    policy, reference = copy.deepcopy(ours.policy), copy.deepcopy(ours.reference)
    tokenizer = sft_ctx.tokenizer
    text = [{"prompt": "a", "chosen": " b", "rejected": " c"}] * 2  # TRL's init needs a dataset
    args = DPOConfig(
        output_dir=str(tmp_path),
        beta=beta,
        loss_type=[loss_type],
        label_smoothing=label_smoothing,
        bf16=False,
        use_cpu=True,
        report_to=[],
        max_length=None,
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(text),
        processing_class=tokenizer,
    )
    examples = []
    for item in items:
        (pc, pr) = item["prompt_lengths"]
        assert pc == pr  # no truncation in these pairs: one prompt for both sides
        examples.append(
            {
                "prompt_ids": item["chosen"][:pc],
                "chosen_ids": item["chosen"][pc:],
                "rejected_ids": item["rejected"][pr:],
            }
        )
    trl_batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(examples)
    assert torch.equal(trl_batch["input_ids"], batch["input_ids"])
    assert torch.equal(trl_batch["completion_mask"], batch["response_mask"])
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, trl_batch)
    trl_loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    ours.policy.train()
    out = ours(batch)
    out["loss"].backward()
    assert float(out["loss"].detach()) == pytest.approx(float(trl_loss), rel=1e-5, abs=1e-6)
    assert float(out["loss"].detach()) != pytest.approx(math.log(2), abs=1e-4)  # not vacuous
    assert float(out["reward_chosen"].mean()) == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert float(out["reward_rejected"].mean()) == pytest.approx(
        metrics["rewards/rejected"], abs=1e-5
    )
    assert float(out["implicit_margin"]) == pytest.approx(metrics["rewards/margins"], abs=1e-5)
    assert float(out["implicit_accuracy"]) == pytest.approx(metrics["rewards/accuracies"])
    trl_grads = dict(trainer.model.named_parameters())
    for name, p in ours.policy.named_parameters():
        scale = float(p.grad.abs().max())  # fp32 round-off of two summation orders
        assert scale > 0 and torch.allclose(p.grad, trl_grads[name].grad, atol=1e-5 * scale), name


@pytest.mark.slow
def test_dpo_after_sft_from_the_command_line(tmp_path):
    """`train.py stage=sft` then `train.py stage=dpo`: an HF causal LM artifact with its manifest,
    log 2 as the first training loss, the log-ratio curves and the evaluation callbacks' metrics."""
    args = [*TINY_DPO, "dpo.batch_size=16", "callbacks.kl.every_n_steps=4"]
    assert train_cli(["stage=sft", *args], tmp_path).returncode == 0
    proc = train_cli(["stage=dpo", *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    artifact = tmp_path / "artifacts" / "reviews" / "dpo"
    manifest = json.loads((artifact / MANIFEST).read_text())
    assert manifest["stage"] == "dpo" and "val/implicit_accuracy" in manifest["metrics"]
    AutoModelForCausalLM.from_pretrained(artifact)  # transformers loads it as it is
    [run_dir] = (tmp_path / "outputs" / "dpo").iterdir()
    result = json.loads((run_dir / "result.json").read_text())["results"]["dpo"]
    for key in ("gold_reward", "reference_gold_reward", "kl", "implicit_accuracy", "beta"):
        assert math.isfinite(result[key]), key
    rows = list(csv.DictReader((run_dir / "csv" / "dpo" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    logged = {k for r in rows for k, v in r.items() if v}
    for key in (
        "train/logratio_chosen",
        "train/logratio_rejected",
        "val/logratio_chosen",
        "val/implicit_accuracy",
        "val/loss",
        "eval/kl",
        "eval/gold_reward",
        "eval/implicit_accuracy",
    ):
        assert key in logged, key
    assert (run_dir / "overoptimisation.json").exists()


def test_dpo_without_sft_names_the_command(tmp_path):
    with pytest.raises(ArtifactError, match="python train.py stage=sft"):
        run(compose(["stage=dpo", *TINY_DPO], tmp_path))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("dpo.beta=0", "dpo.beta"),
        ("dpo.loss_type=hinge", "dpo.loss_type"),
        ("dpo.label_smoothing=0.5", "dpo.label_smoothing"),
        ("dpo.batch_size=0", "dpo.batch_size"),
    ],
)
def test_impossible_dpo_values_fail_at_start(tmp_path, override, key):
    cfg = with_paths(compose(["stage=dpo", *TINY_DPO, override]), tmp_path)
    with pytest.raises(ConfigError, match=key):
        validate(cfg)


def test_dpo_artifact_paths(sft_ctx):
    assert Path(sft_ctx.artifact("dpo", write=True)).name == "dpo"


ORACLE = [
    "task=oracle",
    "task.n_sft=400",
    "task.n_sft_val=64",
    "task.n_pairs_train=256",
    "task.n_pairs_val=64",
    "task.n_pairs_test=32",
    *TINY_MODEL,
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "callbacks=none",
    "dpo.eval_samples=16",
]


@pytest.mark.slow
def test_oracle_dpo_moves_towards_p_dpo_star(tmp_path):
    """On task=oracle the result holds the exact J, J* and KL(p_θ ‖ p_DPO*) at DPO's scale g/τ,
    and DPO ends closer to p_DPO* than the reference started: KL_end < KL(p_ref ‖ p_DPO*)."""
    beta = 0.5
    overrides = ["sft.max_epochs=2", "dpo.max_epochs=8", "dpo.batch_size=16"]
    cfg = compose(["stage=dpo_pipeline", *overrides, *ORACLE], tmp_path)
    with open_dict(cfg):
        cfg.dpo.beta = beta
    run(cfg)
    record = json.loads((Path(cfg.paths.output_dir) / "result.json").read_text())
    result = record["results"]["dpo"]
    start = (result["objective_star"] - result["reference_objective"]) / beta  # KL(p_ref‖p*)
    assert result["kl_to_optimum"] == pytest.approx(result["optimum_gap"] / beta, rel=1e-4)
    assert 0 <= result["kl_to_optimum"] < 0.8 * start
    assert result["exact_objective"] <= result["objective_star"] + 1e-5
    assert result["implicit_accuracy"] > 0.6


def test_report_has_a_row_per_route(tmp_path):
    """A job that ran both routes (stage=dpo_vs_rlhf) gives one report row each, named by stage,
    with its algo, β and exact columns; a one-stage job keeps one row."""
    from rlhf_lightning.sweep_report import collect

    exact = {"exact_objective": 1.0, "objective_star": 2.0, "reference_objective": 0.0}
    jobs = {
        "0": {
            "stages": ["sft", "rm", "dpo", "policy"],
            "results": {
                "sft": {"loss": 1.0},
                "rm": {"accuracy": 0.8},
                "dpo": {"algo": "dpo", "beta": 0.5, "kl_to_optimum": 0.3, **exact},
                "policy": {"beta": 0.5, "kl_to_optimum": 0.2, **exact, "exact_objective": 1.5},
            },
            "algo": "rloo",
        },
        "1": {"stages": ["dpo"], "results": {"dpo": {"algo": "dpo", "beta": 1.0}}, "algo": "rloo"},
    }
    for name, record in jobs.items():
        (tmp_path / name / ".hydra").mkdir(parents=True)
        record.update({"status": "completed", "overrides": [f"algo.beta={name}"]})
        (tmp_path / name / "result.json").write_text(json.dumps(record))
    rows = collect(tmp_path)
    assert [(r["job"], r["algo"]) for r in rows] == [
        ("0/dpo", "dpo"),
        ("0/policy", "rloo"),
        ("1", "dpo"),
    ]
    assert [r.get("closure") for r in rows] == [0.5, 0.75, None]
    assert rows[0]["kl_to_optimum"] == 0.3


@pytest.mark.slow
def test_dpo_beta_sweep_reports_a_row_per_job(tmp_path):
    """`train.py -m stage=dpo dpo.beta=…` after one SFT: a report row per β with KL, gold and the
    implicit accuracy, named as DPO."""
    run(compose(["stage=sft", *TINY_DPO], tmp_path))
    sweep = tmp_path / "sweep"
    args = ["-m", "stage=dpo", "dpo.beta=0.1,1", "callbacks=none", *TINY_DPO]
    proc = train_cli([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert [(r["algo"], float(r["beta"])) for r in rows] == [("dpo", 0.1), ("dpo", 1.0)]
    for row in rows:
        assert row["status"] == "completed"
        assert all(math.isfinite(float(row[k])) for k in ("kl", "gold_reward", "implicit_accuracy"))


def test_lora_dpo_trains_the_adapter_against_the_adapter_free_reference(sft_ctx, pair_batch):
    """With model.lora the reference is the same network with its adapter off: the loss starts at
    log 2, only adapter weights are trained, and moving them moves the policy, not the reference."""
    ctx = copy.copy(sft_ctx)
    ctx.cfg = copy.deepcopy(sft_ctx.cfg)
    with open_dict(ctx.cfg):
        ctx.cfg.model.lora = {"r": 4, "alpha": 8}
    ctx.model_spec = instantiate(ctx.cfg.model)
    module = build_dpo_module(ctx)
    batch, _ = pair_batch
    out = module(batch)
    assert float(out["loss"].detach()) == pytest.approx(math.log(2), abs=1e-6)
    trained = module.trained_parameters()
    assert trained and all(
        "lora" in n for n, p in module.policy.named_parameters() if p.requires_grad
    )
    with torch.no_grad():
        for p in trained:  # move the adapter only
            p.add_(torch.randn_like(p) * 0.05)
    moved = module(batch)["logratio_chosen"].detach()
    assert moved.abs().max() > 1e-4  # the reference (adapter off) did not move with it
