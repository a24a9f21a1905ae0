"""Float32 log-prob/entropy helpers and masked reductions against float64 references."""

import math

import pytest
import torch

from verl.utils import torch_functional as tf

torch.set_num_threads(1)


def test_logprobs_from_logits_matches_float64_log_softmax_across_chunks():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 700, 50, generator=g, dtype=torch.float64) * 4  # 2100 rows: three row chunks
    labels = torch.randint(0, 50, (3, 700), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    out = tf.logprobs_from_logits(logits.float(), labels)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)


def test_logprobs_from_bf16_logits_are_float32_of_the_bf16_values():
    logits = torch.randn(4, 9, 33).bfloat16()
    labels = torch.randint(0, 33, (4, 9))
    expected = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None]).squeeze(-1)
    out = tf.logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)


def test_entropy_matches_definition_and_survives_underflow():
    logits = torch.randn(5, 40, dtype=torch.float64) * 3
    p = torch.softmax(logits, -1)
    expected = -(p * p.log()).sum(-1)
    torch.testing.assert_close(tf.entropy_from_logits(logits.float()).double(), expected, rtol=0, atol=2e-6)
    # exp(-1e4) underflows to 0: p log p is 0 * -inf = nan in the naive form, here the entropy is 0
    peaked = torch.tensor([[0.0, -1e4, -1e4]])
    assert tf.entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros(2, 8)
    torch.testing.assert_close(tf.entropy_from_logits(uniform), torch.full((2,), math.log(8.0)))


def test_masked_reductions_skip_nonfinite_padding():
    values = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert tf.masked_sum(values, mask).item() == 11.0
    assert tf.masked_mean(values, mask).item() == pytest.approx(11.0 / 4)
    torch.testing.assert_close(tf.masked_mean(values, mask, dim=-1), torch.tensor([1.5, 4.0]))
    assert tf.masked_mean(values, torch.zeros_like(mask)).item() == 0.0
