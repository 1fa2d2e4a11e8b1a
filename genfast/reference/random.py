"""Counter-based random numbers, the stream genfast's kernels draw in place of torch's
generator (the diffusion step's fused noise, attention's dropout): Philox4x32-10
(Salmon et al., 2011), as Triton's tl.philox computes it and csrc/cpu/philox.h."""

from __future__ import annotations

import torch
from torch import Tensor

_LOW32 = 0xFFFFFFFF
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY_STEP = (0x9E3779B9, 0xBB67AE85)


def _mul_hi_lo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32 bits of the 64-bit product a * b, for b holding uint32 values in int64
    (b split in 16-bit halves, so that no product overflows int64)."""
    low_product = a * (b & 0xFFFF)
    middle = a * (b >> 16) + (low_product >> 16)
    return middle >> 16, ((middle & 0xFFFF) << 16) | (low_product & 0xFFFF)


def philox4x32(seed: int, *counter: Tensor) -> list[Tensor]:
    """The four uint32 words (in int64 tensors) of Philox4x32-10 at the counters
    (c0, c1, c2, c3), words missing from `counter` being 0 and the given ones broadcast
    together, under the 64-bit key seed: Triton's tl.philox(seed, c0, c1, c2, c3)."""
    given = torch.broadcast_tensors(*counter)
    c = [word.long() & _LOW32 for word in given] + [torch.zeros_like(given[0], dtype=torch.long)] * (4 - len(given))
    k = [seed & _LOW32, (seed >> 32) & _LOW32]
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND[1], c[2])
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND[0], c[0])
        c = [hi_b ^ c[1] ^ k[0], lo_b, hi_a ^ c[3] ^ k[1], lo_a]
        k = [(k[0] + _PHILOX_KEY_STEP[0]) & _LOW32, (k[1] + _PHILOX_KEY_STEP[1]) & _LOW32]
    return c


def seed_from_torch() -> int:
    """A key for these streams drawn from torch's default CPU generator, so that
    torch.manual_seed fixes it (and no GPU is waited for)."""
    return int(torch.randint(2**62, ()))
