"""Random streams keyed by integers: a sample's draws depend on its key, never on its batch.

Rollouts sample from streams keyed by (seed, rollout number, prompt index, j < k), so a sample is
the same whichever rank or batch draws it, and resume needs no RNG state. Keyed sampling is the
Gumbel-max trick with counter-based uniforms (`keyed_uniform`): one vectorised hash per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

EVAL_STREAM = 2**32  # the "rollout number" of evaluation draws: never one of training's


def stream_seed(*key: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence hash): one random stream per key."""
    import numpy as np

    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1)


def sample_seeds(seed: int, rollout: int, keys: Tensor | list[int], group_size: int) -> list[int]:
    """One seed per sample [len(keys)·k]: a hash of (run seed, rollout number, key, j < k).

    Keys identify prompts (their index in the prompt set), so a sample's random draws do not depend
    on the batch it is drawn in, nor on the rank that draws it (`trainer=ddp`).
    """
    keys = keys.tolist() if isinstance(keys, Tensor) else list(keys)
    return [stream_seed(seed, rollout, key, j) for key in keys for j in range(group_size)]


MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x · c) mod 2³² for x < 2³², in int64 without overflow (the high half of c is split off)."""
    low, high = c & 0xFFFF, c >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & MASK32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash with good avalanche (Wellons' "lowbias32"), elementwise on int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _as_int32(x: Tensor) -> Tensor:
    """The bit pattern of uint32 values held in int64, as int32 (values ≥ 2³¹ become negative)."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


# lowbias32's multipliers as int32 bit patterns: int32 products wrap mod 2³² (the CPU and CUDA
# kernels multiply in two's complement), so `_mix32_int32` gives `_mix32`'s bits in half the bytes
# and without `_mul32`'s split: the [B, V] table of every decoding step is ~13× faster.
_C1, _C2 = 0x7FEB352D, 0x846CA68B - 2**32


def _mix32_int32(x: Tensor) -> Tensor:
    """`_mix32` on int32 bit patterns (logical shifts by masking the arithmetic ones)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _C1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _C2
    return x ^ ((x >> 16) & 0xFFFF)


def keyed_uniform(seeds: Tensor, step: int, vocab: int) -> Tensor:
    """Uniforms u ∈ (0, 1), [B, V] float32: a counter-based hash of (seed_b, step, token v).

    One vectorised draw for every row and token: u[b, v] depends on seeds[b] (int64 [B]), `step`
    and v only, never on the batch around row b — the guarantee keyed sampling rests on. 23 bits
    per uniform, (k + ½)·2⁻²³, so −log(−log u) is always finite.
    """
    token = torch.arange(vocab, device=seeds.device, dtype=torch.int32)[None]  # [1, V]
    return keyed_uniform_at(seeds[:, None], step, token)


def keyed_uniform_at(seeds: Tensor, step: int, tokens: Tensor) -> Tensor:
    """`keyed_uniform` at chosen (seed, token) pairs: seeds int64, token ids any integer type (the
    hash runs on them as int32), broadcast together
    ([N] and [N]: the N values u[seed_i, token_i]; [B, 1] and [1, V]: the whole table)."""
    lo, hi = seeds & MASK32, (seeds >> 32) & MASK32
    row = _mix32(hi ^ _mix32(lo ^ _mix32(torch.full_like(lo, step & MASK32))))  # per seed: int64
    tokens = tokens.to(torch.int32)  # token ids < 2³¹: the same bits
    h = _mix32_int32(_mix32_int32(tokens ^ _as_int32(row)) ^ _as_int32(lo))  # the [B, V] part
    return (((h >> 9) & 0x7FFFFF).float() + 0.5) * 2.0**-23


class KeyedGumbelSampling:
    """A logits processor that turns greedy decoding into sampling with a random stream per row.

    argmax_v (s_v / T + g_v), g_v ~ Gumbel(0, 1) i.i.d., is a draw from softmax(s / T) (the
    Gumbel-max trick). Row b's noise at decoding step t is `keyed_uniform(seeds, t, V)[b]`, a hash
    of (seeds[b], t, v): what a row samples depends on its seed and its own tokens only, and the
    noise of all rows is one vectorised computation per step (no per-row generator).
    """

    def __init__(self, seeds: list[int], temperature: float, device: torch.device):
        self.temperature = temperature
        self.seeds = torch.tensor(seeds, dtype=torch.int64, device=device)
        self.step = 0

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        perturbed = gumbel_perturbed(scores, self.seeds, self.step, self.temperature)
        self.step += 1
        return perturbed


def gumbel_perturbed(scores: Tensor, seeds: Tensor, step: int, temperature: float) -> Tensor:
    """s / T + g, [B, V] float32, g = −log(−log u) with u = `keyed_uniform(seeds, step, V)`: its
    argmax is row b's keyed draw from softmax(s / T) at decoding step `step` (every backend's)."""
    u = keyed_uniform(seeds, step, scores.shape[-1])  # [B, V]
    gumbel = -torch.log(-torch.log(u))
    return scores.float() / temperature + gumbel
