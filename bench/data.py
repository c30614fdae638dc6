"""Data-layer throughput on CPU: records/s written and read, packed tokens/s into device batches.

  python bench/data.py [--records 20000] [--shards 8] [--seq-len 1024] [--batch-size 8]

Prints a table and writes bench/results/data_cpu.json (device, date, versions, command).
Records look like generation records (a ~100-char prompt, a ~600-char response, scores, provenance).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np


def make_records(n: int):
  from persyn_jax.data import records as R

  rng = np.random.default_rng(0)
  words = ("the answer is apples step so we add subtract multiply divide total left first then "
           "finally number each of and to").split()
  out = []
  for i in range(n):
    k = int(rng.integers(40, 200))
    response = " ".join(words[j] for j in rng.integers(0, len(words), k)) + f" {i}."
    out.append(R.make(
        f"p{i:07d}", f"Problem {i}: Tom has {i % 97} apples and gives {i % 13} away. How many?",
        teacher=f"t{i % 4}", sample=0, response=response, finish_reason="stop",
        tokens={"prompt": 30, "response": k}, scores={"quality": 1.0, "learnability": -1.5,
                                                      "reward": 0.4},
        provenance={"run": "bench", "stage": "generate", "config_hash": "0" * 16, "seed": 0}))
  return out


def timed(fn):
  t = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--records", type=int, default=20000)
  ap.add_argument("--shards", type=int, default=8)
  ap.add_argument("--seq-len", type=int, default=1024)
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--sft-records", type=int, default=3000)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "data_cpu.json"))
  args = ap.parse_args(argv)

  import jax

  from persyn_jax.data import batches, chat, shards
  from persyn_jax.sharding import MeshConfig, make_mesh
  from persyn_jax.tokenizer import train_tokenizer

  load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
  recs = make_records(args.records)
  rows = []
  tmp = tempfile.mkdtemp(prefix="persyn_bench_")
  try:
    from persyn_jax.data import records as R
    raw = {f: np.mean([len(R.encode(r, f)) for r in recs[:1000]]) for f in ("json", "msgpack")}
    for fmt in ("json", "msgpack"):
      out = os.path.join(tmp, fmt)
      _, t = timed(lambda: shards.write_records(out, "gen", recs, num_shards=args.shards, host=0,
                                                fmt=fmt))
      size = sum(os.path.getsize(os.path.join(out, f)) for f in shards.list_shards(out, "gen"))
      rows.append((f"write {fmt} ({args.shards} shards, atomic+sha256)", args.records / t, "records/s",
                   f"{size / args.records:.0f} B/record on disk, {raw[fmt]:.0f} B encoded"))
      back, t = timed(lambda: sum(1 for _ in shards.read_records(out, "gen")))
      assert back == args.records
      rows.append((f"read_records {fmt} (sha256 + validate)", args.records / t, "records/s", ""))
      ds = batches.host_records(out, seed=0, epoch=0, host=0, num_hosts=1)
      n, t = timed(lambda: sum(1 for i in range(len(ds)) if ds[i]))
      rows.append((f"grain shuffled read {fmt} (decode + validate)", n / t, "records/s", ""))

    tok = train_tokenizer([r["prompt"] + " " + r["response"] for r in recs[:2000]], vocab_size=2000)
    sft = recs[:args.sft_records]
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1))
    for packing in (True, False):
      def run():
        it = batches.sft_batches(sft, tok, seq_len=args.seq_len, batch_size=args.batch_size,
                                  seed=0, packing=packing)
        for b in batches.device_batches(it, mesh):
          jax.block_until_ready(b)
        return it.stats
      stats, t = timed(run)
      eff = stats["tokens"] / (stats["tokens"] + stats["padding"])
      rows.append((f"tokenize+{'pack' if packing else 'pad'}+device ({args.seq_len}x{args.batch_size})",
                   stats["tokens"] / t, "tokens/s", f"{eff:.0%} of slots used, "
                   f"{stats['batches']} batches"))
    examples = [tuple(np.asarray(x) for x in chat.pair_ids(tok, r["prompt"], r["response"]))
                for r in sft]
    def pack_only():
      n = 0
      for b in batches.pack(examples, args.batch_size, args.seq_len):
        d = batches.to_device(b, mesh)
        jax.block_until_ready(d)
        n += int((b["segment_ids"] > 0).sum())
      return n
    n, t = timed(pack_only)
    rows.append(("pack+device only (pre-tokenized)", n / t, "tokens/s", ""))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)

  width = max(len(r[0]) for r in rows)
  print(f"{'measure':<{width}}  {'rate':>12}  unit        note")
  for name, rate, unit, note in rows:
    print(f"{name:<{width}}  {rate:12,.0f}  {unit:<10}  {note}")

  import importlib.metadata as md
  result = {
      "benchmark": "data", "device": f"CPU ({platform.processor() or platform.machine()}, "
                                     f"{os.cpu_count()} cores, {jax.device_count()} jax devices)",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
      "versions": {p: md.version(p) for p in ("jax", "grain", "array-record", "numpy",
                                              "transformers", "tokenizers", "msgpack")}
                  | {"python": platform.python_version()},
      "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
      "args": vars(args) | {"out": os.path.relpath(args.out)},
      "results": [{"measure": n, "rate": round(r, 1), "unit": u, "note": note}
                  for n, r, u, note in rows],
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print("wrote", args.out)


if __name__ == "__main__":
  main()
