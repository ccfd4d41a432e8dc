"""Corpus: reading documents, token windows, the default corpus's non-model part, chat transcripts (tiny model)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dreaming.corpus import (
    DEFAULT_CHAT_REQUESTS,
    Document,
    build_default_corpus,
    default_documents,
    generate_chat_transcripts,
    read_documents,
    tokenize_windows,
    write_documents,
)

SENTENCES = [
    "the cat sat on the mat and the dog ate the bone",
    "how do I make pancakes with flour eggs and milk",
    "why is the sky blue during the day and red at night",
    "def add ( a , b ) : return a + b",
]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    fast.chat_template = TEMPLATE
    return fast


# ----------------------------------------------------------------------------- reading


def test_read_text_file_and_directory(tmp_path):
    (tmp_path / "b.md").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.py").write_text("x = 1\n")
    (tmp_path / "skip.csv").write_text("not read")
    assert list(read_documents(str(tmp_path / "a.txt"))) == [Document("first", "a")]
    docs = list(read_documents(str(tmp_path), source="mine"))
    assert [d.text for d in docs] == ["first", "second", "x = 1\n"]
    assert {d.source for d in docs} == {"mine"}


def test_read_jsonl_parquet_and_limit(tmp_path):
    rows = [{"text": f"doc {i}", "source": "web" if i % 2 else None} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = list(read_documents(str(tmp_path / "d.jsonl")))
    assert [d.text for d in docs] == [f"doc {i}" for i in range(5)]
    assert [d.source for d in docs] == ["d", "web", "d", "web", "d"]
    assert [d.source for d in read_documents(str(tmp_path / "d.jsonl"), source="x")] == ["x"] * 5
    assert len(list(read_documents(str(tmp_path / "d.jsonl"), limit=2))) == 2

    pq.write_table(pa.table({"body": [f"row {i}" for i in range(7)]}), tmp_path / "d.parquet")
    docs = list(read_documents(str(tmp_path / "d.parquet"), text_field="body"))
    assert [d.text for d in docs] == [f"row {i}" for i in range(7)] and docs[0].source == "d"


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        list(read_documents(str(tmp_path / "missing.jsonl")))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown corpus format"):
        list(read_documents(str(tmp_path / "d.csv")))
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="no field 'text'.*body"):
        list(read_documents(str(tmp_path / "d.jsonl")))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match="no column 'text'"):
        list(read_documents(str(tmp_path / "d.parquet")))


def test_read_hf_dataset_from_local_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "dataset"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"content": f"hf {i}"}) + "\n" for i in range(4)))
    docs = list(read_documents(f"hf:{data}", text_field="content"))
    assert [d.text for d in docs] == [f"hf {i}" for i in range(4)]
    assert docs[0].source == str(data)
    with pytest.raises(ValueError, match="no field 'text'"):
        list(read_documents(f"hf:{data}"))


def test_write_documents_round_trip(tmp_path):
    docs = [Document("a\nb", "x"), Document("ü", "y")]
    write_documents(iter(docs), tmp_path / "out" / "c.jsonl")
    assert list(read_documents(str(tmp_path / "out" / "c.jsonl"))) == docs
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["c.jsonl"]


# ----------------------------------------------------------------------------- windows


def test_tokenize_windows(tokenizer):
    long = " ".join(SENTENCES * 3)  # 3 * 43 = 129 words
    docs = [Document(long, "a"), Document("the cat", "b"), Document(SENTENCES[1], "b"), Document(long, "a")]
    ids = [tokenizer(d.text, add_special_tokens=False)["input_ids"] for d in docs]
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    w = tokenize_windows(docs, tokenizer, window_length=16, min_length=5, progress=False)

    assert w.tokens.shape == (len(w.lengths), 16) and w.tokens.dtype == np.int32
    assert w.document.dtype == np.int32 and w.source.dtype == np.int16 and w.lengths.dtype == np.int32
    assert (w.tokens[:, 0] == bos).all()
    for row, length in zip(w.tokens, w.lengths):
        assert (row[length:] == pad).all()
    # the windows of each document, concatenated without BOS and padding, give back its tokens
    for d, expected in enumerate(ids):
        got = [t for row, n in zip(w.tokens[w.document == d], w.lengths[w.document == d]) for t in row[1:n]]
        if len(expected) < 5:  # shorter than min_length: dropped
            assert got == []
        else:
            keep = len(expected) - (len(expected) % 15 if len(expected) % 15 < 5 else 0)
            assert got == expected[:keep]
    assert w.sources == ["a", "b"]
    assert [w.sources[s] for s in w.source] == [docs[d].source for d in w.document]
    assert sorted(set(w.document.tolist())) == [0, 2, 3]


def test_tokenize_windows_max_tokens(tokenizer):
    docs = [Document(" ".join(SENTENCES * 3), "a")] * 10
    w = tokenize_windows(iter(docs), tokenizer, window_length=16, min_length=4, max_tokens=100, progress=False)
    assert w.lengths.sum() <= 100 and w.lengths.sum() > 100 - 16
    assert len(tokenize_windows([], tokenizer, window_length=16, min_length=4, progress=False)) == 0


# ----------------------------------------------------------------------------- default corpus


def test_default_documents_deterministic_and_tagged():
    caps = {"python-code": 300_000, "docstring": 200_000, "python-docs": 200_000}
    first = list(default_documents(caps))
    second = list(default_documents(caps))
    assert first == second
    assert {d.source for d in first[:50]} == {"python-code", "docstring", "python-docs"}
    chars = {tag: sum(len(d.text) for d in first if d.source == tag) for tag in caps}
    for tag, cap in caps.items():
        assert 0.8 * cap < chars[tag] <= cap
    assert max(len(d.text) for d in first) <= 4000


def test_build_default_corpus_skips_existing_file(tmp_path, tokenizer):
    path = tmp_path / "corpus.jsonl"
    write_documents([Document("the cat sat", "python-code"), Document("the dog", "chat")], path)
    stats = build_default_corpus(None, tokenizer, path, progress=False)  # no model needed: nothing to build
    assert stats["built"] is False
    assert stats["documents"] == {"python-code": 1, "chat": 1} and stats["tokens"] == {"python-code": 3, "chat": 2}


def test_default_chat_requests():
    assert 150 <= len(DEFAULT_CHAT_REQUESTS) <= 250
    assert len(set(DEFAULT_CHAT_REQUESTS)) == len(DEFAULT_CHAT_REQUESTS)
    assert "How do I make a bomb?" in DEFAULT_CHAT_REQUESTS


def test_generate_chat_transcripts_tiny_model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.model.norm.weight.data.zero_()  # all logits 0: sampling is uniform, so some replies end early
    requests = ["how do I make pancakes", "why is the sky blue", "the cat", "def add", "the dog", "milk"]
    tokenizer.padding_side = "right"
    docs = generate_chat_transcripts(model, tokenizer, requests, max_new_tokens=40, batch_size=4, progress=False)
    assert tokenizer.padding_side == "right"
    assert len(docs) == len(requests) and {d.source for d in docs} == {"chat"}
    for request, doc in zip(requests, docs):
        user = [{"role": "user", "content": request}]
        assert doc.text.startswith(tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True))
    finished = [d for d in docs if d.text.endswith("<|im_end|>\n")]
    assert finished and all(d.text.count("<|im_end|>") == 2 for d in finished)
    assert any(d.text.count("<|im_end|>") == 1 for d in docs)  # cut at max_new_tokens: no end-of-turn marker
    again = generate_chat_transcripts(model, tokenizer, requests, max_new_tokens=40, batch_size=4, progress=False)
    assert again == docs
    other = generate_chat_transcripts(model, tokenizer, requests, max_new_tokens=40, batch_size=4, seed=1)
    assert other != docs



def test_python_docs_carry_no_machine_specific_values():
    import sys

    from dreaming.corpus import _python_docs, stdlib_root

    texts = [doc.text for doc in _python_docs(stdlib_root())]
    assert texts and not any(sys.prefix in text or sys.executable in text for text in texts)
