"""Stage `dpo`: direct preference optimisation on the preference pairs, from the reference.

Reads the reference and initial policy from `artifacts/<task>/sft` (`dpo.reference=sft`) or the
pretrained checkpoint itself (`dpo.reference=checkpoint`); with `model.lora` the reference is the
same network with its adapter off. When it exists, `artifacts/<task>/rm` is the proxy reward the
evaluation callbacks score samples with (else the task's gold). Saves the policy to
`artifacts/<task>/dpo` (HF causal LM + manifest) and evaluates it against the reference on
held-out prompts as the policy stage does (gold reward, proxy, KL).

On `task=oracle` the exact quantities are against p_DPO*(y|u) ∝ p_ref(y|u)·exp(g(u,y)/(τβ)): the
labels are Bradley–Terry under the raw gold g at temperature τ, so g/τ is the reward DPO recovers
(up to a per-prompt constant), and its population optimum at β is that tilted reference.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import OmegaConf

from rlhf_lightning.analysis.oracle import oracle_setup
from rlhf_lightning.data.preference import PreferenceDataModule
from rlhf_lightning.generation.settings import GenerationSettings
from rlhf_lightning.modules.dpo import DPOModule
from rlhf_lightning.modules.evaluation import evaluate_policy
from rlhf_lightning.rewards.base import RewardFunction
from rlhf_lightning.stages.common import (
    build_module,
    policy_and_reference,
    rank_zero_work,
    save_stage_artifact,
    validation_metrics,
)


class NoReward(RewardFunction):
    """Scores 0: user data with no reward model and no gold (evaluation logs KL only)."""

    name = "none"

    def __call__(self, prompts, responses) -> torch.Tensor:
        return torch.zeros(len(prompts))


def proxy_reward(ctx) -> RewardFunction:
    """The learned RM when its artifact exists (what RLHF would optimise), else the gold."""
    from rlhf_lightning.rewards.gold import GoldReward
    from rlhf_lightning.rewards.learned import LearnedReward

    if (ctx.artifact("rm") / "config.json").exists():
        return LearnedReward(path=str(ctx.artifact("rm"))).setup(ctx)
    rank_zero_info("[dpo] no reward-model artifact: eval/proxy_reward is the task's gold reward")
    return GoldReward().setup(ctx) if ctx.data.task is not None else NoReward()


def build_dpo_module(ctx) -> DPOModule:
    """DPOModule from the config, the SFT artifact and (if present) the RM artifact."""
    cfg = ctx.cfg.dpo
    tokenizer = ctx.tokenizer
    policy, reference, identity = policy_and_reference(ctx, "dpo", cfg.reference)
    generation = GenerationSettings(**OmegaConf.to_container(cfg.generation, resolve=True))
    # enumerable task: exact terms about g/τ, the reward the labels identify
    exact = oracle_setup(ctx.data.task, tokenizer, reference, generation, "preference")
    module = build_module(
        cfg.module,
        policy=policy,
        reference=reference,
        tokenizer=tokenizer,
        generation=generation,
        reward=proxy_reward(ctx),
        exact=exact,
    )
    module.identity = identity
    return module


def run_dpo(ctx) -> dict:
    cfg = ctx.cfg.dpo
    datamodule = PreferenceDataModule(
        ctx.data,
        ctx.tokenizer,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        seed=ctx.cfg.seed,
        eval_prompts=True,
    )
    module = build_dpo_module(ctx)
    trainer = ctx.trainer("dpo", max_epochs=cfg.max_epochs)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ctx.ckpt_path("dpo"))
    metrics = validation_metrics(trainer, module, datamodule)
    result = {
        "algo": "dpo",
        "loss_type": str(cfg.loss_type),
        "beta": float(cfg.beta),
        "val_loss": metrics.get("val/loss", float("nan")),
        "implicit_accuracy": metrics.get("val/implicit_accuracy", float("nan")),
    }
    with rank_zero_work(trainer) as mine:
        if mine:
            result.update(_final_evaluation(ctx, module, datamodule))
            manifest = {"stage": "dpo", "metrics": {**metrics, **_floats(result)}}
            save_stage_artifact(ctx, "dpo", module.policy, {**manifest, **module.identity}, result)
    return result


def _final_evaluation(ctx, module: DPOModule, datamodule) -> dict:
    """Gold/proxy reward and KL of the DPO policy vs the SFT policy; exact terms on the oracle."""
    gold = getattr(ctx.data.task, "gold_reward", None)
    with torch.no_grad():
        prompts = datamodule.prompts["eval"]
        final = evaluate_policy(module, prompts, gold, ctx.cfg.dpo.eval_samples, ctx.cfg.seed)
    result = dict(final)
    result["objective"] = final["proxy_reward"] - module.beta.value * final["kl"]
    if module.exact is not None:
        result.update(module.exact.summary(module.policy, module.beta.value))
        result["frontier"] = module.exact.frontier()
    return result


def _floats(result: dict) -> dict:
    return {k: v for k, v in result.items() if isinstance(v, float)}
