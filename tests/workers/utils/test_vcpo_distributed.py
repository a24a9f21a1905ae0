"""Global ESS, minibatch-scope OPOB baselines, metrics and sharded grad-norm sums on 2 gloo ranks
equal the one-process values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from verl.trainer.ppo.core_algos import sequence_log_is_weight, truncated_log_is_weight
from verl.utils import distributed as vd
from verl.workers.utils import vcpo

AGG_MODES = ("mean", "median", "winsorized_mean")
SPLIT = 3  # rank 0 holds trajectories [0, 3), rank 1 [3, 8): uneven on purpose


def _data() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    log_prob = -torch.rand(8, 5, generator=gen) * 3.0
    rollout = -torch.rand(8, 5, generator=gen) * 3.0
    mask = (torch.rand(8, 5, generator=gen) > 0.3).float()
    mask[:, 0] = 1.0
    rollout = rollout * mask
    return {
        "log_prob": log_prob, "rollout": rollout, "mask": mask,
        "advantages": torch.randn(8, generator=gen),
        "log_weights": torch.randn(8, generator=gen) * 2.0 + 300.0,  # exp() would overflow float32
        "sq_norms": torch.rand(8, generator=gen) * 10.0,
    }


def _results(rows: slice, group: dist.ProcessGroup | None) -> dict[str, object]:
    d = {k: v[rows] for k, v in _data().items()}
    log_w = sequence_log_is_weight(d["log_prob"], d["rollout"], d["mask"])
    ess = vcpo.global_ess(log_w, group)
    clipped = vcpo.global_ess(truncated_log_is_weight(log_w, 2.0), group)
    out: dict[str, object] = {"ess": tuple(ess), "ess_clipped": tuple(clipped)}
    for mode in AGG_MODES:
        b = vcpo.opob_baselines(d["advantages"], d["log_weights"], None, mode, group)
        out[mode] = b
    metrics = vcpo.vcpo_metrics(d["log_prob"], d["rollout"], d["mask"], 2.0, ess, clipped, 0.5,
                                sq_grad_norms=d["sq_norms"], baselines=out["mean"], group=group)
    out["metrics"] = metrics
    return out


def _shard_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Per-trajectory gradients of a tensor-parallel-sharded part [B, 40] and a replicated part [B, 6]."""
    gen = torch.Generator().manual_seed(4)
    return torch.randn(5, 40, generator=gen), torch.randn(5, 6, generator=gen)


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    vd.init_process_group("gloo", rank, world_size, master_port=port)
    try:
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        out = _results(rows, group=None)
        whole = torch.tensor([1, 1, 2]) if rank == 0 else torch.tensor([3, 3, 4, 4, 4])
        vcpo.assert_whole_groups(whole)
        split = torch.tensor([1, 1, 2]) if rank == 0 else torch.tensor([2, 3, 3])
        try:
            vcpo.assert_whole_groups(split)
            out["split_detected"] = False
        except ValueError as err:
            out["split_detected"] = "group 2 on ranks [0, 1]" in str(err)
        sharded, replicated = _shard_data()
        half = sharded.shape[1] // 2
        mine = sharded[:, rank * half:(rank + 1) * half]
        out["tp_sq_norms"] = vcpo.combine_shard_sq_grad_norms(mine.pow(2).sum(-1), replicated.pow(2).sum(-1))
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(2, vd.find_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = _results(slice(None), group=None)
    for r, got in enumerate(ranks):
        assert got["split_detected"] is True
        for key in ("ess", "ess_clipped"):
            log_ess, ess, batch, posinf, nan = got[key]
            assert batch == 8 and posinf == 0 and nan == 0
            assert log_ess == pytest.approx(single[key][0], rel=1e-9, abs=1e-12)
            assert math.isfinite(ess) and 1.0 <= ess <= 8.0
        rows = slice(0, SPLIT) if r == 0 else slice(SPLIT, None)
        for mode in AGG_MODES:
            torch.testing.assert_close(got[mode], single[mode][rows])
        for key, value in single["metrics"].items():
            assert got["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        assert any(k.startswith("traj_grad_norm_hist/") for k in got["metrics"])
        # TP shards add, replicated parameters count once.
        sharded, replicated = _shard_data()
        expected = torch.cat([sharded, replicated], 1).pow(2).sum(-1)
        torch.testing.assert_close(got["tp_sq_norms"], expected)
