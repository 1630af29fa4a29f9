"""Model FLOPs and MFU: the one place the trainer's progress line and tools/bench_train.py take
them from.

MFU (model FLOPs utilisation, PaLM's definition) = the model's training FLOPs per second per
device (:func:`megatron_mile.model.flops_per_token` x tokens/s / devices: 6 x matmul
parameters + attention, no recomputation counted) / the device's peak dense FLOP/s.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

# Peak dense (no sparsity) BF16 tensor-core TFLOP/s per device, from NVIDIA's data sheets.
# Matched against torch.cuda.get_device_name() in order: the first entry whose every word
# is in the name wins, so the more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("GB200",), 2500.0),
    (("B200",), 2250.0),
    (("H100", "PCIe"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H200",), 989.4),   # SXM and NVL share the tensor-core peak within 2%
    (("H100",), 989.4),   # SXM (HBM3)
    (("H800",), 989.4),
    (("H20",), 148.0),
    (("A100",), 312.0),
    (("A800",), 312.0),
    (("L40S",), 362.0),
    (("L40",), 181.0),
    (("L4",), 121.0),
)


class DevicePeak(NamedTuple):
    """A device's name and its peak dense TFLOP/s (None where unknown)."""

    name: str
    tflops: Optional[float]

    def describe(self) -> str:
        """One line for the log: the peak MFU is measured against, or why there is none."""
        if self.tflops is None:
            return f"MFU n/a (no peak known for {self.name}; set logging.peak_tflops)"
        return f"MFU against {self.name}'s peak of {self.tflops:g} dense BF16 TFLOP/s"


def peak_tflops(device_name: str) -> Optional[float]:
    """The peak dense BF16 TFLOP/s of a GPU named so (torch.cuda.get_device_name), or None."""
    for words, tflops in PEAK_BF16_TFLOPS:
        if all(word in device_name for word in words):
            return tflops
    return None


def device_peak(device, override: Optional[float] = None) -> DevicePeak:
    """``device``'s (a torch.device) name and peak; ``override`` (logging.peak_tflops) wins.
    A CPU has no peak here: its MFU is not reported."""
    import torch

    if device.type != "cuda":
        return DevicePeak("cpu", override)
    name = torch.cuda.get_device_name(device)
    return DevicePeak(name, override if override is not None else peak_tflops(name))


def model_tflops_per_device(flops_per_token: float, tokens_per_s: float,
                            devices: int) -> float:
    """Model TFLOP/s each device delivers when ``devices`` process ``tokens_per_s`` together."""
    return flops_per_token * tokens_per_s / devices / 1e12


def mfu(tflops_per_device: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1] (None without a peak)."""
    return None if peak is None else tflops_per_device / peak
