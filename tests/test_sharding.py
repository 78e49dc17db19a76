"""`sharding.gathered_weights` and `sharding.clip_grad_norm` under FSDP FULL_SHARD and without it.

The FSDP checks run this file as a script in 2 CPU processes (gloo), wrapping a tiny Llama the way
Lightning's `FSDPStrategy._setup_model` does (one unit per decoder layer, use_orig_params=True).
Each rank writes what it saw to a JSON file; the tests read them. Rank 1 leaves `gathered_weights`
at once and waits in the next collective while rank 0 works alone, as in training. A rank that
hangs is killed after WORKER_TIMEOUT s; collectives time out after 60 s.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from rlhf_lightning.errors import ConfigError
from rlhf_lightning.sharding import clip_grad_norm, deepspeed_gradient_clipping, gathered_weights

WORKER_TIMEOUT = 120
MAX_NORM = 0.05


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
    )
    return LlamaForCausalLM(config)


class _Holder(torch.nn.Module):
    """Stands in for the LightningModule that Lightning wraps: the policy is an attribute."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, ids):
        return self.policy(ids, labels=ids).loss


def _batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randint(0, 64, (3, 6), generator=g)  # [B, T]


def _wrap_as_lightning(holder, world: int):
    """(FSDPStrategy, FSDP root) wrapped with the arguments of Lightning's `_setup_model`.

    Lightning passes `device_id=root_device.index` (None on CPU, which FSDP refuses); the CPU
    device is the one change.
    """
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    strategy = FSDPStrategy(
        accelerator=CPUAccelerator(),
        parallel_devices=[torch.device("cpu")] * world,
        sharding_strategy="FULL_SHARD",
        auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
    )
    root = FullyShardedDataParallel(
        module=holder,
        cpu_offload=strategy.cpu_offload,
        mixed_precision=strategy.mixed_precision_config,
        sharding_strategy=strategy.sharding_strategy,
        device_id=torch.device("cpu"),
        **strategy.kwargs,  # auto_wrap_policy, use_orig_params=True
    )
    assert strategy.kwargs["use_orig_params"]
    return strategy, root


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


def _gather_checks(trainer, policy, reference, rank: int, out: dict) -> None:
    from transformers import AutoModelForCausalLM

    ids = _batch(0)
    out["numel_before"] = _numel(policy)
    with gathered_weights(trainer):
        out["numel_inside"] = _numel(policy)
        if rank == 0:
            with torch.no_grad():
                expected = reference(ids).logits
                out["forward_diff"] = _max_diff(policy(ids).logits, expected)
                prompt = ids[:1, :3]
                tokens = policy.generate(prompt, max_new_tokens=4, do_sample=False)
                want = reference.generate(prompt, max_new_tokens=4, do_sample=False)
                out["generate_equal"] = torch.equal(tokens, want)
                with tempfile.TemporaryDirectory() as tmp:
                    policy.save_pretrained(tmp)
                    reloaded = AutoModelForCausalLM.from_pretrained(tmp)
                    out["reload_diff"] = _max_diff(reloaded(ids).logits, expected)
    out["numel_after"] = _numel(policy)


def _clip_checks(trainer, root, policy, reference, rank: int, out: dict) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    root(_batch(rank)).backward()  # FSDP averages the ranks' gradients
    clip_grad_norm(types.SimpleNamespace(trainer=trainer), None, MAX_NORM)
    with FullyShardedDataParallel.summon_full_params(root, writeback=False, with_grads=True):
        if rank == 0:
            grads = {
                n.replace("_fsdp_wrapped_module.", ""): p.grad.clone()
                for n, p in policy.named_parameters()
            }
    if rank != 0:
        return
    # unsharded: the same two batches on one process, the mean of the two losses
    loss = reference(_batch(0), labels=_batch(0)).loss + reference(_batch(1), labels=_batch(1)).loss
    (loss / 2).backward()
    out["norm_before"] = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM))
    out["norm_after"] = float(
        torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
    )
    want = dict(reference.named_parameters())
    out["grad_diff"] = max(_max_diff(g, want[n].grad) for n, g in grads.items())
    out["same_names"] = sorted(grads) == sorted(want)


def _worker(rank: int, port: int, result_dir: Path) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timeout)
    policy = _tiny_llama()  # same seed on every rank
    reference = copy.deepcopy(policy)
    out = {"numel_full": _numel(policy)}
    strategy, root = _wrap_as_lightning(_Holder(policy), world=2)
    trainer = types.SimpleNamespace(strategy=strategy, model=root)
    _gather_checks(trainer, policy, reference, rank, out)
    _clip_checks(trainer, root, policy, reference, rank, out)
    # what Lightning's setup does in trainer.validate after trainer.fit: the LightningModule has
    # FSDP units inside, so it is not wrapped again and the root's weights stay orphaned shards
    again = types.SimpleNamespace(strategy=strategy, model=strategy._setup_model(root.module))
    try:
        with gathered_weights(again):
            out["set_up_again"] = "entered"
    except RuntimeError as error:
        out["set_up_again"] = str(error)
    dist.barrier()
    (result_dir / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory) -> list[dict]:
    """What each of the 2 FSDP ranks recorded (see `_worker`)."""
    result_dir = tmp_path_factory.mktemp("fsdp")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(port), str(result_dir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    logs, deadline = [], time.monotonic() + WORKER_TIMEOUT
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"an FSDP worker hung for {WORKER_TIMEOUT} s")
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    return [json.loads((result_dir / f"rank{r}.json").read_text()) for r in range(2)]


