"""The device runtime under the sampler, the scorers and the router: `runner` (one jitted runner
per model: split/merge, a compile cache, batch placement, the mesh of a model), `buckets` (length
buckets and batch plans) and `logprob` (the chunked fp32 log-probability)."""
