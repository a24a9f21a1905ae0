"""The char tokenizer: exact round trips, the chat template, and save/reload equality."""

import random

import pytest
from transformers import AutoTokenizer

from verl.models.char_tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, build_char_tokenizer

PRINTABLE = [chr(c) for c in range(32, 127)] + ["\n"]
# Arithmetic-heavy alphabet: what Countdown / GSM8K answers are made of.
ARITHMETIC = list("0123456789+-*/()= .,:$\n")


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def _random_strings(alphabet: list[str], count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(count)]


def test_ids_are_six_specials_then_one_per_character(tokenizer):
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id == 0
    assert tokenizer.eos_token == "<|end|>" and tokenizer.unk_token == "<|unk|>"
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(6))
    assert set(tokenizer.all_special_tokens) == set(SPECIAL_TOKENS)
    assert len(tokenizer) == 6 + 96
    # Independent id map: specials, then space..'~' in code-point order, then newline.
    expected = {ch: 6 + i for i, ch in enumerate(PRINTABLE)}
    assert tokenizer.encode("".join(PRINTABLE), add_special_tokens=False) == [expected[c] for c in PRINTABLE]


@pytest.mark.parametrize("alphabet,seed", [(PRINTABLE, 0), (ARITHMETIC, 1)])
def test_decode_of_encode_is_exact(tokenizer, alphabet, seed):
    for text in _random_strings(alphabet, 300, seed):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == len(text)
        assert tokenizer.decode(ids) == text


def test_batch_decode_keeps_spaces_and_newlines(tokenizer):
    texts = ["  a  b ", "12 + 3\n= 15", "", "\n\n"]
    batch = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert tokenizer.batch_decode(batch) == texts


def test_special_tokens_are_single_ids_and_skippable(tokenizer):
    ids = tokenizer.encode("<|user|>1+1<|end|><|assistant|>2<|end|>", add_special_tokens=False)
    assert len(ids) == 8
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|user|>") and ids[4] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "1+12"


def test_unknown_characters_map_to_unk(tokenizer):
    assert tokenizer.encode("a\tb\u00e9", add_special_tokens=False) == [
        tokenizer.convert_tokens_to_ids("a"), tokenizer.unk_token_id,
        tokenizer.convert_tokens_to_ids("b"), tokenizer.unk_token_id]


def test_chat_template_matches_hand_written_string(tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "3,5,7:22="},
                {"role": "assistant", "content": "3*5+7"}]
    assert tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True) == \
        "<|user|>3,5,7:22=<|end|><|assistant|>"
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False) == \
        "<|system|>Be brief.<|end|><|user|>3,5,7:22=<|end|><|assistant|>3*5+7<|end|>"
    with pytest.raises(Exception, match="unknown chat role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_save_and_reload_round_trips(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert reloaded.chat_template == CHAT_TEMPLATE
    assert reloaded.all_special_tokens == tokenizer.all_special_tokens
    assert reloaded.all_special_ids == tokenizer.all_special_ids
    assert (reloaded.pad_token_id, reloaded.eos_token_id, reloaded.unk_token_id) == (0, 1, 5)
    texts = _random_strings(PRINTABLE, 50, 2) + ["<|system|>s<|end|><|user|>q\n<|end|>"]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert reloaded.encode(text, add_special_tokens=False) == ids
        assert reloaded.decode(ids) == text
    messages = [{"role": "user", "content": "12+30=?"}]
    assert reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
