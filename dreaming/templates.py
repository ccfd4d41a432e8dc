"""Templates: text around a prompt with one `{prompt}` slot, and the one rule for the ids of its prefix.

A prompt inside a template is measured as `[BOS] + tokens(prefix + prompt + suffix)`; the prefix cannot be
changed by the prompt, so both EPO (dreaming.objective) and the measurement (dreaming.activation) need the ids
of the prefix alone, with the BOS rule of dreaming.special_tokens.with_bos.
"""

from __future__ import annotations

from dreaming.models import LanguageModel
from dreaming.special_tokens import with_bos


def split_template(template: str) -> tuple[str, str]:
    """'A{prompt}B' -> ('A', 'B'); a template must hold exactly one '{prompt}'."""
    if template.count("{prompt}") != 1:
        raise ValueError(f"a template needs exactly one '{{prompt}}' slot, got {template!r}")
    prefix, suffix = template.split("{prompt}")
    return prefix, suffix


BARE = "{prompt}"  # the prompt alone after BOS: how a base model, which has no chat template, is dreamed


def default_template(lm: LanguageModel) -> tuple[str, str]:
    """(template, origin) a dream uses when none is given: the model's chat template for one user turn ("chat"),
    or, for a base model (no chat template, as most published transcoders' models), the bare template ("bare")."""
    return (chat_template(lm), "chat") if has_chat_template(lm) else (BARE, "bare")


def has_chat_template(lm: LanguageModel) -> bool:
    return bool(getattr(lm.tokenizer, "chat_template", None))


def chat_template(lm: LanguageModel) -> str:
    """The model's chat template for one user turn, with a `{prompt}` slot (no generation prompt)."""
    marker = "\x00PROMPT\x00"
    if not has_chat_template(lm):
        raise ValueError(f"{lm.name} has no chat template (a base model): give a template such as "
                         f"'\\n\\nHuman:{{prompt}}', or '{BARE}' for the prompt alone")
    text = lm.tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return text.replace(marker, "{prompt}")


def template_ids(lm: LanguageModel, template: str) -> tuple[str, str, list[int], list[int]]:
    """(prefix, suffix, the prefix's own ids with BOS, the suffix's own ids) of a template with one `{prompt}`."""
    prefix, suffix = split_template(template)

    def ids(text: str) -> list[int]:
        return lm.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    return prefix, suffix, with_bos(ids(prefix), lm.bos_token_id), ids(suffix)
