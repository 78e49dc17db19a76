"""`eval.py`: evaluate any checkpoint against its reference, every number with a 95 % interval.

- `stats.py`   bootstrap intervals over prompts, win rates, calibration (ECE), degenerate text
- `context.py` what an evaluation reads: data, checkpoints (any `save_pretrained` folder), judges
- `policy.py`  `mode=policy`: policy (and `compare`) vs reference, best-of-n at the policy's KL
- `rm.py`      `mode=rm`: a reward model's accuracy, calibration, agreement with gold
- `report.py`  eval.json / eval.md / samples.jsonl and the logged scalars; `plots.py` the PNGs
- `run.py`     `run_eval(cfg)`, the testable body of `eval.py`
"""
