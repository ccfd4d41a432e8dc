"""Text corpora for building a bundle: sources -> documents -> fixed-length token windows (dreaming/windows.py), and
the offline default corpus.

Owns
  Document, read_documents, write_documents   text files, directories, JSONL (.gz), Parquet, Hugging Face datasets
  tokenize_windows                            documents -> Windows [n_windows, window_length], BOS first
  default_documents                           Python source, docstrings and docs from the standard library
  chat_requests, writing_prompts, WritingConfig, generate_documents
                                              the text the model writes across genres and in chat (data/)
  heldout_texts                               the varied texts every transcoder is evaluated on (in no corpus)
  build_default_corpus                        the stdlib part and the shipped written part in one JSONL file

Every document carries a source tag, so a user can see when one narrow source explains a feature.
Everything here is deterministic: sorted file order, fixed seeds, no network.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import html
import importlib
import io
import itertools
import json
import os
import pydoc
import re
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from dreaming.atomic import atomic_file
from dreaming.special_tokens import bos_token_id as default_bos
from dreaming.special_tokens import pad_token_id as default_pad
from dreaming.special_tokens import with_bos
from dreaming.windows import Windows

# -----------------------------------------------------------------------------
# documents: reading and writing


@dataclass
class Document:
    text: str
    source: str  # tag, e.g. "python-code", "docstring", "python-docs", "chat", or a user-given tag


TEXT_SUFFIXES = (".txt", ".md")
DIRECTORY_SUFFIXES = (".txt", ".md", ".py")


def _field(record: dict, text_field: str, where: str) -> str:
    if text_field not in record:
        raise ValueError(f"{where}: no field {text_field!r}; fields: {sorted(record)} (choose one with text_field=)")
    return record[text_field]


def _read_jsonl(path: Path, text_field: str, source: str | None, default: str) -> Iterator[Document]:
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({error})") from error
            yield Document(_field(record, text_field, f"{path}:{line_no}"), source or record.get("source") or default)


def _read_parquet(path: Path, text_field: str, source: str | None, default: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"{path}: no column {text_field!r}; columns: {names} (choose one with text_field=)")
    columns = [text_field] + (["source"] if "source" in names and text_field != "source" else [])
    for batch in parquet.iter_batches(columns=columns):
        texts = batch.column(text_field).to_pylist()
        sources = batch.column("source").to_pylist() if "source" in columns else [None] * len(texts)
        for text, tag in zip(texts, sources):
            yield Document(text, source or tag or default)


def _read_hf(spec: str, text_field: str, source: str | None, split: str) -> Iterator[Document]:
    import datasets

    name, _, config = spec.removeprefix("hf:").partition(":")
    dataset = datasets.load_dataset(name, config or None, split=split, streaming=True)
    for i, record in enumerate(dataset):
        yield Document(_field(record, text_field, f"{spec} row {i}"), source or record.get("source") or name)


def read_documents(
    spec: str, text_field: str = "text", source: str | None = None, split: str = "train", limit: int | None = None
) -> Iterator[Document]:
    """Stream documents from `spec`.

    spec: a .txt/.md file (one document); a directory (every .txt/.md/.py file below it, sorted, one document
    each); a .jsonl or .jsonl.gz file (one document per line, field `text_field`, optional field "source"); a .parquet file
    (column `text_field`, optional column "source"); or "hf:NAME[:CONFIG]", a Hugging Face dataset streamed
    with `datasets.load_dataset(NAME, CONFIG, split=split, streaming=True)` (a hub id, or a local directory
    of jsonl/parquet/csv files). `source` overrides the tag; otherwise a record's "source" field, else the
    file's stem or the dataset's name.
    """
    if spec.startswith("hf:"):
        documents = _read_hf(spec, text_field, source, split)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"corpus not found: {spec}")
        tag = source or path.stem
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DIRECTORY_SUFFIXES)
            documents = (Document(p.read_text(encoding="utf-8", errors="replace"), tag) for p in files)
        elif path.suffix in TEXT_SUFFIXES:
            documents = iter([Document(path.read_text(encoding="utf-8", errors="replace"), tag)])
        elif path.name.endswith((".jsonl", ".jsonl.gz")):
            documents = _read_jsonl(path, text_field, source, path.name.split(".")[0])
        elif path.suffix == ".parquet":
            documents = _read_parquet(path, text_field, source, path.stem)
        else:
            raise ValueError(
                f"unknown corpus format {spec!r}: expected a .txt/.md/.jsonl/.parquet file, a directory, "
                "or hf:NAME[:CONFIG]"
            )
    return itertools.islice(documents, limit)


def write_documents(documents: Iterable[Document], path: str | os.PathLike) -> None:
    """Write documents as JSONL {"text", "source"} (gzip-compressed when the name ends in .gz, with no time stamp,
    so the bytes depend only on the documents); atomic (a crash never leaves a partial file at `path`)."""
    path = Path(path)
    with atomic_file(path) as scratch, open(scratch, "wb") as file:
        raw = gzip.GzipFile(filename="", fileobj=file, mode="wb", mtime=0) if path.suffix == ".gz" else file
        with io.TextIOWrapper(raw, encoding="utf-8", newline="\n") as f:
            for doc in documents:
                f.write(json.dumps({"text": doc.text, "source": doc.source}, ensure_ascii=False) + "\n")


# -----------------------------------------------------------------------------
# token windows


def tokenize_windows(
    documents: Iterable[Document],
    tokenizer,
    *,
    window_length: int = 128,
    bos_token_id: int | None = None,
    pad_token_id: int | None = None,
    min_length: int = 16,
    max_tokens: int | None = None,
    batch_documents: int = 64,
    progress: bool = True,
) -> Windows:
    """Cut each document (tokenised on its own, no special tokens added) into windows of window_length - 1
    tokens, each prefixed with BOS (the one BOS rule, `with_bos`: a document that starts with BOS keeps just one). A document's last partial window is kept if it has >= min_length tokens
    (BOS not counted). With max_tokens, stop before the total of valid tokens (BOS included) would pass it,
    and stop reading documents. bos/pad ids default to the tokenizer's (dreaming.special_tokens).
    """
    bos_token_id = default_bos(tokenizer) if bos_token_id is None else bos_token_id
    pad_token_id = default_pad(tokenizer) if pad_token_id is None else pad_token_id
    if not 1 <= min_length < window_length:
        raise ValueError(f"need 1 <= min_length < window_length, got {min_length} and {window_length}")
    step = window_length - 1
    rows, lengths, doc_index, source_index = [], [], [], []
    sources: dict[str, int] = {}
    total = 0
    bar = tqdm(desc="tokenizing", unit="tok", total=max_tokens, disable=not progress)
    documents = iter(documents)
    n_docs = 0
    full = False
    while not full and (batch := list(itertools.islice(documents, batch_documents))):
        ids_batch = tokenizer([doc.text for doc in batch], add_special_tokens=False)["input_ids"]
        for doc, ids in zip(batch, ids_batch):
            ids = with_bos(ids, bos_token_id)[1:]  # every window gets a BOS; a document's own is not doubled
            tag = sources.setdefault(doc.source, len(sources))
            for start in range(0, len(ids), step):
                piece = ids[start : start + step]
                if len(piece) < step and len(piece) < min_length:
                    break
                if max_tokens is not None and total + len(piece) + 1 > max_tokens:
                    full = True
                    break
                row = np.full(window_length, pad_token_id, dtype=np.int32)
                row[0] = bos_token_id
                row[1 : len(piece) + 1] = piece
                rows.append(row)
                lengths.append(len(piece) + 1)
                doc_index.append(n_docs)
                source_index.append(tag)
                total += len(piece) + 1
                bar.update(len(piece) + 1)
            n_docs += 1
            if full:
                break
    bar.close()
    return Windows(
        tokens=np.stack(rows) if rows else np.zeros((0, window_length), dtype=np.int32),
        lengths=np.array(lengths, dtype=np.int32),
        document=np.array(doc_index, dtype=np.int32),
        source=np.array(source_index, dtype=np.int16),
        sources=list(sources),
    )


# -----------------------------------------------------------------------------
# the default corpus, non-model part: what a fresh Python install has

CHUNK_CHARS = 4000
# Budgets in characters (SmolLM2's tokenizer gives ~3.8 characters per token on all three), so that code and
# documentation are about 40% of the default corpus's tokens and the model-written text the rest.
DEFAULT_MAX_CHARS = {"python-code": 450_000, "docstring": 350_000, "python-docs": 400_000}
# Directories of the standard library that are tests, data tables or vendored packages.
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data", "encodings"}
# Modules written in C: their documentation only exists at run time, as help() renders it.
C_MODULES = (
    "builtins", "sys", "itertools", "math", "cmath", "time", "gc", "errno", "marshal", "atexit", "array",
    "binascii", "zlib", "select", "faulthandler", "_io", "_thread", "_signal", "_codecs", "_operator",
)  # fmt: skip
# Documentation text files that ship inside the standard library.
DOC_FILES = ("idlelib/help.html", "email/architecture.rst", "idlelib/README.txt", "idlelib/NEWS.txt", "LICENSE.txt")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's Python files, sorted, without tests and data tables (their folders never walked)."""
    root = root or stdlib_root()
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in SKIP_DIRS]
        found += [Path(folder) / name for name in names if name.endswith(".py")]
    return sorted(found)


