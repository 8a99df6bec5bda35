"""Writing fp32 results back into low-precision (bf16) parameters.

bf16 keeps 8 bits of mantissa: an update smaller than 2^-9 of a weight is
lost entirely under round-to-nearest, so small learning rates stall.
Stochastic rounding rounds up with probability equal to the discarded
fraction, which makes the stored weight unbiased in expectation and lets
small updates accumulate (Gupta et al., 2015; Zamirai et al., 2020).

Cost: one random int32 per element at each write-back (transient, the size of
the tensor being written). The noise comes from a generator seeded by the
caller with a pure function of (rounding seed, update count, parameter
position): a resumed run draws the same noise without any generator state in
its checkpoint, and DDP ranks holding the same replicated tensor round it
identically.
"""

from __future__ import annotations

import torch


def stochastic_round_to_bf16(source: torch.Tensor, out: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Write fp32 ``source`` into bf16 ``out`` with stochastic rounding.

    Adding uniform noise below bit 16 of the fp32 pattern and truncating the
    low 16 bits rounds the magnitude up with probability equal to the dropped
    fraction; sign-magnitude encoding makes this symmetric for negatives.
    """
    bits = source.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    rounded = (bits + noise).bitwise_and_(-65536)  # 0xFFFF0000 as int32
    out.copy_(rounded.view(torch.float32))  # exact: the low 16 bits are zero


def write_back(source: torch.Tensor, out: torch.Tensor, *, stochastic: bool, seed: int | None = None) -> None:
    """Store fp32 ``source`` into ``out`` (its dtype), stochastically rounded if bf16.

    ``seed`` fixes the rounding noise (None: torch's default generator).
    """
    if stochastic and out.dtype == torch.bfloat16:
        generator = None
        if seed is not None:
            generator = torch.Generator(device=out.device)
            generator.manual_seed(seed)
        stochastic_round_to_bf16(source, out, generator)
    else:
        out.copy_(source)
