"""persyn_jax/device_peaks.py: the dense bf16 FLOP/s and HBM bytes/s behind SFT's MFU and the
benchmarks' MFU and roofline, by JAX device kind (the CUDA device name on GPUs), from the spec
sheets: a variant (PCIe, NVL) never gets its family's SXM figure, and an unknown kind gets none."""
import pytest

from persyn_jax.device_peaks import device_peaks
from persyn_jax.sft import SFTConfig
from persyn_jax.sft.log import peak_flops


@pytest.mark.parametrize("kind, flops, hbm", [
    ("NVIDIA H100 80GB HBM3", 989e12, 3.35e12),   # SXM
    ("NVIDIA H100 PCIe", 756e12, 2.0e12),
    ("NVIDIA H100 NVL", 835e12, 3.9e12),
    ("NVIDIA H200", 989e12, 4.8e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 2.039e12),
    ("NVIDIA A100-SXM4-40GB", 312e12, 1.555e12),
    ("NVIDIA A10", 125e12, 0.6e12),
    ("TPU v4", 275e12, 1.2e12),
    ("TPU v5 lite", 197e12, 0.819e12),
    ("TPU v5", 459e12, 2.765e12),
    ("TPU v6 lite", 918e12, 1.64e12),
])
def test_spec_sheet_peaks(kind, flops, hbm):
  assert device_peaks(kind) == (flops, hbm)


@pytest.mark.parametrize("kind", ["NVIDIA A10G", "NVIDIA GB200", "NVIDIA GH200 480GB",
                                  "NVIDIA B200", "TPU v3", "TPU v4 lite", "TPU7x", "cpu"])
def test_an_unknown_kind_has_no_peak(kind):
  assert device_peaks(kind) == (None, None)


def test_sft_mfu_peak_of_a_pcie_h100_is_its_own():
  config = SFTConfig(compute_dtype="bfloat16")
  assert peak_flops(config, "NVIDIA H100 PCIe") == 756e12
  assert peak_flops(config, "NVIDIA H100 80GB HBM3") == 989e12
  assert peak_flops(config, "NVIDIA A10G") is None
  assert peak_flops(SFTConfig(compute_dtype="bfloat16", peak_tflops=100.0), "NVIDIA A10G") == 1e14
  assert peak_flops(SFTConfig(compute_dtype="float32"), "NVIDIA H100 PCIe") is None
