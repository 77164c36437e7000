"""Accelerator chips: the one table of datasheet figures (dense bf16 peak, HBM and its bandwidth
per chip) and the `jax.Device.device_kind` names each chip reports. Read by MFU
(`cslm_jax.train.metrics`) and by `cslm-jax compile` (`cslm_jax.tpu.aot`, `cslm_jax.tpu.decoding`).
CPUs are not listed: their peak is measured."""

from __future__ import annotations

import dataclasses

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    device_kinds: tuple[str, ...]  # prefixes of jax's Device.device_kind for this chip
    peak_bf16: float  # dense bf16 FLOP/s per chip
    hbm_gib: float | None  # HBM per chip (None: the chip comes in several sizes)
    hbm_bandwidth: float | None = None  # HBM bytes/s per chip (memory-bound decoding steps)

    @property
    def hbm_bytes(self) -> int | None:
        return None if self.hbm_gib is None else int(self.hbm_gib * GIB)


CHIPS = {
    "v4": Chip("TPU v4", ("TPU v4",), 275e12, 32, 1.2e12),
    "v5e": Chip("TPU v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 16, 8.19e11),
    "v5p": Chip("TPU v5p", ("TPU v5p", "TPU v5"), 459e12, 95, 2.765e12),
    "v6e": Chip("TPU v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 32, 1.64e12),
    "h100": Chip("NVIDIA H100", ("NVIDIA H100",), 989e12, None),
    "h200": Chip("NVIDIA H200", ("NVIDIA H200",), 989e12, None),
    "a100": Chip("NVIDIA A100", ("NVIDIA A100",), 312e12, None),
}


def chip_of_device_kind(kind: str) -> Chip | None:
    """The chip whose longest device_kind prefix starts `kind` ("TPU v5 lite" is a v5e, not
    the v5p that "TPU v5" names); None for CPUs and chips not in the table."""
    best, length = None, 0
    for chip in CHIPS.values():
        for prefix in chip.device_kinds:
            if kind.startswith(prefix) and len(prefix) > length:
                best, length = chip, len(prefix)
    return best
