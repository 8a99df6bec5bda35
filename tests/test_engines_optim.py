"""leantrain's optimizers on real engines, raw (no trainer), 2 gloo processes each:
DDP with replicated state averaged once per update, and DeepSpeed ZeRO 1/2/3 through ZeroClient."""

from __future__ import annotations

import pytest
from distributed import torchrun


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return torchrun("engines_optim", tmp_path_factory.mktemp("ddp"), "ddp")


@pytest.fixture(scope="module")
def zero(tmp_path_factory):
    return torchrun("engines_optim", tmp_path_factory.mktemp("zero"), "deepspeed")


def test_ddp_ranks_times_k_equal_one_process_running_all_micro_batches(ddp):
    """2 ranks × k=4, a branch used by rank 0 only, a mid-cycle sync_state(): = 1 process × k=8."""
    for rank in ddp:
        assert len(rank) == 12
        for name, case in rank.items():
            limit = 2e-2 if "bf16" in name else 1e-6  # bf16 momentum rounds in another order
            assert case["diff"] < limit, name


def test_ddp_communicates_the_accumulated_buffers_once_per_update(ddp):
    """Bytes all-reduced per parameter per update: m and v for AdamW/AdaX, b for SGD, m (+R, C) for
    AdaFactorW, the mean-gradient buffer for AdaFactor without momentum (plus one flag per tensor);
    DDP all-reducing gradients at every micro-step would send 4·k = 16."""
    # AdaFactorW: m plus R and C, which on this tiny model's 5×6 and 7×5 matrices and its biases
    # (unfactored v) add about 2 B/param; on a transformer's large matrices they add almost nothing.
    expected = {"adamw": (8, 9), "adamw_bf16_momentum": (8, 9), "sgd_wd": (4, 5), "adafactor_no_momentum": (4, 5),
                "adax": (8, 9), "adafactor_grad_momentum": (4, 6.5)}
    for name, case in ddp[0].items():
        low, high = expected[name.rsplit("-", 1)[0]]
        assert low <= case["bytes_per_param_update"] < high, name


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_equals_one_process_on_the_global_batch(zero, stage):
    """Two parameter groups: the micro-step advances once per micro-batch at every stage (12 for 12)."""
    for rank in zero:
        for name in ("adamw", "sgd"):
            case = rank[f"zero{stage}-{name}"]
            assert case["micro_step"] == 12
            assert case["diff"] < 1e-6 and case["moved"] > 1e-3, name


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_adafactor_under_zero_says_it_cannot_factor(zero, stage):
    """Unfactored on a partition, so not the factored reference, but close to it and finite: ZeRO-3's
    uninitialised padding, if left in the partition, made AdaFactor's partition RMS inf in 1 run of 3."""
    for rank in zero:
        case = rank[f"zero{stage}-adafactor"]
        assert case["micro_step"] == 12 and case["moved"] > 1e-3
        assert case["diff"] < 0.05  # measured 0.014; NaN and inf fail this too
        assert len(case["warnings"]) == 1
        assert "cannot be factored" in case["warnings"][0] and "FSDP2" in case["warnings"][0]


def test_zero_state_is_the_local_partition(zero):
    """119 parameters padded and split over 2 ranks: AdamW holds 8 bytes per partition element."""
    for rank in zero:
        assert rank["zero2-adamw"]["state_bytes"] == 8 * 60
        assert rank["zero2-sgd"]["state_bytes"] == 4 * 60
