"""Writing fp32 results back into low-precision (bf16) parameters.

bf16 keeps 8 bits of mantissa: an update smaller than 2^-9 of a weight is
lost entirely under round-to-nearest, so small learning rates stall.
Stochastic rounding rounds up with probability equal to the discarded
fraction, which makes the stored weight unbiased in expectation and lets
small updates accumulate (Gupta et al., 2015; Zamirai et al., 2020).

Cost: one random int32 per element at each write-back (transient, the size of
the chunk being written), drawn from torch's generator on the parameter's
device, so a seeded run is reproducible and checkpoints of the RNG resume it.
"""

from __future__ import annotations

import torch


def stochastic_round_to_bf16(source: torch.Tensor, out: torch.Tensor) -> None:
    """Write fp32 ``source`` into bf16 ``out`` with stochastic rounding.

    Adding uniform noise below bit 16 of the fp32 pattern and truncating the
    low 16 bits rounds the magnitude up with probability equal to the dropped
    fraction; sign-magnitude encoding makes this symmetric for negatives.
    """
    bits = source.contiguous().view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    rounded = (bits + noise).bitwise_and_(-65536)  # 0xFFFF0000 as int32
    out.copy_(rounded.view(torch.float32))  # exact: the low 16 bits are zero


def write_back(source: torch.Tensor, out: torch.Tensor, *, stochastic: bool) -> None:
    """Store fp32 ``source`` into ``out`` (its dtype), stochastically rounded if bf16."""
    if stochastic and out.dtype == torch.bfloat16:
        stochastic_round_to_bf16(source, out)
    else:
        out.copy_(source)
