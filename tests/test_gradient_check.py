"""The sampled policy gradient of every algorithm against the exact ∇J(θ) on `task=oracle`.

J(θ) = mean_u Σ_y p_θ(y|u) [r(u,y) − β log(p_θ(y|u)/p_ref(y|u))] is enumerated and differentiated
by autograd. Each algorithm's loss on a rollout, at the first minibatch of the first epoch (ratio
1, no clipping), is averaged over many rollouts from the same θ; its negative gradient estimates
∇J up to the factor 1/L of the masked token mean (L = the fixed response length). The minibatch is
the whole rollout (minibatches=1). Averaging is done on the enumerated tokens: rows with the same
(prompt, response) share their ∇log p terms, so each case's advantages are summed per token of
the P·N enumerated sequences and one backward pass gives the average of all rollouts' gradients
(`test_token_weights_reproduce_the_module_loss_gradient` checks this against
`PolicyModule.minibatch_loss` itself).

Theory (score-function identity, ∇J = E_y[∇log p_θ(y) · (r − β log p_θ/p_ref)]), unbiased up to a
positive scale, hence asserted (cosine ≥ 0.9 and scale ≈ 1):
  - k1 in the reward: Σ_t l_t = log p_θ(y)/p_ref(y) exactly, so s = r − β·Σk1 is the right score;
  - rloo: the leave-one-out baseline is independent of the sample it is subtracted from;
  - reinforce: the batch mean contains the sample's own score with weight 1/B, which only
    scales the expectation by (1 − 1/B);
  - ppo with γ = λ = 1 and no whitening: A_t = Σ_{t'≥t} r_t' − V(s_t) is reward-to-go minus a
    state baseline (V(s_t) is read before y_t), unbiased with the per-token or the sequence reward.
Biased, only reported: k2/k3 in the reward (E[∇log p · k] ≠ ∇KL away from p_ref); grpo (dividing by
the group std reweights samples by a function of themselves); ppo's defaults (GAE with λ < 1
bootstraps from an imperfect V; whitening divides by a batch statistic).
"""

from __future__ import annotations

import time

import pytest
import torch
from policy_helpers import algorithm_from_conf, build_module, build_oracle, train

from rlhf_lightning.analysis.optimum import _enumerated_batch
from rlhf_lightning.models.logprobs import forward_logprobs

SEED = 0
BETA = 0.5  # the β of J at which both gradients are taken
PROMPTS_PER_ROLLOUT = 256  # 64 per prompt; with k = 4 a rollout holds 1024 samples
ROLLOUTS = 16
UNBIASED_PPO = dict(lam=1.0, gamma=1.0, whiten_advantages=False)

CASES = [  # (label, algorithm, overrides, estimator, penalty, unbiased)
    *[(f"reinforce {k}", "reinforce", {}, k, "token", k == "k1") for k in ("k1", "k2", "k3")],
    *[(f"rloo {k}", "rloo", {}, k, "token", k == "k1") for k in ("k1", "k2", "k3")],
    *[(f"grpo {k}", "grpo", {}, k, "token", False) for k in ("k1", "k2", "k3")],
    *[
        (f"ppo λ=1 unwhitened {k} {p}", "ppo", UNBIASED_PPO, k, p, k == "k1")
        for p in ("token", "sequence")
        for k in ("k1", "k2", "k3")
    ],
    *[
        (f"ppo conf {k} {p}", "ppo", {}, k, p, False)
        for p in ("token", "sequence")
        for k in ("k1", "k2", "k3")
    ],
]


def _flat_grad(scalar: torch.Tensor, params: list[torch.Tensor], retain: bool = False):
    return torch.cat(
        [g.flatten() for g in torch.autograd.grad(scalar, params, retain_graph=retain)]
    )


def _token_weights(rollout, advantages: torch.Tensor, task) -> torch.Tensor:
    """The rollout's loss gradient as weights on the enumerated tokens, [P·N, L].

    At ratio 1, −∇loss = Σ_{b,t} A_{b,t} ∇log p(y_{b,t}|prefix) / Σ mask: rows that are the same
    (prompt, response) share their ∇log p terms, so their advantages add up on one row.
    """
    mask = rollout.response_mask.bool()
    length = task.length
    prompt = {u: i for i, u in enumerate(task.prompts())}
    response = {y: j for j, y in enumerate(task.response_texts())}
    n = len(response)
    rows = torch.tensor(
        [
            prompt[u] * n + response[y]
            for u, y in zip(rollout.prompts, rollout.responses, strict=True)
        ]
    )  # [B]
    per_token = advantages[mask].view(-1, length) / mask.sum()  # [B, L]
    return torch.zeros(len(prompt) * n, length).index_add_(0, rows, per_token)  # [P·N, L]


