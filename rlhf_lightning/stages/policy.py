"""Stage `policy`: RLHF against the frozen reward, from and towards the reference.

Reads the reference and initial policy from `artifacts/<task>/sft` (`policy.reference=sft`) or
the pretrained checkpoint itself (`policy.reference=checkpoint`, no SFT stage), and, for `reward=learned`,
`artifacts/<task>/rm`; a missing artifact fails with the command that makes it. Saves the final
policy to `artifacts/<task>/policy` (HF causal LM) and evaluates it against the SFT policy.
"""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from rlhf_lightning.analysis.oracle import oracle_setup
from rlhf_lightning.data.prompts import PromptDataModule
from rlhf_lightning.generation.settings import GenerationSettings
from rlhf_lightning.modules.algorithm import Algorithm
from rlhf_lightning.modules.evaluation import evaluate_policy
from rlhf_lightning.modules.policy import PolicyModule
from rlhf_lightning.sharding import deepspeed_gradient_clipping
from rlhf_lightning.stages.common import (
    build_module,
    policy_and_reference,
    rank_zero_work,
    save_stage_artifact,
)


def build_policy_module(ctx) -> PolicyModule:
    """`policy.module` (PolicyModule and its settings) with what the stage builds: the policy and
    frozen reference, the reward, the sampling settings, the exact evaluator on an enumerable
    task, the algorithm (`algo`) and the β controller (`kl_controller`)."""
    cfg = ctx.cfg
    tokenizer = ctx.tokenizer
    # with model.lora the reference is the policy with its adapter disabled: one copy of the weights
    policy, reference, identity = policy_and_reference(ctx, "policy", cfg.policy.reference)
    reward = instantiate(cfg.reward).setup(ctx)
    generation = GenerationSettings(**OmegaConf.to_container(cfg.policy.generation, resolve=True))
    scale = cfg.policy.get("exact_reward", "gold")
    exact = oracle_setup(ctx.data.task, tokenizer, reference, generation, scale)
    algo_cfg = OmegaConf.to_container(cfg.algo)
    algo_cfg.pop("beta", None)
    module = build_module(
        cfg.policy.module,
        policy=policy,
        reference=reference,
        reward=reward,
        tokenizer=tokenizer,
        generation=generation,
        exact=exact,
        algorithm=Algorithm(**algo_cfg),
        beta_controller=instantiate(cfg.kl_controller),
    )
    module.identity = {**identity, "reward_sha256": getattr(reward, "sha256", None)}
    return module


def run_policy(ctx) -> dict:
    cfg = ctx.cfg.policy
    module = build_policy_module(ctx)
    datamodule = PromptDataModule(ctx.data, module.tokenizer, cfg.prompts_per_step, ctx.cfg.seed)
    # Lightning counts optimiser steps; `policy.steps` counts rollouts (sample → score → update)
    per_rollout = module.algorithm.updates_per_rollout
    trainer = ctx.trainer("policy", max_steps=cfg.steps * per_rollout, limit_val_batches=0)
    deepspeed_gradient_clipping(trainer.strategy, cfg.max_grad_norm)  # its engine clips
    trainer.fit(module, datamodule=datamodule, ckpt_path=ctx.ckpt_path("policy"))
    result = {"beta": float(module.beta.value)}
    with rank_zero_work(trainer) as mine:
        if mine:
            gold = getattr(ctx.data.task, "gold_reward", None)
            with torch.no_grad():
                prompts = datamodule.prompts["eval"]
                final = evaluate_policy(module, prompts, gold, cfg.eval_samples, ctx.cfg.seed)
            result.update(final)
            # the objective the stage optimises, r − β·KL, at the final β (what sweeps maximise)
            result["objective"] = final["proxy_reward"] - result["beta"] * final["kl"]
            if module.exact is not None:
                result.update(module.exact.summary(module.policy, module.beta.value))
                result["frontier"] = module.exact.frontier()
            manifest = {"stage": "policy", "metrics": final, **module.identity}
            save_stage_artifact(ctx, "policy", module.policy, manifest, result)
    return result
