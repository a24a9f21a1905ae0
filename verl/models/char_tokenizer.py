"""A character-level chat tokenizer built in code, so the CPU default needs no downloads.

Data flow: it turns dataset prompts into ids for the rollouter and engines, and the trainer
decodes responses with it for reward scoring. It is a real ``PreTrainedTokenizerFast``, so
``save_pretrained`` / ``AutoTokenizer.from_pretrained`` and chat templates work as for any
HF model.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|end|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SYSTEM_TOKEN = "<|system|>"
UNK_TOKEN = "<|unk|>"

# Order fixes the ids: pad must be 0 (the shared batch layout pads with id 0).
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN, UNK_TOKEN)

# Printable ASCII (space .. '~') plus newline; Python's ``string.printable`` also holds \t\r\x0b\x0c,
# which the tasks never produce and would only dilute the embedding table.
CHARACTERS: tuple[str, ...] = tuple(chr(c) for c in range(32, 127)) + ("\n",)

# Each message renders as <|role|>content<|end|>; the generation prompt is a bare
# <|assistant|>, so a Countdown prompt costs only its characters plus three tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('char tokenizer: unknown chat role ' + message['role']) }}"
    "{%- endif -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """One id per character (printable ASCII + newline) after six special tokens (pad = 0).

    Text is split into single characters by a regex pre-tokenizer and looked up in a
    word-level vocabulary; any other character maps to ``<|unk|>``. The ``Fuse`` decoder
    concatenates tokens without separators, so ``decode(encode(s)) == s`` for every string
    over the character set.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # [\s\S] rather than "." so that newline is isolated too.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[USER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
