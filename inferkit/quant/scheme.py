"""Weight quantization formats: bits, grouping and symmetry, and their storage cost."""

from __future__ import annotations

import re
from dataclasses import dataclass

from inferkit.errors import InferkitError

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUPS = (32, 64, 128)


@dataclass(frozen=True, slots=True)
class QuantFormat:
    """One integer weight format; ``group_size=None`` means one scale per output channel."""

    bits: int
    group_size: int | None = None
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise InferkitError(f"unsupported bit width {self.bits}; choose one of {SUPPORTED_BITS}")
        if self.group_size is not None and self.group_size not in SUPPORTED_GROUPS:
            raise InferkitError(
                f"unsupported group size {self.group_size}; choose one of {SUPPORTED_GROUPS} "
                "or none for per-channel"
            )

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def name(self) -> str:
        grouping = f"g{self.group_size}" if self.group_size else "ch"
        return f"int{self.bits}-{grouping}-{'sym' if self.symmetric else 'asym'}"

    def num_groups(self, in_features: int) -> int:
        return in_features // self.group_size if self.group_size else 1

    def check_divides(self, layer: str, in_features: int) -> None:
        """Raise a clear error when the group size does not tile the layer's input dimension."""
        if self.group_size and in_features % self.group_size:
            options = [g for g in SUPPORTED_GROUPS if in_features % g == 0]
            hint = f"group sizes that divide it: {options}" if options else "use per-channel (no group size)"
            raise InferkitError(
                f"group size {self.group_size} does not divide {layer}'s input dimension "
                f"{in_features}; {hint}, or add the layer to the ignore list"
            )

    def storage_bits(self, out_features: int, in_features: int, scale_bits: int = 32) -> int:
        """Bits stored for one weight matrix: packed values, scales and packed zero points."""
        groups = self.num_groups(in_features)
        total = out_features * in_features * self.bits + out_features * groups * scale_bits
        if not self.symmetric:
            total += out_features * groups * self.bits
        return total


_FORMAT_RE = re.compile(r"^(?:w|int)?(\d+)(?:[-_]?(?:g(\d+)|ch))?(?:[-_](sym|asym))?$")


def parse_format(text: str) -> QuantFormat:
    """Parse names such as ``int4-g64-sym``, ``int8-ch-sym``, ``w4-g32-asym``."""
    match = _FORMAT_RE.match(text.strip().lower())
    if not match:
        raise InferkitError(f"cannot read format {text!r}; write it like int4-g64-sym or int8-ch-sym")
    bits, group, sym = match.groups()
    return QuantFormat(int(bits), int(group) if group else None, sym != "asym")
