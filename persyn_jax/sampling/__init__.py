"""The teacher sampler: prompts in, sampled responses out (and, for large jobs, ArrayRecord shards).

    from persyn_jax import sampling
    cfg = sampling.SamplingConfig(max_new_tokens=512, temperature=0.7, top_p=0.95, batch_size=64)
    results = sampling.generate(model, tokenizer, ["What is 2 + 2?"], cfg)
    results[0].text, results[0].token_ids, results[0].finish_reason

The pieces: `config` (SamplingConfig, GenerationResult), `logits` (the sampling math), `engine`
(jitted prefill and decode loop on the device runtime), `slots` (continuous batching: decode
slots refilled as rows stop), `generate` (host side), `records`
(generate_to_records). This package is the public surface.
"""
from persyn_jax.sampling.config import FINISH_REASONS, GenerationResult, SamplingConfig, summarize
from persyn_jax.sampling.generate import bucket_len, generate, stop_ids
from persyn_jax.sampling.logits import filter_logits, row_keys, sample, step_keys
from persyn_jax.sampling.records import default_record, generate_to_records

__all__ = ["SamplingConfig", "GenerationResult", "FINISH_REASONS", "generate", "summarize",
           "generate_to_records", "default_record", "filter_logits", "sample", "row_keys",
           "step_keys", "bucket_len", "stop_ids"]
