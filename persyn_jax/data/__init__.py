"""The data layer: prompt sources (`sources`), the record schema (`records`), sharded ArrayRecord
files (`shards`), chat formatting (`chat`) and SFT batches (`batches`).

Submodules are imported explicitly (`from persyn_jax.data import shards`) so that reading records
does not pull in jax, grain or datasets.
"""
