"""The one rule for special tokens: which id opens a text (BOS) and which fills padding, and how BOS is added.

Every text the product measures is BOS + its tokens, with position 0 never measured. A tokenizer without a BOS
token (GPT-2's has only <|endoftext|>) opens texts with its EOS token; one without a pad token pads with EOS.
"""

from __future__ import annotations


def bos_token_id(tokenizer) -> int:
    """The token every text and window starts with: the tokenizer's BOS, else its EOS."""
    found = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if found is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token: no text can be opened")
    return found


def pad_token_id(tokenizer) -> int:
    """The id that fills padding (never read: padding sits after the last measured token): pad, else EOS, else BOS."""
    for found in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if found is not None:
            return found
    raise ValueError("the tokenizer has no pad, EOS or BOS token to pad with")


def with_bos(ids: list[int], bos_id: int) -> list[int]:
    """BOS + the text's ids, the BOS added only when it is not there already (SmolLM2's chat documents start
    with <|im_start|>, which is its BOS)."""
    return list(ids) if ids and ids[0] == bos_id else [bos_id, *ids]
