"""The teacher sampler, in pieces: `config` (SamplingConfig, GenerationResult), `logits` (the
sampling math), `engine` (jitted prefill and decode loop), `generate` (host side), `records`
(generate_to_records). Import the public API from `persyn_jax.sampler`."""
