"""Generation: drawing responses from a causal LM, one concern per module.

settings.py        `GenerationSettings`: what is sampled (lengths, T, allowed ids, prompt cut) and
                   the `RolloutBackend` that draws it
keyed.py           random streams keyed by (seed, rollout, prompt, j): seeds, uniforms, Gumbel noise
processors.py      `AllowedTokensLogitsProcessor` (restrict sampling to enumerable tasks' ids)
checkpoint_config.py  our complete `GenerationConfig`; the checkpoint's blanked for the call
prefill.py         `prefill_once`: a group's shared prompt prefilled once, its cache expanded
backend.py         the `RolloutBackend` protocol: left-padded prompt ids + keys in, responses out
hf.py              `HFGenerateBackend`: transformers' `generate` (the default)
loop.py            `DecodeLoopBackend`: a plain decode loop, the same keyed samples, faster
sampling.py        `sample` (prompts → sequences and masks), `policy_prompts`, `decode_responses`
"""
