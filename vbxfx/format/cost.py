"""Multiply counts of a layer on the VectorBlox hardware (``docs/format.md``)."""

from __future__ import annotations

from vbxfx.errors import FormatError

__all__ = ["REPEATS", "BLOCK", "padded_channels", "hardware_macs", "check_repeat"]

#: The repeats the structured format knows: 1 (the "1:4" level), 2 ("2:4") and 4 (dense).
REPEATS = (1, 2, 4)
#: Input channels per block.
BLOCK = 8


def check_repeat(repeat: int, allowed: tuple[int, ...] = REPEATS) -> int:
    """Return ``repeat`` as an int, or raise FormatError naming the accepted values."""
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat not in allowed:
        raise FormatError(f"repeat must be one of {allowed}, got {repeat!r}")
    return int(repeat)


def padded_channels(in_channels: int) -> int:
    """Input channels rounded up to a whole number of 8-channel blocks."""
    return -(-int(in_channels) // BLOCK) * BLOCK


def hardware_macs(out_channels: int, in_channels: int, kernel_positions: int,
                  output_positions: int, repeat: int) -> int:
    """Hardware MACs of one call of a Conv2d (groups=1) or Linear layer.

    ``O * kh*kw * ceil(I/8)*8 * H_out*W_out * (2R/8)``.

    >>> hardware_macs(64, 3, 49, 112 * 112, 4)   # resnet stem: 3 channels cost 8
    314703872
    >>> hardware_macs(64, 3, 49, 112 * 112, 1)
    78675968
    """
    check_repeat(repeat)
    return (int(out_channels) * int(kernel_positions) * padded_channels(in_channels)
            * int(output_positions) * 2 * repeat) // BLOCK
