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

from rlhf_lightning.artifacts import save_model_artifact
from rlhf_lightning.data.prompts import PromptDataModule
from rlhf_lightning.generation.settings import GenerationSettings
from rlhf_lightning.models.lora import export_for_saving
from rlhf_lightning.modules.algorithm import Algorithm
from rlhf_lightning.modules.evaluation import evaluate_policy
from rlhf_lightning.modules.policy import PolicyModule
from rlhf_lightning.sharding import deepspeed_gradient_clipping
from rlhf_lightning.stages.common import policy_and_reference, rank_zero_work


def build_policy_module(ctx) -> PolicyModule:
    """Everything the policy stage trains with, from the config and the earlier artifacts."""
    cfg = ctx.cfg
    tokenizer = ctx.tokenizer
    # with model.lora the reference is the policy with its adapter disabled: one copy of the weights
    policy, reference, identity = policy_and_reference(ctx, "policy", cfg.policy.reference)
    reward = instantiate(cfg.reward).setup(ctx)
    task = ctx.data.task
    generation = GenerationSettings(**OmegaConf.to_container(cfg.policy.generation, resolve=True))
    exact = None
    if task is not None and hasattr(task, "allowed_token_ids"):  # enumerable task
        generation.allowed_token_ids = task.allowed_token_ids(tokenizer)
        generation.min_new_tokens = generation.max_new_tokens = task.length
        from rlhf_lightning.analysis.oracle import OracleEvaluator, exact_rewards

        rewards = exact_rewards(task, cfg.policy.get("exact_reward", "gold"))
        exact = OracleEvaluator(task, tokenizer, reference, generation.temperature, rewards)
    algo_cfg = OmegaConf.to_container(cfg.algo)
    algo_cfg.pop("beta", None)
    module = PolicyModule(
        policy=policy,
        reference=reference,
        reward=reward,
        tokenizer=tokenizer,
        algorithm=Algorithm(**algo_cfg),
        beta_controller=instantiate(cfg.kl_controller),
        optimizer=instantiate(cfg.policy.optimizer),
        generation=generation,
        kl_estimator=cfg.kl.estimator,
        kl_penalty=cfg.kl.penalty,
        missing_eos_penalty=cfg.policy.missing_eos_penalty,
        max_grad_norm=cfg.policy.max_grad_norm,
        exact=exact,
        seed=cfg.seed,
        micro_batch_size=cfg.policy.micro_batch_size,
        forward_batch_size=cfg.policy.forward_batch_size,
        max_tokens_per_micro_batch=cfg.policy.max_tokens_per_micro_batch,
        shared_prefix=cfg.policy.shared_prefix,
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
            result["sha256"] = save_model_artifact(  # a plain HF model (a LoRA adapter merged in)
                export_for_saving(module.policy),
                module.tokenizer,
                ctx.artifact("policy", write=True),
                manifest,
            )
            result["artifact"] = str(ctx.artifact("policy", write=True))
    return result
