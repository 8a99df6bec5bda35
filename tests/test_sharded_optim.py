"""leantrain's optimizers on FSDP2 shards (2 gloo processes, raw ``fully_shard``): equal to the
unsharded run on the same global batch, state counted per rank, non-finite values seen by all."""

from __future__ import annotations

import pytest
from distributed import torchrun


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return torchrun("fsdp_optim", tmp_path_factory.mktemp("fsdp"))


def test_every_optimizer_equals_the_unsharded_run_uneven_rows_included(ranks):
    """Factored AdaFactor too: rows 5 and 7 split 3+2 and 4+3, a 3-D weight split 2+1; LayerAdaptation's
    norms are the whole tensors'."""
    for rank in ranks:
        assert len(rank["max_rel_diff"]) == 16
        for name, diff in rank["max_rel_diff"].items():
            assert diff < 1e-5, name


def test_state_bytes_is_the_local_shard(ranks):
    local = [rank["state_bytes"]["adamw_clipped_k4"][2] for rank in ranks]
    assert local == [101, 60]  # parameters per rank: 5·6+5 → 3/2 rows, 7·5+7 → 4/3 rows, 3·7·4 → 2/1
    for rank, n in zip(ranks, local):
        sharded, whole, _ = rank["state_bytes"]["adamw_clipped_k4"]
        assert sharded == 8 * n and whole == 8 * 161
        sharded, whole, _ = rank["state_bytes"]["sgd_k4"]
        assert sharded == 4 * n and whole == 4 * 161
    halves = [rank["state_bytes"]["adafactor_grad_momentum_k4"][0] for rank in ranks]
    assert sum(halves) < 1.1 * ranks[0]["state_bytes"]["adafactor_grad_momentum_k4"][1]  # only C is replicated


def test_a_nan_on_one_rank_is_seen_by_every_rank(ranks):
    """The NaN comes from rank 1's backward and lands, reduce-scattered, in rank 0's rows."""
    assert ranks[0]["local_nonfinite"] == {"a.weight": 1}
    assert ranks[1]["local_nonfinite"] == {}
    assert [r["global_nonfinite"] for r in ranks] == [{"a.weight": 1}] * 2
    assert all(r["finite_state"] for r in ranks)


def test_mixed_precision_policy_keeps_fp32_shards_and_state(ranks):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) with fused factored AdaFactor: the
    sharded parameters and every state tensor stay fp32, and training follows the fp32 run to bf16
    precision."""
    for rank in ranks:
        mp = rank["mixed_precision"]
        assert mp["param_dtypes"] == ["torch.float32"] and mp["state_dtypes"] == ["torch.float32"]
        assert mp["moved"] > 1e-4 and mp["rel_diff_vs_fp32"] < 3e-2
