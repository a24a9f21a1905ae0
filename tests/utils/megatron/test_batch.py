import pytest
import torch
from transformers import Qwen2ForCausalLM

from verl.models import tiny_qwen2_config
from verl.utils.megatron.batch import (
    aligned_to_responses,
    context_parallel_multiple,
    left_align,
    merge_context_parallel_chunks,
    next_token_labels,
    pad_sequence_for_parallel,
    responses_to_aligned,
    split_for_context_parallel,
)
from verl.utils.megatron.cpu_compat import load_balanced_positions
from verl.utils.torch_functional import logprobs_from_logits

torch.set_num_threads(1)
PAD = 0


def _shared_layout_batch():
    """Three rows in the shared layout: prompts left-padded to P=4, responses right-padded to R=3."""
    prompts = torch.tensor([[0, 0, 11, 12], [21, 22, 23, 24], [0, 0, 0, 31]])
    responses = torch.tensor([[13, 14, 0], [25, 0, 0], [32, 33, 34]])
    input_ids = torch.cat([prompts, responses], dim=1)
    attention_mask = (input_ids != PAD).long()
    response_mask = (responses != PAD).float()
    return prompts, responses, input_ids, attention_mask, response_mask


def test_left_align_puts_real_tokens_first_and_indexes_the_predicting_logit():
    _, _, input_ids, attention_mask, _ = _shared_layout_batch()
    ids, pos, valid, index = left_align(input_ids, attention_mask, response_length=3)
    assert ids.tolist() == [[11, 12, 13, 14, 0, 0, 0], [21, 22, 23, 24, 25, 0, 0], [31, 32, 33, 34, 0, 0, 0]]
    assert pos.tolist() == [[0, 1, 2, 3, 0, 0, 0], [0, 1, 2, 3, 4, 0, 0], [0, 1, 2, 3, 0, 0, 0]]
    assert valid.long().tolist() == [[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0]]
    # Prompt lengths 2, 4, 1: response token t is predicted at position p - 1 + t.
    assert index.tolist() == [[1, 2, 3], [3, 4, 5], [0, 1, 2]]
    labels = next_token_labels(ids)
    assert aligned_to_responses(labels, index).tolist() == [[13, 14, 0], [25, 0, 0], [32, 33, 34]]


def test_left_align_refuses_a_row_without_prompt_tokens():
    input_ids = torch.tensor([[0, 0, 5, 6]])
    with pytest.raises(ValueError, match="prompt token"):
        left_align(input_ids, (input_ids != PAD).long(), response_length=2)


def test_aligned_causal_forward_gives_the_padded_forward_log_probs():
    """HF on the padded layout (mask + position ids) and HF on the left-aligned layout without mask agree."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_qwen2_config(112, num_hidden_layers=2)).float().eval()
    prompts, responses, input_ids, attention_mask, response_mask = _shared_layout_batch()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    prompt_len, response_len = prompts.shape[1], responses.shape[1]
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        padded = logprobs_from_logits(logits[:, prompt_len - 1 : -1], responses)
        ids, _, _, index = left_align(input_ids, attention_mask, response_len)
        aligned_logits = model(input_ids=ids).logits
        aligned = aligned_to_responses(logprobs_from_logits(aligned_logits, next_token_labels(ids)), index)
    diff = ((padded - aligned) * response_mask).abs().max().item()
    assert diff <= 1e-5, diff


def test_responses_to_aligned_inverts_aligned_to_responses():
    _, _, input_ids, attention_mask, response_mask = _shared_layout_batch()
    _, _, _, index = left_align(input_ids, attention_mask, response_length=3)
    values = torch.arange(1, 10, dtype=torch.float32).reshape(3, 3) * response_mask
    spread = responses_to_aligned(values, index, input_ids.shape[1])
    assert torch.equal(aligned_to_responses(spread, index), values)
    assert spread.sum().item() == values.sum().item()


def test_pad_sequence_for_parallel_reaches_the_multiple_and_keeps_the_data():
    x = torch.arange(14).reshape(2, 7)
    padded = pad_sequence_for_parallel(x, 4, seq_dim=1, value=-1)
    assert padded.shape == (2, 8)
    assert torch.equal(padded[:, :7], x) and (padded[:, 7] == -1).all()
    assert pad_sequence_for_parallel(x, 7) is x
    assert context_parallel_multiple(2, True, 1) == 2
    assert context_parallel_multiple(2, False, 2) == 4
    assert context_parallel_multiple(4, True, 3) == 12


@pytest.mark.parametrize("cp_size", [1, 2, 3])
def test_context_parallel_split_holds_chunks_r_and_2cp_minus_1_minus_r(cp_size):
    seq = 12
    x = torch.arange(2 * seq).reshape(2, seq)
    parts = [split_for_context_parallel(x, cp_size, r, seq_dim=1) for r in range(cp_size)]
    for r, part in enumerate(parts):
        assert part.shape == (2, seq // cp_size)
        # Row 0 of x holds the positions themselves.
        assert torch.equal(part[0], load_balanced_positions(seq // cp_size, cp_size, r, torch.device("cpu")))
    assert torch.equal(merge_context_parallel_chunks(parts, seq_dim=1), x)


def test_context_parallel_split_refuses_a_length_not_divisible_by_2cp():
    with pytest.raises(ValueError, match="2\\*cp"):
        split_for_context_parallel(torch.zeros(1, 6), 2, 0)
