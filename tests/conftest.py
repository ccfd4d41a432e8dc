"""Shared fixtures: a tiny tokenizer, tiny random-weight causal LMs of each supported family (llama, gemma2, gemma3,
qwen3, gpt2), tiny windows."""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
)

from dreaming.models import LanguageModel
from dreaming.windows import Windows

WORDS = "the a cat dog sat on mat ran fast slow red blue big small house tree sun moon def return import class".split()
SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>"]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", pad_token="<pad>")


def tiny_config(family: str, vocab_size: int, n_layers: int = 3, d_model: int = 32):
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if family == "llama":
        return LlamaConfig(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "gemma2":
        return Gemma2Config(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                            sliding_window=64, **common)
    if family == "gemma3":
        return Gemma3TextConfig(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                                sliding_window=64, **common)
    if family == "qwen3":
        return Qwen3Config(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                           **common)
    if family == "gpt2":
        return GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=4, n_positions=256, **common)
    raise ValueError(family)


def make_tiny_lm(tokenizer, family: str = "llama", n_layers: int = 3, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer), n_layers)).eval()
    model.requires_grad_(False)
    return LanguageModel(model=model, tokenizer=tokenizer, name=f"tiny-{family}")


@pytest.fixture(scope="session")
def tiny_lm(tiny_tokenizer):
    return make_tiny_lm(tiny_tokenizer)


@pytest.fixture(scope="module")
def lm64(tiny_tokenizer):
    """The tiny llama in float64, for comparisons against finite differences and direct computations."""
    lm = make_tiny_lm(tiny_tokenizer)
    lm.model.double()
    return lm


def random_windows(n_windows: int, window_length: int, vocab_size: int, seed: int = 0) -> Windows:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(len(SPECIALS), vocab_size, size=(n_windows, window_length)).astype(np.int32)
    tokens[:, 0] = 1  # BOS
    lengths = np.full(n_windows, window_length, dtype=np.int32)
    lengths[::5] = window_length // 2  # some padded windows
    for row, length in zip(tokens, lengths):
        row[length:] = 3
    return Windows(tokens=tokens, lengths=lengths, document=np.arange(n_windows, dtype=np.int32),
                   source=(np.arange(n_windows) % 2).astype(np.int16), sources=["even", "odd"])


def make_tiny_transcoder(lm: LanguageModel, features: int = 24, seed: int = 0):
    """A random JumpReLU CLT over every layer of a tiny model, with the sparsity of a trained one: thresholds
    in [1, 2] on unit-scale pre-activations (feature 0 of layer 0 is dead: its threshold is unreachable)."""
    from dreaming.transcoders import CLT, Transcoder, TranscoderConfig

    generator = torch.Generator().manual_seed(seed)
    config = TranscoderConfig(CLT, lm.n_layers, lm.d_model, features, activation="jumprelu", model_name=lm.name)
    transcoder = Transcoder(config)
    with torch.no_grad():
        for parameter in transcoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / lm.d_model**0.5)
        transcoder.W_enc.mul_(lm.d_model**0.5 / 4)
        transcoder.threshold.copy_(1 + torch.rand(config.n_layers, features, generator=generator))
        transcoder.threshold[0, 0] = 1e9
    return transcoder


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_tokenizer):
    """A real bundle directory (tiny llama, random CLT, windows, maxima); see tests/tiny_bundle.py."""
    from tiny_bundle import build_tiny_bundle

    lm = make_tiny_lm(tiny_tokenizer)
    windows = random_windows(24, 16, len(tiny_tokenizer))
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle"), lm, make_tiny_transcoder(lm), windows)


@pytest.fixture(scope="session")
def tiny_gpt2_bundle(tmp_path_factory, tiny_tokenizer):
    """A second bundle, of another model and shape (tiny GPT-2, 2 layers, 16 features per layer), to serve beside
    `tiny_bundle`."""
    from tiny_bundle import build_tiny_bundle

    lm = make_tiny_lm(tiny_tokenizer, "gpt2", n_layers=2, seed=1)
    windows = random_windows(24, 16, len(tiny_tokenizer), seed=1)
    return build_tiny_bundle(tmp_path_factory.mktemp("gpt2-bundle"), lm, make_tiny_transcoder(lm, 16, seed=1), windows)
