import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from verl.utils.megatron.cpu_compat import CpuRNGStatesTracker, CudaToCpuMode, SequenceParallelRMSNorm

torch.set_num_threads(1)


class _Config:
    params_dtype = torch.float32
    sequence_parallel = True


def test_device_mode_routes_cuda_requests_to_cpu_and_reports_cuda_types():
    with CudaToCpuMode():
        x = torch.zeros(3, device="cuda", pin_memory=True)
        y = torch.ones(2, device=0)
        assert x.device.type == "cpu" and y.device.type == "cpu"
        assert x.cuda() is x and x.pin_memory() is x
        assert x.to("cuda").device.type == "cpu"
        assert x.type() == "torch.cuda.FloatTensor"
        assert x.half().type() == "torch.cuda.HalfTensor"
        assert x.type(torch.float64).dtype == torch.float64
    # Outside the mode nothing is rerouted.
    assert torch.zeros(1).type() == "torch.FloatTensor"


def test_rng_tracker_fork_is_reproducible_and_leaves_the_default_stream_alone():
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    expected_outer = torch.rand(4)
    torch.manual_seed(0)
    with tracker.fork():
        first = torch.rand(4)
    with tracker.fork():
        second = torch.rand(4)
    assert torch.equal(torch.rand(4), expected_outer)
    assert torch.equal(first, torch.rand(4, generator=torch.Generator().manual_seed(123)))
    assert not torch.equal(first, second)  # the stream advances across forks
    replay = CpuRNGStatesTracker()
    replay.set_states(tracker.get_states())
    with tracker.fork():
        third = torch.rand(4)
    with replay.fork():
        assert torch.equal(torch.rand(4), third)


def test_rms_norm_is_bitwise_hf_and_marks_its_weight_sequence_parallel():
    torch.manual_seed(0)
    ours, hf = SequenceParallelRMSNorm(_Config(), 16, eps=1e-6), Qwen2RMSNorm(16, eps=1e-6)
    weight = torch.randn(16)
    with torch.no_grad():
        ours.weight.copy_(weight)
        hf.weight.copy_(weight)
    x = torch.randn(3, 5, 16)
    assert torch.equal(ours(x), hf(x))
    assert ours.weight.sequence_parallel is True