def chunk_text(text: str, starts: list[int], max_chars: int = CHUNK_CHARS) -> list[str]:
    """Split `text` into chunks of at most ~max_chars characters.

    Cuts at the given line numbers (0-based, e.g. where top-level statements begin), and where that is not
    enough at blank lines, then at line ends; pieces are packed greedily into chunks.
    """
    lines = text.splitlines(keepends=True)
    cuts = sorted(set([0] + [s for s in starts if 0 < s < len(lines)] + [len(lines)]))
    pieces = []
    for a, b in zip(cuts, cuts[1:]):
        for paragraph in re.split(r"(?<=\n)(?=[ \t]*\n)", "".join(lines[a:b])):
            pieces += [paragraph] if len(paragraph) <= max_chars else paragraph.splitlines(keepends=True)
    chunks = [""]
    for piece in pieces:
        if chunks[-1] and len(chunks[-1]) + len(piece) > max_chars:
            chunks.append("")
        chunks[-1] += piece
    return [c for c in chunks if c.strip()]


def _spread(docs: list[Document], max_chars: int) -> list[Document]:
    """An evenly spread subset of `docs` with about max_chars characters (the whole list if it fits)."""
    total = sum(len(d.text) for d in docs)
    if total <= max_chars:
        return docs
    keep, credit = [], 0.0
    for doc in docs:
        credit += len(doc.text) * max_chars / total
        if credit >= len(doc.text):
            credit -= len(doc.text)
            keep.append(doc)
    return keep


