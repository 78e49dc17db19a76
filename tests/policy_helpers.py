"""A `PolicyModule` on the `oracle` task without Hydra or artifacts, for the optimiser tests.

The reference is a tiny Llama fitted to the task's base distribution by exact cross-entropy
(−Σ_y p_base(y|u) log p_θ(y|u), by enumeration), so p_ref is non-uniform and deterministic; the
policy starts as a copy of it. Training runs through a real `lightning.Trainer` on a prompt list.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_lightning.analysis.optimum import closure, enumerated_logprobs
from rlhf_lightning.analysis.oracle import OracleEvaluator
from rlhf_lightning.control.beta import BetaController, FixedBeta
from rlhf_lightning.generation.settings import GenerationSettings
from rlhf_lightning.models.tokenizer import build_tokenizer
from rlhf_lightning.modules.algorithm import Algorithm
from rlhf_lightning.modules.policy import PolicyModule
from rlhf_lightning.rewards.gold import GoldReward
from rlhf_lightning.tasks.oracle import OracleTask

CONF = Path(__file__).resolve().parents[1] / "conf"
SMALL_TASK = dict(n_sft=8, n_sft_val=8, n_pairs_train=8, n_pairs_val=8, n_pairs_test=8)


@dataclass
class Oracle:
    """The task, its tokenizer, the frozen reference, the exact evaluator and sampling settings."""

    task: OracleTask
    tokenizer: object
    reference: torch.nn.Module
    evaluator: OracleEvaluator
    generation: GenerationSettings


def tiny_llama(tokenizer, seed: int, hidden: int = 32, layers: int = 1) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def fit_to_base(model, tokenizer, task: OracleTask, steps: int = 40, lr: float = 1e-2) -> float:
    """Exact SFT: Adam on −mean_u Σ_y p_base(y|u) log p_θ(y|u); returns the final KL(p_base‖p_θ)."""
    base = task.base_logprobs()  # [P, N]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = -(base.exp() * enumerated_logprobs(model, tokenizer, task)).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        fitted = enumerated_logprobs(model, tokenizer, task)
    return float((base.exp() * (base - fitted)).sum(-1).mean())


def build_oracle(seed: int = 0, sft_steps: int = 40, **model_kwargs) -> Oracle:
    task = OracleTask(seed=seed, **SMALL_TASK)
    tokenizer = build_tokenizer(task.corpus())
    reference = tiny_llama(tokenizer, seed, **model_kwargs)
    if sft_steps:
        fit_to_base(reference, tokenizer, task, sft_steps)
    reference.eval().requires_grad_(False)
    evaluator = OracleEvaluator(task, tokenizer, reference)  # standardises gold under p_ref
    generation = GenerationSettings(
        max_new_tokens=task.length,
        min_new_tokens=task.length,
        allowed_token_ids=task.allowed_token_ids(tokenizer),
    )
    return Oracle(task, tokenizer, reference, evaluator, generation)


def algorithm_from_conf(name: str, **overrides) -> Algorithm:
    """`Algorithm` from conf/algo/<name>.yaml (the shipped defaults), with overrides."""
    node = OmegaConf.to_container(OmegaConf.load(CONF / "algo" / f"{name}.yaml"))
    node.pop("beta", None)
    return Algorithm(**{**node, **overrides})


def build_module(
    oracle: Oracle,
    algorithm: Algorithm,
    beta: float | BetaController = 0.1,
    lr: float = 1e-3,
    kl_estimator: str = "k1",
    kl_penalty: str = "token",
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    policy: torch.nn.Module | None = None,
) -> PolicyModule:
    """A PolicyModule whose policy is a trainable copy of the reference (or of `policy`)."""
    torch.manual_seed(seed)  # the value head's initialisation
    reward = GoldReward()
    reward.task = oracle.task
    source = oracle.reference if policy is None else policy
    policy = copy.deepcopy(source).train().requires_grad_(True)
    controller = beta if isinstance(beta, BetaController) else FixedBeta(beta)
    return PolicyModule(
        policy=policy,
        reference=oracle.reference,
        reward=reward,
        tokenizer=oracle.tokenizer,
        algorithm=algorithm,
        beta_controller=controller,
        optimizer=functools.partial(torch.optim.AdamW, lr=lr, betas=(0.9, 0.95), weight_decay=0.0),
        generation=oracle.generation,
        kl_estimator=kl_estimator,
        kl_penalty=kl_penalty,
        missing_eos_penalty=None,
        max_grad_norm=max_grad_norm,
        exact=oracle.evaluator,
    )


def train(
    module: PolicyModule,
    steps: int,
    prompts_per_step: int,
    seed: int = 0,
    callbacks: list[L.Callback] | None = None,
) -> None:
    """`steps` training steps (rollout + update each) with a real Trainer on CPU."""
    prompts = module.exact.task.prompts()
    stream = [prompts[i % len(prompts)] for i in range(steps * prompts_per_step)]
    loader = DataLoader(stream, batch_size=prompts_per_step, shuffle=False, collate_fn=list)
    L.seed_everything(seed, verbose=False)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, loader)


def exact_summary(module: PolicyModule, beta: float) -> dict[str, float]:
    return module.exact.summary(module.policy, beta)


def closed(start: dict[str, float], end: dict[str, float]) -> float:
    """closure(J_ref, J_end, J*) from two `exact_summary` dicts."""
    return closure(start["exact_objective"], end["exact_objective"], end["objective_star"])
