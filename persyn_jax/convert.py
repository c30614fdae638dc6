"""python -m persyn_jax.convert: an HF directory -> an orbax checkpoint laid out for a mesh.

    python -m persyn_jax.convert HF_DIR OUT_DIR --mesh data=1,fsdp=64,tensor=4 [--dtype bfloat16]

The weights are placed on the target mesh (on a CPU host, as that many fake CPU devices) and
saved with orbax, which writes each distinct shard as its own chunk (chunk shape = the shard's
shape). A pod that restores on the same mesh then reads, on every host, exactly the chunks its
devices hold: no host reads a whole tensor, and the reads are large and contiguous, where a host
slicing HF safetensors (`models.from_pretrained`) reads a strided window of every weight that is
stored transposed. Restoring on another mesh also works (orbax reshards); it only reads more.

OUT_DIR holds config.json, generation_config.json and the tokenizer files of HF_DIR, `params/`
(the orbax checkpoint) and `persyn_orbax.json` (layout, dtype, source). `models.from_orbax(OUT_DIR)`
loads it like `models.from_pretrained` loads an HF directory, and `models.load_model(path)` takes
either. This module is the command line only; the writer is `persyn_jax.models.convert`.
"""
from __future__ import annotations

import argparse
import os
import sys

from persyn_jax.models.convert import convert, mesh_size  # noqa: F401  (the writer; re-exported)


def parse_mesh(text: str):
  """'data=1,fsdp=8,tensor=2' -> MeshConfig (axes left out keep their defaults)."""
  from persyn_jax.sharding import AXES, MeshConfig
  sizes = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, value = part.partition("=")
    if name not in AXES or not value.lstrip("-").isdigit():
      raise ValueError(f"--mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS in {AXES}")
    sizes[name] = int(value)
  return MeshConfig(**sizes)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m persyn_jax.convert", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("hf_dir", help="a local Hugging Face model directory (safetensors)")
  ap.add_argument("out_dir", help="the orbax checkpoint directory to write (replaced whole; "
                                  "neither hf_dir nor a folder above it)")
  ap.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1",
                  help="the mesh the checkpoint is laid out for, e.g. data=1,fsdp=64,tensor=4 "
                       "(the run's `mesh:` config); -1 = the rest of this host's devices")
  ap.add_argument("--dtype", default=None, help="stored dtype (default: config.json's torch_dtype)")
  ap.add_argument("--head", default="auto", choices=("auto", "lm", "classifier"))
  ap.add_argument("--coordinator", default=None, help="multi-process: coordinator host:port")
  ap.add_argument("--num-processes", type=int, default=None)
  ap.add_argument("--process-id", type=int, default=None)
  args = ap.parse_args(argv)
  try:
    mesh_config = parse_mesh(args.mesh)
    n = mesh_size(mesh_config)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  flags = os.environ.get("XLA_FLAGS", "")
  if n and "xla_force_host_platform_device_count" not in flags and (args.num_processes or 1) == 1:
    # on a CPU host, the target mesh as fake devices (ignored by GPU and TPU backends)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  from persyn_jax import distributed as dist
  dist.initialize(args.coordinator, args.num_processes, args.process_id)
  from persyn_jax.models import CheckpointError
  try:
    meta = convert(args.hf_dir, args.out_dir, mesh_config, dtype=args.dtype, head=args.head)
  except (CheckpointError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if dist.is_writer():
    print(f"{args.out_dir}: {meta['parameters'] / 1e6:.1f}M parameters ({meta['dtype']}, "
          f"{meta['bytes'] / 2**30:.2f} GiB) laid out for mesh {meta['mesh']} in {meta['seconds']} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