def _python_sources(files: list[Path], root: Path, min_docstring: int = 80):
    """(code chunks, docstring documents) of the given files."""
    code, docstrings = [], []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        starts = [(n.decorator_list[0] if getattr(n, "decorator_list", None) else n).lineno - 1 for n in tree.body]
        code += [Document(chunk, "python-code") for chunk in chunk_text(text, starts)]
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        entries = []
        for name, node in _named_nodes(tree, module):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_docstring:
                entries.append(f"{name}\n{doc}\n\n")
        text = "".join(entries)
        docstrings += [Document(chunk, "docstring") for chunk in chunk_text(text, _entry_starts(entries))]
    return code, docstrings


def _named_nodes(tree: ast.Module, module: str) -> Iterator[tuple[str, ast.AST]]:
    """(qualified name, node) for the module and every class and function, in source order."""
    yield module, tree
    stack = [(module, node) for node in reversed(tree.body)]
    while stack:
        prefix, node = stack.pop()
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}.{node.name}"
            yield name, node
            stack += [(name, child) for child in reversed(node.body)]


def _entry_starts(entries: list[str]) -> list[int]:
    return list(itertools.accumulate(entry.count("\n") for entry in entries))


def _html_text(markup: str) -> str:
    body = re.sub(r"(?s)<(script|style|head)\b.*?</\1>", "", markup)
    text = html.unescape(re.sub(r"<[^>]+>", "", body))
    return re.sub(r"\n[ \t]*(\n[ \t]*)+", "\n\n", text).strip() + "\n"


