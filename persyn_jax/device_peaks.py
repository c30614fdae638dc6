"""Spec-sheet peaks of accelerators, by JAX device kind: dense (not 2:4 sparse) bf16 matmul FLOP/s
and HBM bytes/s, per device. The one table behind SFT's MFU logging and the benchmarks' MFU and
decode roofline.

A device kind matches an entry when it equals the entry's name or continues it after a space or a
dash ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"); the first match wins, so the variants
(PCIe, NVL, lite) come before their family. A kind that matches nothing has no peak (None): a
newer or rarer chip is never given another's figure ("NVIDIA A10G" is not an A10).
"""
from __future__ import annotations

# (device kind, dense bf16 FLOP/s, HBM bytes/s), from NVIDIA's and Google Cloud's spec sheets.
PEAKS = [
    ("NVIDIA H100 PCIe", 756e12, 2.0e12),
    ("NVIDIA H100 NVL", 835e12, 3.9e12),
    ("NVIDIA H100", 989e12, 3.35e12),      # SXM: "NVIDIA H100 80GB HBM3"
    ("NVIDIA H200 NVL", 835e12, 4.8e12),
    ("NVIDIA H200", 989e12, 4.8e12),       # SXM
    ("NVIDIA H800 PCIe", 756e12, 2.0e12),
    ("NVIDIA H800", 989e12, 3.35e12),      # SXM
    ("NVIDIA A100-SXM4-80GB", 312e12, 2.039e12),
    ("NVIDIA A100 80GB PCIe", 312e12, 1.935e12),
    ("NVIDIA A100", 312e12, 1.555e12),     # the 40GB parts, SXM4 and PCIe
    ("NVIDIA L4", 121e12, 0.3e12),
    ("NVIDIA A10", 125e12, 0.6e12),
    ("TPU v4 lite", None, None),           # v4i: no figure here, rather than v4's
    ("TPU v4", 275e12, 1.2e12),
    ("TPU v5 lite", 197e12, 0.819e12),     # v5e
    ("TPU v5e", 197e12, 0.819e12),
    ("TPU v5p", 459e12, 2.765e12),
    ("TPU v5", 459e12, 2.765e12),          # v5p
    ("TPU v6 lite", 918e12, 1.64e12),      # v6e (Trillium)
    ("TPU v6e", 918e12, 1.64e12),
]


def _matches(kind: str, name: str) -> bool:
  return kind == name or kind.startswith((name + " ", name + "-"))


def device_peaks(kind: str) -> tuple[float, float] | tuple[None, None]:
  """(dense bf16 FLOP/s, HBM bytes/s) of one device of this JAX device kind; (None, None) when
  the kind is not in the table."""
  return next(((flops, hbm) for name, flops, hbm in PEAKS if _matches(kind, name)), (None, None))


def peak_bf16_flops(kind: str) -> float | None:
  """Dense bf16 FLOP/s of one device of this kind, or None when unknown."""
  return device_peaks(kind)[0]
