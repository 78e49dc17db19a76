"""`SamplesCallback`: what the policy writes, with its proxy and gold reward, as training goes.

Every `every_n_steps` it takes the responses to the first `n_prompts` held-out prompts (those the
KL / over-optimisation callbacks drew at this step when they ran, else `samples_per_prompt` of
its own) and appends the rows (step, prompt, response, proxy, gold) to a table
it keeps for the whole run (callback state, so a resumed run keeps its rows). Weights & Biases
gets the whole table re-logged as `samples/table` each time (the last one holds every row); every
logger run also gets the rows appended to `samples.jsonl` in `trainer.default_root_dir`, so CSV
runs can read them too. Degenerate text the proxy still likes shows up here first.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from rlhf_lightning.callbacks.common import (
    EvalCallback,
    eval_prompts,
    log_metrics,
    samples_of_this_step,
    shared_samples,
)

COLUMNS = ("step", "prompt", "response", "proxy", "gold")


class SamplesCallback(EvalCallback):
    """n_prompts: the first k held-out prompts; `rows` holds every sample logged so far."""

    def __init__(
        self,
        every_n_steps: int = 25,
        n_prompts: int = 8,
        samples_per_prompt: int = 1,
        seed: int = 0,
        at_start: bool = True,
        at_end: bool = True,
        file_name: str | None = "samples.jsonl",
    ):
        super().__init__(every_n_steps, at_start, at_end)
        self.n_prompts, self.samples_per_prompt, self.seed = n_prompts, samples_per_prompt, seed
        self.file_name = file_name
        self.rows: list[dict] = []

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        prompts = eval_prompts(trainer, self.n_prompts, type(self).__name__)
        samples = samples_of_this_step(trainer, module.policy, prompts)  # KL/overopt's, if drawn
        if samples is None:
            samples = shared_samples(
                trainer, module, module.policy, prompts, self.samples_per_prompt, self.seed
            )
        gold = samples["gold"]
        new = [
            {
                "step": trainer.global_step,
                "prompt": prompt,
                "response": response,
                "proxy": float(samples["proxy"][i]),
                "gold": None if gold is None else float(gold[i]),
            }
            for i, (prompt, response) in enumerate(zip(samples["prompts"], samples["responses"]))
        ]
        self.rows.extend(new)
        if self.file_name:
            path = Path(trainer.default_root_dir) / self.file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in new)
        log_metrics(trainer, {}, trainer.global_step, self._table)

    def _table(self) -> dict:
        import wandb

        data = [[row[c] for c in COLUMNS] for row in self.rows]
        return {"samples/table": wandb.Table(columns=list(COLUMNS), data=data)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rows": list(self.rows)}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.rows = list(state_dict.get("rows", []))
