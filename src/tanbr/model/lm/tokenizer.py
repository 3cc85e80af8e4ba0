"""A byte-level BPE tokenizer trained on the language model's own training text.

Byte-level BPE (as GPT-2's) never meets an unknown character, decodes back to the exact text
of any language, and keeps a word's leading space inside its token. That last point matters
for scoring: the backend encodes a prompt and its continuation separately (the continuation
starts with the space that ends the prompt's last word), and with this tokenizer the two
encodings concatenated are the encoding of the whole passage.

Encoding with special tokens prepends ``<s>`` (the begin-of-sequence token the backend starts a
scored text with); ``</s>`` ends every training document. There is no pad token: the backend
pads with ``</s>`` and masks the padding.

The model is trained on plain documents, not conversations, so its chat template
(:data:`CHAT_TEMPLATE`) writes a conversation as plain text ("User: ..." lines, the system
message as a first paragraph) and cues the reply with "Assistant:". The served chat API needs a
template; this one asks nothing of the model it was not trained on beyond continuing text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

BOS = "<s>"
EOS = "</s>"
SPECIAL_TOKENS = (BOS, EOS)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] in ('system', 'developer') %}{{ message['content'] }}\n\n"
    "{% else %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2, max_length: int = 512
) -> Any:
    """A ``PreTrainedTokenizerFast`` (byte-level BPE of ``vocab_size`` tokens, specials
    included) trained on ``texts``; ``max_length`` is its ``model_max_length``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(
            f"vocab_size must be >= 300 (256 bytes, specials, merges), got {vocab_size}"
        )
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, core.token_to_id(BOS))]
    )
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
