"""Gradient and tensor all-reduce on 2 gloo ranks against sums computed by hand."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from verl.utils import distributed as vd


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    vd.init_process_group("gloo", rank, world_size, master_port=port)
    try:
        module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        # rank r: grad of layer 0 weight = (r + 1), layer 1 bias has no grad on rank 1
        for i, p in enumerate(module.parameters()):
            if rank == 1 and i == 3:
                continue
            p.grad = torch.full_like(p, float(rank + 1) * (i + 1))
        vd.all_reduce_gradients_(module.parameters())
        counts = vd.all_reduce_sum_(torch.tensor([float(rank), 1.0]))
        torch.save(
            {
                "grads": [p.grad.clone() for p in module.parameters()],
                "counts": counts,
                "rank": vd.get_rank(),
                "world": vd.get_world_size(),
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_gradients_and_tensors_on_two_gloo_ranks(tmp_path):
    mp.spawn(_worker, args=(2, vd.find_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert (r0["rank"], r1["rank"], r0["world"], r1["world"]) == (0, 1, 2, 2)
    for i, (g0, g1) in enumerate(zip(r0["grads"], r1["grads"])):
        expected = (1.0 + 2.0) * (i + 1) if i != 3 else 1.0 * (i + 1)  # rank 1 contributed zeros
        assert torch.equal(g0, g1) and torch.all(g0 == expected)
    assert r0["counts"].tolist() == [1.0, 2.0]


def test_single_process_helpers_are_no_ops():
    assert vd.get_world_size() == 1 and vd.get_rank() == 0
    t = torch.tensor([2.0])
    assert vd.all_reduce_sum_(t).item() == 2.0
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    vd.all_reduce_gradients_([p])
    assert p.grad.tolist() == [3.0, 3.0]