def _python_docs(root: Path) -> list[Document]:
    """Python's own documentation: the language reference topics, help() of C modules, shipped doc files."""
    from pydoc_data.topics import topics

    texts = [topics[key] for key in sorted(topics)]
    for name in C_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        text = pydoc.render_doc(module, renderer=pydoc.plaintext)
        text = re.sub(r"\nDATA\n(?:(?: {4}.*)?\n)*", "\n", text)  # DATA shows run-time values (sys.argv, paths)
        texts.append(re.sub(r" at 0x[0-9a-f]+", "", text))
    for rel in DOC_FILES:
        if (root / rel).exists():
            text = (root / rel).read_text(encoding="utf-8", errors="replace")
            texts.append(_html_text(text) if rel.endswith(".html") else text)
    docs = []
    for text in texts:
        lines = text.splitlines()
        paragraphs = [i + 1 for i, line in enumerate(lines) if not line.strip()]
        docs += [Document(chunk, "python-docs") for chunk in chunk_text(text, paragraphs)]
    return docs


def _interleave(groups: list[list[Document]]) -> Iterator[Document]:
    """Merge lists so that every prefix holds the same share of each list's characters."""
    totals = [max(1, sum(len(d.text) for d in g)) for g in groups]
    done, index = [0] * len(groups), [0] * len(groups)
    while True:
        open_groups = [k for k in range(len(groups)) if index[k] < len(groups[k])]
        if not open_groups:
            return
        k = min(open_groups, key=lambda k: done[k] / totals[k])
        doc = groups[k][index[k]]
        index[k] += 1
        done[k] += len(doc.text)
        yield doc


def _default_groups(max_chars_per_source: dict[str, int] | None = None, root: Path | None = None):
    caps = {**DEFAULT_MAX_CHARS, **(max_chars_per_source or {})}
    root = root or stdlib_root()
    code, docstrings = _python_sources(stdlib_files(root), root)
    groups = {"python-code": code, "docstring": docstrings, "python-docs": _python_docs(root)}
    return [_spread(docs, caps[tag]) for tag, docs in groups.items()]


def default_documents(
    max_chars_per_source: dict[str, int] | None = None, root: Path | None = None
) -> Iterator[Document]:
    """The non-model part of the default corpus, interleaved by source, in a fixed order.

    Sources: "python-code" (standard-library files in ~4k-character chunks cut at top-level statements),
    "docstring" (module/class/function docstrings of those files, by module), "python-docs" (pydoc_data's
    language reference topics, help() text of C modules, documentation files shipped with the library).
    Each source is an evenly spread subset of about max_chars_per_source[tag] characters.
    """
    return _interleave(_default_groups(max_chars_per_source, root))


# -----------------------------------------------------------------------------
# the default corpus, model part: text the model writes across genres and topics, and chat transcripts

DATA_DIR = Path(__file__).parent / "data"
# The model-written part of the default corpus as generate_documents(seed=0) wrote it on the development CPU
# (`dreaming corpus write`). It ships with the package: sampling in bf16 is not bit-identical across CPU kinds,
# and a feature id should mean the same thing on every machine.
WRITTEN_CORPUS = DATA_DIR / "written.jsonl.gz"


def chat_requests() -> list[str]:
    """The fixed, diverse list of user requests the model answers for the chat part (data/chat_requests.txt)."""
    lines = (DATA_DIR / "chat_requests.txt").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def writing_prompts() -> list[tuple[str, str]]:
    """(genre tag, instruction) for every genre × topic of data/writing_prompts.json."""
    grid = json.loads((DATA_DIR / "writing_prompts.json").read_text(encoding="utf-8"))
    return [(genre, templates[i % len(templates)].format(topic=topic))
            for genre, templates in grid["genres"].items() for i, topic in enumerate(grid["topics"])]


def heldout_texts() -> list[Document]:
    """The fixed held-out evaluation set (data/heldout_texts.jsonl): short everyday texts of many kinds (stories,
    news, chat turns in the template, C and JavaScript, German, French, Spanish, emails, social posts, recipes...)
    written for this purpose and kept out of every corpus, to measure how a transcoder holds on text it never saw."""
    return list(read_documents(str(DATA_DIR / "heldout_texts.jsonl")))