def test_fsdp_weights_are_whole_inside_and_sharded_outside(fsdp_ranks):
    full = fsdp_ranks[0]["numel_full"]
    for rank in fsdp_ranks:
        assert rank["numel_before"] < full and rank["numel_after"] < full  # a shard
        assert rank["numel_inside"] == full
    assert sum(r["numel_before"] for r in fsdp_ranks) == full  # the shards make the whole
    assert [r["numel_after"] for r in fsdp_ranks] == [r["numel_before"] for r in fsdp_ranks]


def test_fsdp_rank_zero_alone_runs_forward_generate_and_save(fsdp_ranks):
    rank0 = fsdp_ranks[0]
    assert rank0["forward_diff"] <= 1e-6
    assert rank0["generate_equal"]
    assert rank0["reload_diff"] <= 1e-6  # save_pretrained wrote the whole model, loadable by HF


def test_fsdp_without_a_root_unit_is_refused(fsdp_ranks):
    for rank in fsdp_ranks:
        assert "should be the root FSDP unit, but it is a _Holder" in rank["set_up_again"]


def test_fsdp_clip_grad_norm_equals_unsharded_clipping(fsdp_ranks):
    rank0 = fsdp_ranks[0]
    assert rank0["norm_before"] > 2 * MAX_NORM  # clipping was active
    assert rank0["norm_after"] <= MAX_NORM + 1e-6
    assert rank0["norm_after"] == pytest.approx(MAX_NORM, rel=1e-5)
    assert rank0["same_names"]
    assert rank0["grad_diff"] <= 1e-6


class _Linear(L.LightningModule):
    """Manual optimisation on a linear model: one step, clipped by `clip_grad_norm`."""

    def __init__(self, fused: bool = False):
        super().__init__()
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(4, 3)
        self.seen: dict = {}
        self.fused = fused

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward((self.layer(batch[0]) ** 2).sum())
        self.seen["grads"] = [p.grad.clone() for p in self.layer.parameters()]
        clip_grad_norm(self, optimizer, MAX_NORM)
        self.seen["clipped"] = [p.grad.clone() for p in self.layer.parameters()]
        with gathered_weights(self.trainer):
            self.seen["inside"] = [p.detach().clone() for p in self.layer.parameters()]
        optimizer.step()

    def configure_optimizers(self):
        if self.fused:  # the stages' default (conf/*/default.yaml)
            return torch.optim.AdamW(self.parameters(), lr=0.1, fused=True)
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "precision, fused",
    [("32-true", False), ("bf16-mixed", True)],  # bf16: Lightning's AMP plugin refuses fused
)
def test_without_sharding_lightning_clips_and_the_context_is_a_no_op(precision, fused):
    torch.manual_seed(0)
    module = _Linear(fused=fused)
    before = [p.detach().clone() for p in module.layer.parameters()]
    data = torch.utils.data.TensorDataset(torch.randn(8, 4))
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        precision=precision,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    grads = module.seen["grads"]
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))  # ‖g‖₂
    assert total > 2 * MAX_NORM  # clipping is active
    expected = [g * (MAX_NORM / (total + 1e-6)) for g in grads]  # torch's clip coefficient
    for got, want in zip(module.seen["clipped"], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    for inside, was in zip(module.seen["inside"], before, strict=True):
        assert torch.equal(inside, was)  # the weights as they are, untouched


def test_a_fused_optimizer_under_a_loss_scale_is_refused_with_the_fix():
    """16-mixed: a fused AdamW unscales inside its step, after clipping; said, not clipped."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    module = _Linear(fused=True)
    optimizer = module.configure_optimizers()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    module.trainer = types.SimpleNamespace(strategy=object(), precision_plugin=plugin)
    with pytest.raises(ConfigError, match="fused=false"):
        clip_grad_norm(module, optimizer, MAX_NORM)


def _deepspeed_stand_in(config: dict) -> DeepSpeedStrategy:
    """A DeepSpeedStrategy holding `config` (deepspeed itself is not installed here)."""
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    strategy.config = config
    return strategy


def test_deepspeed_zero3_is_refused_and_zero2_passes():
    zero3 = types.SimpleNamespace(strategy=_deepspeed_stand_in({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="stage 3"), gathered_weights(zero3):
        pass
    zero2 = types.SimpleNamespace(strategy=_deepspeed_stand_in({"zero_optimization": {"stage": 2}}))
    with gathered_weights(zero2):
        pass


def test_deepspeed_clipping_is_the_engines():
    strategy = _deepspeed_stand_in({"zero_optimization": {"stage": 2}})
    module = types.SimpleNamespace(trainer=types.SimpleNamespace(strategy=strategy))
    with pytest.raises(ConfigError, match="gradient_clipping=None"):
        clip_grad_norm(module, None, 1.0)
    deepspeed_gradient_clipping(strategy, 1.0)
    assert strategy.config["gradient_clipping"] == 1.0
    clip_grad_norm(module, None, 1.0)  # the engine clips at 1.0: nothing to do
    users = _deepspeed_stand_in({"gradient_clipping": 0.5})
    deepspeed_gradient_clipping(users, 1.0)  # a value the user set is kept ...
    with pytest.raises(ConfigError, match="gradient_clipping=0.5"):  # ... and refused here
        clip_grad_norm(
            types.SimpleNamespace(trainer=types.SimpleNamespace(strategy=users)), None, 1.0
        )


if __name__ == "__main__":  # one FSDP rank, started by the `fsdp_ranks` fixture
    _worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
