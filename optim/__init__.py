"""leantrain.optim: memory-lean optimizers with momentum-embedded accumulation.

Depends on torch only, so it drops into a plain PyTorch loop,
``transformers.Trainer`` or Lightning. Call ``step()`` after every micro-batch
backward; ``optimizer.updated`` tells whether that call moved the parameters.
"""

from .adafactor import AdaFactor
from .adamw import AdamW
from .adax import AdaX
from .ema import EMA
from ._interop import export_state_dict
from .fused import FusedBackward, finite_loss, fuse_into_backward
from .layer_adaptation import LayerAdaptation
from .lookahead import Lookahead
from .memory import MemoryReport, memory_report, state_bytes, state_bytes_by_component
from .schedule import PiecewiseLinearLR
from .sgd import SGD
from .zero import ZeroClient
from .zeroth_order import ZerothOrder

__all__ = [
    "SGD",
    "AdamW",
    "AdaFactor",
    "AdaX",
    "Lookahead",
    "LayerAdaptation",
    "EMA",
    "PiecewiseLinearLR",
    "fuse_into_backward",
    "FusedBackward",
    "finite_loss",
    "memory_report",
    "MemoryReport",
    "state_bytes",
    "state_bytes_by_component",
    "export_state_dict",
    "ZeroClient",
    "ZerothOrder",
]