def _enumerated_token_logprobs(module) -> torch.Tensor:
    """log p_θ(y_t | u, y_<t) of every response token of every (u, y), [P·N, L], differentiable."""
    task, gen = module.exact.task, module.generation
    ids, attention, response_mask = _enumerated_batch(module.tokenizer, task)
    logprobs, _, _ = forward_logprobs(
        module.policy, ids, attention, response_mask, gen.temperature, gen.allowed_token_ids
    )
    return logprobs[response_mask.bool()].view(-1, task.length)


@pytest.fixture(scope="module")
def modules():
    """One PolicyModule per case, all at the same θ: the reference moved by exact ascent at a
    small β, so that the KL term's gradient is not zero (at θ = θ_ref every estimator gives 0)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a shared 2-core machine run 20× slower
    oracle = build_oracle(seed=SEED)
    mover = build_module(oracle, algorithm_from_conf("exact"), beta=0.1, lr=1e-2)
    train(mover, steps=8, prompts_per_step=4)
    yield {
        label: build_module(
            oracle,
            algorithm_from_conf(algo, group_size=4, minibatches=1, **overrides),
            beta=BETA,
            kl_estimator=estimator,
            kl_penalty=penalty,
            policy=mover.policy,
        )
        for label, algo, overrides, estimator, penalty, _ in CASES
    }
    torch.set_num_threads(threads)


def _sampler(modules):
    """A ppo module samples the shared rollouts, so they carry V(s_t) from the value head that
    every ppo module starts with (same seed); the other algorithms ignore it."""
    return modules[CASES[-1][0]]


@pytest.mark.parametrize("label", ["rloo k1", "grpo k1", "ppo conf k1 token"])
def test_token_weights_reproduce_the_module_loss_gradient(modules, label):
    module = modules[label]
    torch.manual_seed(SEED)
    rollout = _sampler(modules).rollout(module.exact.task.prompts() * 8)  # [B = 128, T]
    advantages, returns = module.advantages(rollout)
    params = list(module.policy.parameters())
    loss = module.minibatch_loss(rollout, advantages, returns)["policy_loss"]
    weights = _token_weights(rollout, advantages, module.exact.task)  # [P·N, L]
    via_weights = _flat_grad((weights * _enumerated_token_logprobs(module)).sum(), params)
    torch.testing.assert_close(via_weights, _flat_grad(-loss, params), rtol=1e-3, atol=1e-6)


@pytest.fixture(scope="module")
def measured(modules) -> dict[str, tuple[float, float, bool]]:
    """(cosine, scale, unbiased) per case, from ROLLOUTS shared rollouts (common random numbers)."""
    start = time.perf_counter()
    sampler = _sampler(modules)
    task, params = sampler.exact.task, list(sampler.policy.parameters())
    table = sampler.exact.policy_logprobs(sampler.policy)  # [P, N]
    exact = _flat_grad(sampler.exact.terms(table, BETA)["objective"], params)
    weights = dict.fromkeys(modules, 0.0)
    prompts = task.prompts() * (PROMPTS_PER_ROLLOUT // len(task.prompts()))
    torch.manual_seed(SEED + 1)
    for _ in range(ROLLOUTS):
        rollout = sampler.rollout(prompts)  # [B = 1024, T], grouped by prompt
        for label, module in modules.items():
            advantages, _ = module.advantages(rollout)
            weights[label] = weights[label] + _token_weights(rollout, advantages, task)
    token_logprobs = _enumerated_token_logprobs(sampler)  # [P·N, L]
    rows = {}
    for label, *_, unbiased in CASES:
        estimate = _flat_grad((weights[label] / ROLLOUTS * token_logprobs).sum(), params, True)
        cosine = float(torch.nn.functional.cosine_similarity(estimate, exact, dim=0))
        scale = float(task.length * (estimate @ exact) / (exact @ exact))  # 1 when unbiased
        rows[label] = (cosine, scale, unbiased)
    at = sampler.exact.summary(sampler.policy, BETA)
    print(
        f"\nθ: exact KL(p_θ‖p_ref) {at['exact_kl']:.3f}, J {at['exact_objective']:.3f}, "
        f"J* {at['objective_star']:.3f} at β={BETA}; {ROLLOUTS} rollouts × "
        f"{len(prompts) * 4} samples; {time.perf_counter() - start:.1f}s"
    )
    print(f"{'case':32s} {'cosine':>7s} {'scale':>7s}  unbiased")
    for label, (cosine, scale, unbiased) in rows.items():
        print(f"{label:32s} {cosine:7.3f} {scale:7.3f}  {'yes' if unbiased else 'no'}")
    return rows


def test_unbiased_estimators_point_along_the_exact_gradient(measured):
    for label, (cosine, scale, unbiased) in measured.items():
        if unbiased:
            assert cosine >= 0.9, f"{label}: cosine {cosine:.3f}"
            assert 0.8 <= scale <= 1.2, f"{label}: scale {scale:.3f}"
