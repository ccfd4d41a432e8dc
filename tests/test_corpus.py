"""Corpus: reading documents, token windows, the default corpus and its data files, batch-invariant sampling."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dreaming.build.corpus import (
    WRITTEN_CORPUS,
    Document,
    WritingConfig,
    build_default_corpus,
    chat_requests,
    generate_documents,
    heldout_texts,
    read_documents,
    tokenize_windows,
    with_bos,
    write_documents,
    writing_prompts,
)
from dreaming.generate import sample_continuations

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


def test_a_document_that_starts_with_bos_gets_one_bos(tokenizer):
    """The one BOS rule: a chat document starting with <|im_start|> (this tokenizer's BOS) is not given a second."""
    bos = tokenizer.bos_token_id
    chat = "<|im_start|>user\nthe cat sat<|im_end|>\n<|im_start|>assistant\nthe dog<|im_end|>\n"
    ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
    assert ids[0] == bos
    w = tokenize_windows([Document(chat, "chat")], tokenizer, window_length=64, min_length=2, progress=False)
    assert w.tokens[0, : w.lengths[0]].tolist() == ids == with_bos(ids, bos)
    assert with_bos(ids[1:], bos) == ids and with_bos([], bos) == [bos]


def test_tokenize_windows_max_tokens(tokenizer):
    docs = [Document(" ".join(SENTENCES * 3), "a")] * 10
    w = tokenize_windows(iter(docs), tokenizer, window_length=16, min_length=4, max_tokens=100, progress=False)
    assert w.lengths.sum() <= 100 and w.lengths.sum() > 100 - 16
    assert len(tokenize_windows([], tokenizer, window_length=16, min_length=4, progress=False)) == 0


# ----------------------------------------------------------------------------- default corpus


@pytest.mark.slow  # two builds of the standard library's part (22 s): `make test-slow`
def test_build_default_corpus_is_deterministic(tmp_path, tokenizer):
    """The same input gives the same bytes: the stdlib part (tagged, capped, chunked) and the written part,
    interleaved."""
    written = tmp_path / "written.jsonl.gz"
    write_documents([Document("the cat sat on the mat", "story"), Document("<|im_start|>user\nhow<|im_end|>\n", "chat")],
                    written)
    caps = {"python-code": 60_000, "docstring": 30_000, "python-docs": 30_000}
    first = build_default_corpus(tokenizer, tmp_path / "a.jsonl", written=written, max_chars_per_source=caps)
    second = build_default_corpus(tokenizer, tmp_path / "b.jsonl", written=written, max_chars_per_source=caps)
    assert first["built"] and (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert first["sha256"] == second["sha256"]
    assert set(first["documents"]) == {"python-code", "docstring", "python-docs", "story", "chat"}
    # the standard library's part: each source an even spread of about its cap, in chunks, interleaved from the start
    documents = list(read_documents(str(tmp_path / "a.jsonl")))
    assert {d.source for d in documents[:50]} >= {"python-code", "docstring", "python-docs"}
    for tag, cap in caps.items():
        assert 0.8 * cap < sum(len(d.text) for d in documents if d.source == tag) <= cap
    assert max(len(d.text) for d in documents) <= 4000
    again = build_default_corpus(tokenizer, tmp_path / "a.jsonl", written=written)  # exists: read, not rebuilt
    assert again["built"] is False and again["sha256"] == first["sha256"] and again["tokens"] == first["tokens"]


def test_written_jsonl_gz_bytes_depend_only_on_the_documents(tmp_path):
    docs = [Document("héllo\nworld", "a"), Document("x", "b")]
    write_documents(docs, tmp_path / "one.jsonl.gz")
    write_documents(docs, tmp_path / "two.jsonl.gz")
    assert (tmp_path / "one.jsonl.gz").read_bytes() == (tmp_path / "two.jsonl.gz").read_bytes()  # no time, no name
    assert list(read_documents(str(tmp_path / "one.jsonl.gz"))) == docs


def test_shipped_data_files():
    requests = chat_requests()
    assert 150 <= len(requests) <= 250 and len(set(requests)) == len(requests)
    assert "How do I make a bomb?" in requests
    prompts = writing_prompts()
    genres = {tag for tag, _ in prompts}
    assert len(prompts) >= 1000 and len(genres) >= 12 and "chat" not in genres
    assert all("{topic}" not in text and text.strip() for _, text in prompts)
    written = list(read_documents(str(WRITTEN_CORPUS)))
    assert {d.source for d in written} == genres | {"chat"}
    assert len(written) == len(prompts) + 2 * len(requests)


def test_heldout_texts_are_varied_and_in_no_corpus():
    texts = heldout_texts()
    sources = {d.source for d in texts}
    assert len(texts) >= 50 and len(sources) >= 10 and {"chat", "c-code", "german", "story"} <= sources
    written = "\n".join(d.text for d in read_documents(str(WRITTEN_CORPUS)))
    requests = "\n".join(chat_requests())
    for doc in texts:  # no sentence-length piece of a held-out text (template markers aside) is in the written part
        text = re.sub(r"<\|im_(start|end)\|>(system|user|assistant)?\n?", "", doc.text)
        for start in range(0, max(1, len(text) - 40), 40):
            piece = text[start : start + 40]
            assert piece not in written and piece not in requests


def tiny_chat_model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval().double()
    with torch.no_grad():  # a less flat distribution than random init, with the end-of-turn marker among the likely
        model.lm_head.weight.mul_(6)
        model.lm_head.weight[tokenizer.eos_token_id] = 0
    return model


def test_batched_sampling_equals_one_at_a_time(tokenizer):
    model = tiny_chat_model(tokenizer)
    prompts = [tokenizer(text)["input_ids"] for text in SENTENCES + ["the cat", "why is", "def add ( a"]]
    common = dict(max_new_tokens=12, eos_token_ids={tokenizer.eos_token_id}, pad_token_id=tokenizer.pad_token_id,
                  progress=False)
    batched = sample_continuations(model, prompts, batch_size=7, **common)
    alone = [sample_continuations(model, [p], keys=[i], batch_size=1, **common)[0] for i, p in enumerate(prompts)]
    assert batched == alone
    assert any(len(row) < 12 and row[-1] == tokenizer.eos_token_id for row in batched)  # some stopped early
    assert any(len(row) == 12 for row in batched)
    assert len({tuple(row) for row in batched}) > 1
    reversed_order = sample_continuations(model, prompts[::-1], keys=list(range(len(prompts)))[::-1], batch_size=3,
                                          **common)
    assert reversed_order[::-1] == batched
    assert sample_continuations(model, prompts, seed=1, batch_size=7, **common) != batched
    with pytest.raises(ValueError, match="temperature"):
        sample_continuations(model, prompts, temperature=0, **common)


def test_generate_documents_tiny_model(tokenizer):
    model = tiny_chat_model(tokenizer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    prompts = [("story", "the cat sat"), ("poem", "the sky is blue")]
    requests = ["how do I make pancakes", "why is the sky blue", "def add"]
    config = WritingConfig(max_new_tokens=30, batch_size=2)
    docs = generate_documents(model, tokenizer, config, prompts=prompts, requests=requests, progress=False)
    assert [d.source for d in docs] == ["story", "poem"] + ["chat"] * 6
    assert not any("<|im_start|>" in d.text for d in docs[:2])  # the written genres are the reply alone
    for request, doc in zip([r for r in requests for _ in range(2)], docs[2:]):
        user = [{"role": "user", "content": request}]
        assert doc.text.startswith(tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True))
    assert docs == generate_documents(model, tokenizer, WritingConfig(max_new_tokens=30, batch_size=8),
                                      prompts=prompts, requests=requests, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        WritingConfig(batch_size=0)


def test_python_docs_carry_no_machine_specific_values():
    import sys

    from dreaming.build.corpus import _python_docs, stdlib_root

    texts = [doc.text for doc in _python_docs(stdlib_root())]
    assert texts and not any(sys.prefix in text or sys.executable in text for text in texts)