def _render(tokenizer, messages: list[dict], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


@dataclass
class WritingConfig:
    """How the model-written part of the default corpus is sampled; `dreaming corpus write` has the same flags."""

    seed: int = 0
    samples_per_request: int = 2  # transcripts per chat request
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 50
    batch_size: int = 128  # texts sampled together (changes the speed, never the text)

    def __post_init__(self):
        for name in ("samples_per_request", "max_new_tokens", "top_k", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def generate_documents(
    model,
    tokenizer,
    config: WritingConfig | None = None,
    prompts: list[tuple[str, str]] | None = None,
    requests: list[str] | None = None,
    progress: bool = True,
) -> list[Document]:
    """The model-written part of the default corpus.

    prompts: (tag, instruction) pairs (default: `writing_prompts()`); the model answers each instruction in its
    chat template, and the reply alone (plain text, no template) is a document tagged with the genre.
    requests: user requests (default: `chat_requests()`), each answered config.samples_per_request times; the whole
    transcript in the chat template is a document tagged "chat" (a reply cut at max_new_tokens has no end-of-turn
    marker). Sampling is batch-invariant (`dreaming.generate`): document i depends only on its prompt, i and seed.
    """
    from dreaming.generate import sample_continuations

    config = config or WritingConfig()
    prompts = writing_prompts() if prompts is None else prompts
    requests = chat_requests() if requests is None else requests
    jobs = [(tag, text, False) for tag, text in prompts]
    jobs += [("chat", request, True) for request in requests for _ in range(config.samples_per_request)]
    rendered = [_render(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True) for _, text, _ in jobs]
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    eos = model.generation_config.eos_token_id
    eos = set(eos) if isinstance(eos, (list, tuple)) else {tokenizer.eos_token_id if eos is None else eos}
    replies = sample_continuations(
        model, ids, seed=config.seed, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
        top_k=config.top_k, eos_token_ids=eos, pad_token_id=min(eos), batch_size=config.batch_size, progress=progress,
        desc="writing corpus",
    )  # fmt: skip
    documents = []
    for (tag, text, is_chat), prompt, reply_ids in zip(jobs, rendered, replies):
        finished = bool(reply_ids) and reply_ids[-1] in eos
        reply = tokenizer.decode(reply_ids, skip_special_tokens=True).strip()
        if not is_chat:
            documents.append(Document(reply, tag))
        elif finished:
            turns = [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
            documents.append(Document(_render(tokenizer, turns), "chat"))
        else:
            documents.append(Document(prompt + reply, "chat"))
    return documents


# -----------------------------------------------------------------------------
# the default corpus, all together


def corpus_stats(documents: Iterable[Document], tokenizer=None) -> dict:
    """Documents, characters (and tokens, given a tokenizer) per source."""
    docs, chars, tokens = Counter(), Counter(), Counter()
    documents = iter(documents)
    while batch := list(itertools.islice(documents, 256)):
        for doc in batch:
            docs[doc.source] += 1
            chars[doc.source] += len(doc.text)
        if tokenizer is not None:
            for doc, ids in zip(batch, tokenizer([d.text for d in batch], add_special_tokens=False)["input_ids"]):
                tokens[doc.source] += len(ids)
    stats = {"documents": dict(docs), "chars": dict(chars)}
    if tokenizer is not None:
        stats["tokens"] = dict(tokens)
    return stats


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def build_default_corpus(tokenizer, out_path: str | os.PathLike, written: str | os.PathLike = WRITTEN_CORPUS,
                         max_chars_per_source: dict[str, int] | None = None) -> dict:
    """Write the default corpus (JSONL) to out_path and return its stats; skip the work if it exists.

    It is the standard library's part (`default_documents`) and the model-written part (`written`, by default the
    file shipped in the package, made by `generate_documents`), interleaved so that every prefix of the file has
    the same mix. Nothing here samples, so the same Python and package give the same bytes on every machine.

    Stats: {"path", "built", "sha256", "documents", "chars", "tokens"} (the last three per source).
    """
    out_path = Path(out_path)
    if not out_path.exists():
        groups = _default_groups(max_chars_per_source)
        write_documents(_interleave(groups + [list(read_documents(str(written)))]), out_path)
        built = True
    else:
        built = False
    stats = corpus_stats(read_documents(str(out_path)), tokenizer)
    return {"path": str(out_path), "built": built, "sha256": file_sha256(out_path), **stats}
