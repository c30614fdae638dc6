"""HF directory -> an orbax checkpoint laid out for a mesh (the writer behind
`python -m persyn_jax.convert`; `models.from_orbax` / `models.load_model` read it back).

The weights are placed on the target mesh (on a CPU host, as that many fake CPU devices) and saved
with orbax, which writes each distinct shard as its own chunk: a pod restoring on the same mesh
reads, on every host, exactly the chunks its devices hold.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time

WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")


def mesh_size(mesh_config) -> int | None:
  """Devices the mesh needs, or None when one axis is -1 (the rest of the devices). A size of 0
  or below -1 is a ConfigError naming it (before it could reach XLA_FLAGS as a device count)."""
  sizes = (mesh_config.data, mesh_config.fsdp, mesh_config.tensor)
  if -1 in sizes:
    return None
  mesh_config.shape(abs(math.prod(sizes)))  # checks every size
  return math.prod(sizes)


def _hf_dtype(hf: dict) -> str:
  d = hf.get("torch_dtype") or hf.get("dtype") or "float32"
  return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(d, d)


def convert(hf_dir: str, out_dir: str, mesh_config=None, *, dtype: str | None = None,
            head: str = "auto", devices=None) -> dict:
  """Writes the orbax checkpoint of `hf_dir` laid out for `mesh_config` into `out_dir` (replaced
  whole, through a temporary directory). Every process of a multi-process job must call it.
  dtype: the stored dtype (default: config.json's torch_dtype, else float32). Returns the
  metadata written to persyn_orbax.json."""
  import jax
  from persyn_jax.checkpoints import save_tree
  from flax import nnx

  from persyn_jax import distributed as dist
  from persyn_jax import sharding as shd
  from persyn_jax.models import FORMAT, MARKER, from_pretrained, load_config

  mesh_config = mesh_config or shd.MeshConfig()
  src, dst = os.path.realpath(hf_dir), os.path.realpath(out_dir)
  if src == dst or src.startswith(dst.rstrip("/") + "/"):  # the output replaces out_dir whole
    raise ValueError(f"{out_dir}: the output directory would replace the model directory "
                     f"{hf_dir}; write it elsewhere")
  _, hf = load_config(hf_dir)
  dtype = dtype or _hf_dtype(hf)
  if devices is None:
    n = mesh_size(mesh_config)
    devices = jax.devices()
    if n is not None:
      if n > len(devices):
        raise ValueError(f"--mesh {mesh_config} needs {n} devices, this host has {len(devices)} "
                         f"({devices[0].platform}); `JAX_PLATFORMS=cpu python -m "
                         "persyn_jax.convert ...` lays it out on that many fake CPU devices")
      if dist.is_multiprocess() and n != len(devices):
        raise ValueError(f"--mesh {mesh_config} has {n} devices; a multi-process convert uses "
                         f"all {len(devices)}")
      devices = devices[:n]
  mesh = shd.make_mesh(mesh_config, devices)
  t0 = time.time()
  model, _ = from_pretrained(hf_dir, dtype=dtype, mesh=mesh, head=head, tokenizer=False)
  out_dir = os.path.abspath(out_dir)
  tmp = out_dir.rstrip("/") + ".tmp"
  if dist.is_writer():
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in sorted(os.listdir(hf_dir)):  # config, generation config, tokenizer, chat template
      src = os.path.join(hf_dir, name)
      if os.path.isfile(src) and not name.endswith(WEIGHT_FILES) and not name.endswith(".index.json"):
        shutil.copy2(src, os.path.join(tmp, name))
    if model.config.tie_embeddings is False and hf.get("tie_word_embeddings") is not False:
      # an lm_head the weights hold apart from the embedding of a tied config (loaded untied,
      # models.loading): the copy says so, or from_orbax would build a model without that head
      with open(os.path.join(tmp, "config.json")) as f:
        copied = json.load(f)
      with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({**copied, "tie_word_embeddings": False}, f, indent=2)
  dist.barrier("convert:tmp")
  state = nnx.state(model)
  save_tree(os.path.join(tmp, "params"), nnx.to_pure_dict(state))  # collective
  leaves = jax.tree.leaves(state)
  meta = {"format": FORMAT, "source": os.path.abspath(hf_dir), "dtype": str(dtype),
          "head": type(model).__name__, "model_type": model.config.model_type,
          "mesh": dict(zip(shd.AXES, mesh.devices.shape)),
          "parameters": int(sum(x.size for x in leaves)),
          "bytes": int(sum(x.size * x.dtype.itemsize for x in leaves)),
          "seconds": round(time.time() - t0, 2)}
  if dist.is_writer():
    with open(os.path.join(tmp, MARKER), "w") as f:
      json.dump(meta, f, indent=2)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
  dist.barrier("convert:done")
  return meta


