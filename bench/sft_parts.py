"""The SFT step in parts, ours against torch's: forward loss, forward + backward, the optimizer
update and the whole step, each timed alone on the same model and batch as `bench/sft.py`.

    python bench/sft_parts.py --preset cpu      # where a CPU step's time goes (docs/PERFORMANCE.md)

Our parts are jitted separately from the session's own loss and optimizer (the step is the
session's compiled step); torch's are the same pieces of bench/sft.py's torch step. Each part's two
sides alternate over the repeats, threads pinned; medians with their spread. Writes
bench/results/sft_parts_<preset>.json.
"""
from __future__ import annotations

import argparse

import common as C  # bench/common.py (this directory is on sys.path when run as a script)
import sft as S  # bench/sft.py: presets, model and batch

PARTS = ("forward", "forward_backward", "optimizer", "step")


def jax_parts(p, batch) -> dict:
  import jax
  import optax

  s, _, mesh = S.jax_session(p)
  with jax.set_mesh(mesh):
    box = {"state": s.init_state()}
    stacked = s.put_batch([batch])
    micro = jax.tree.map(lambda x: x[0], stacked)
    loss = jax.jit(lambda params, frozen, b: s.loss(params, frozen, b)[0])
    grad = jax.jit(jax.grad(lambda params, frozen, b: s.loss(params, frozen, b)[0]))
    grads = grad(box["state"].params, s.frozen, micro)
    update = jax.jit(lambda g, o, params: optax.apply_updates(params, s.tx.update(g, o, params)[0]))

  def step():
    with jax.set_mesh(mesh):
      box["state"], m = s.step(box["state"], s.frozen, stacked)
    return m

  block = jax.block_until_ready
  return {
      "forward": lambda: block(loss(box["state"].params, s.frozen, micro)),
      "forward_backward": lambda: block(grad(box["state"].params, s.frozen, micro)),
      "optimizer": lambda: block(update(grads, box["state"].opt_state, box["state"].params)),
      "step": lambda: block(step()),
  }


def torch_parts(p, batch) -> dict:
  import torch

  t = S.torch_setup(p, batch)  # bench/sft.py's torch side: model, AdamW, loss, step

  def forward():
    with torch.no_grad():
      t["loss"]()

  def forward_backward():
    t["model"].zero_grad(set_to_none=True)
    t["loss"]().backward()

  forward_backward()  # gradients for the optimizer part
  synced = lambda fn: (lambda: (fn(), t["sync"]()))  # noqa: E731
  return {"forward": synced(forward), "forward_backward": synced(forward_backward),
          "optimizer": synced(t["opt"].step), "step": synced(t["step"])}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", choices=sorted(S.PRESETS), default="cpu")
  ap.add_argument("--threads", type=int, default=None, help="intra-op threads of both sides")
  ap.add_argument("--calls", type=int, default=3, help="calls per timed measurement")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  p = dict(S.PRESETS[args.preset])
  threads = C.pin_threads(args.threads)
  load_before = C.check_load("before")
  batch = S.make_batch(p)
  sides = {"jax": jax_parts(p, batch), "torch": torch_parts(p, batch)}

  def measure(fn):
    def run():
      return C.timer(lambda: [fn() for _ in range(args.calls)])() / args.calls
    return run

  results = {}
  for part in PARTS:
    for fns in sides.values():  # warm up (compile) both sides of this part
      fns[part]()
      fns[part]()
    results[part] = C.alternate({n: measure(fns[part]) for n, fns in sides.items()}, args.repeats)
  print(f"\nSFT step in parts, preset {args.preset}, {threads} threads "
        f"(ms per call, median [min-max])")
  print(f"{'part':18s} {'ours':>22s} {'torch':>22s} {'ours / torch time':>18s}")
  for part, r in results.items():
    ratio = r["jax"]["median"] / r["torch"]["median"]
    r["jax_over_torch_time"] = ratio
    print(f"{part:18s} {C.fmt_spread(r['jax'], 1e3):>22s} {C.fmt_spread(r['torch'], 1e3):>22s} "
          f"{ratio:17.2f}x")
  out = args.out or C.results_path(f"sft_parts_{args.preset}.json")
  C.write_json(out, {"benchmark": "sft_parts", "preset": args.preset, "shapes": p,
                     "calls": args.calls, **C.environment(load_before, threads),
                     "parts": results})
  return results


if __name__ == "__main__":
  main()
