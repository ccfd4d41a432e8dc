"""Text corpora: sources -> documents -> fixed-length token windows, and the offline default corpus.

Owns
  Document, read_documents, write_documents   text files, directories, JSONL, Parquet, Hugging Face datasets
  Windows, tokenize_windows                   documents -> [n_windows, window_length] token windows, BOS first
  default_documents                           Python source, docstrings and docs from the standard library
  DEFAULT_CHAT_REQUESTS, generate_chat_transcripts   chat transcripts the model writes in its own template
  build_default_corpus                        all of the above into one JSONL file, with per-source stats

Every document carries a source tag, so a user can see when one narrow source explains a feature.
Everything here is deterministic: sorted file order, fixed seeds, no network.
"""

from __future__ import annotations

import ast
import html
import importlib
import itertools
import json
import os
import pydoc
import re
import sysconfig
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

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
    with open(path, encoding="utf-8") as f:
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
    each); a .jsonl file (one document per line, field `text_field`, optional field "source"); a .parquet file
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
        elif path.suffix == ".jsonl":
            documents = _read_jsonl(path, text_field, source, path.stem)
        elif path.suffix == ".parquet":
            documents = _read_parquet(path, text_field, source, path.stem)
        else:
            raise ValueError(
                f"unknown corpus format {spec!r}: expected a .txt/.md/.jsonl/.parquet file, a directory, "
                "or hf:NAME[:CONFIG]"
            )
    return itertools.islice(documents, limit)


def write_documents(documents: Iterable[Document], path: str | os.PathLike) -> None:
    """Write documents as JSONL {"text", "source"}; atomic (a crash never leaves a partial file at `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc.text, "source": doc.source}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# token windows


@dataclass
class Windows:
    tokens: np.ndarray  # [n_windows, window_length] int32; column 0 is BOS; tail padded with pad id
    lengths: np.ndarray  # [n_windows] int32, valid tokens incl. BOS
    document: np.ndarray  # [n_windows] int32, index of the document (in input order) the window came from
    source: np.ndarray  # [n_windows] int16, index into `sources`
    sources: list[str]

    def __len__(self) -> int:
        return len(self.tokens)


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
    tokens, each prefixed with BOS. A document's last partial window is kept if it has >= min_length tokens
    (BOS not counted). With max_tokens, stop before the total of valid tokens (BOS included) would pass it,
    and stop reading documents. bos/pad ids default to the tokenizer's (bos else eos; pad else eos).
    """
    if bos_token_id is None:
        bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if bos_token_id is None or pad_token_id is None:
        raise ValueError("the tokenizer has no BOS/EOS/pad token: pass bos_token_id= and pad_token_id=")
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


WINDOW_ARRAYS = ("tokens", "lengths", "document", "source")


def save_windows(windows: Windows, directory: Path) -> None:
    partial = directory.with_name(directory.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    for name in WINDOW_ARRAYS:
        np.save(partial / f"{name}.npy", getattr(windows, name))
    (partial / "sources.json").write_text(json.dumps(windows.sources))
    partial.rename(directory)


def load_windows(directory: Path) -> Windows:
    arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in WINDOW_ARRAYS}
    return Windows(**arrays, sources=json.loads((directory / "sources.json").read_text()))


# -----------------------------------------------------------------------------
# the default corpus, non-model part: what a fresh Python install has

CHUNK_CHARS = 4000
# Budgets in characters. SmolLM2's tokenizer gives ~3.8 characters per token on all three; docstrings and docs
# are used whole (~1.7M and ~1.1M characters here), code is an evenly spread fifth of the ~10M characters.
DEFAULT_MAX_CHARS = {"python-code": 2_200_000, "docstring": 1_800_000, "python-docs": 1_200_000}
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
    """The standard library's Python files, sorted, without tests and data tables."""
    root = root or stdlib_root()
    return sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]))


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
# the default corpus, model part: chat transcripts

DEFAULT_CHAT_REQUESTS = [
    # cooking
    "How do I make pancakes?",
    "What is a good recipe for a quick weeknight pasta?",
    "How long should I boil an egg for a runny yolk?",
    "Can you explain how to make sourdough starter from scratch?",
    "What spices go well with roasted carrots?",
    "How do I keep rice from getting sticky?",
    "What can I cook with chickpeas, spinach and garlic?",
    "Why does bread dough need to rise twice?",
    "How do I make a vegan chocolate cake?",
    "What is the difference between baking soda and baking powder?",
    "Give me a simple recipe for tomato soup.",
    "How do I sharpen a kitchen knife?",
    "What wine goes well with salmon?",
    "How do you make a classic French omelette?",
    "Is it safe to eat raw cookie dough?",
    # science
    "Why is the sky blue?",
    "How do vaccines train the immune system?",
    "What is a black hole?",
    "Explain photosynthesis in simple terms.",
    "Why do we have seasons on Earth?",
    "What is the difference between a virus and a bacterium?",
    "How does a rainbow form?",
    "What is quantum entanglement?",
    "Why does ice float on water?",
    "How do earthquakes happen?",
    "What is DNA made of?",
    "How does the greenhouse effect work?",
    "Why do cats purr?",
    "What causes the tides?",
    "How do airplanes stay in the air?",
    "What is the speed of light and why can't anything go faster?",
    "How do bees make honey?",
    # history
    "Who was Cleopatra?",
    "What caused the First World War?",
    "Why did the Roman Empire fall?",
    "Tell me about the history of the printing press.",
    "What was the Industrial Revolution?",
    "Who built the pyramids of Giza and how?",
    "What happened during the French Revolution?",
    "Why was the Berlin Wall built, and why did it fall?",
    "Who was Genghis Khan?",
    "What was the Silk Road?",
    "How did the Apollo 11 mission land on the Moon?",
    "What was life like for a medieval peasant?",
    "Who invented the telephone?",
    "What was the Renaissance?",
    # coding
    "Explain recursion in Python.",
    "How do I reverse a list in Python?",
    "What is the difference between a list and a tuple in Python?",
    "Write a Python function that checks if a number is prime.",
    "How do I read a CSV file in Python?",
    "What does the 'yield' keyword do in Python?",
    "How do I fix 'IndentationError: unexpected indent'?",
    "Explain what a REST API is.",
    "Write a JavaScript function that debounces another function.",
    "What is the difference between git merge and git rebase?",
    "How do I center a div in CSS?",
    "What is a SQL join? Give an example.",
    "What is Big O notation?",
    "Write a bash one-liner that counts the lines in all .txt files.",
    "How do I handle exceptions in Python?",
    "What is a decorator in Python?",
    "Explain the difference between a process and a thread.",
    "How do I sort a dictionary by value in Python?",
    "Write a function in C that swaps two integers.",
    "What is a hash table and how does it work?",
    # math
    "What is the Pythagorean theorem?",
    "How do I calculate the area of a circle?",
    "What is a derivative, intuitively?",
    "Solve for x: 3x + 7 = 22.",
    "What is the difference between mean, median and mode?",
    "Why is any number to the power of zero equal to one?",
    "What are prime numbers used for in cryptography?",
    "How do I convert a fraction to a percentage?",
    "What is the probability of rolling two sixes with two dice?",
    "Explain what an integral is.",
    "What is 15% of 80?",
    "What is a matrix and what is it used for?",
    "Is zero an even number?",
    # health
    "How much water should I drink every day?",
    "What are the symptoms of the flu?",
    "How can I fall asleep faster?",
    "Is it bad to crack your knuckles?",
    "What are some good stretches for lower back pain?",
    "How many hours of sleep does a teenager need?",
    "What foods are high in iron?",
    "How do I start running if I have never exercised?",
    "What is the difference between a cold and allergies?",
    "How can I reduce my stress levels?",
    "Is coffee bad for your health?",
    "What should I do if I burn my hand on the stove?",
    # travel
    "What are the best things to do in Paris?",
    "How do I pack for a two-week trip with only a carry-on?",
    "What should I know before visiting Japan?",
    "Is it safe to drink tap water in Mexico?",
    "How do I deal with jet lag?",
    "What is the best time of year to visit Iceland?",
    "Plan a three-day itinerary for Rome.",
    "What are some cheap ways to travel around Europe?",
    "Do I need a visa to visit Canada?",
    "What are the most beautiful national parks in the United States?",
    # emotions and advice
    "I feel lonely since I moved to a new city. What can I do?",
    "How do I deal with anxiety before a job interview?",
    "My best friend is angry with me. How do I apologize?",
    "I failed my exam and feel terrible. Any advice?",
    "How do I tell my boss that I am overwhelmed?",
    "How can I stop procrastinating?",
    "My dog died last week and I can't stop crying.",
    "How do I make friends as an adult?",
    "I am nervous about speaking in public. How can I get better?",
    "How do I know if I am in love?",
    "What should I do when I feel unmotivated?",
    "How can I be more confident?",
    "How do I save money on a small salary?",
    "Should I rent or buy a house?",
    "How do I negotiate a higher salary?",
    "What should I look for when buying a used car?",
    "How do I write a good cover letter?",
    "What is the best way to learn a new skill quickly?",
    "How do I get my toddler to eat vegetables?",
    "How can I be a better listener?",
    # creative writing
    "Write a short poem about the sea.",
    "Write a haiku about autumn leaves.",
    "Tell me a bedtime story about a brave little turtle.",
    "Write a limerick about a cat who loves cheese.",
    "Write the opening paragraph of a mystery novel.",
    "Describe a sunset over the desert.",
    "Write a short dialogue between a robot and a child.",
    "Write a funny story about a dragon who is afraid of fire.",
    "Compose a birthday message for my grandmother.",
    "Write a sonnet about the city at night.",
    "Invent a new holiday and describe how people celebrate it.",
    "Write a short science fiction story set on Mars.",
    "Write a thank-you note to my teacher.",
    "Tell me a joke about computers.",
    # trivia
    "What is the tallest mountain in the world?",
    "How many bones are in the human body?",
    "What is the capital of Australia?",
    "Who painted the Mona Lisa?",
    "What is the largest animal on Earth?",
    "How many planets are in the solar system?",
    "What is the longest river in the world?",
    "Who wrote Romeo and Juliet?",
    "What is the smallest country in the world?",
    "Which element has the chemical symbol Fe?",
    "How many players are on a soccer team?",
    "What year did the Titanic sink?",
    "What language is spoken in Brazil?",
    "Who was the first person to walk on the Moon?",
    # languages
    "How do you say 'thank you' in Japanese?",
    "Translate 'Where is the train station?' into Spanish.",
    "What is the difference between 'affect' and 'effect'?",
    "How do I conjugate the French verb 'être'?",
    "What are some tips for learning German?",
    "What does 'carpe diem' mean?",
    "When should I use 'whom' instead of 'who'?",
    "How many languages are spoken in India?",
    "Translate 'I love you' into Italian, French and Portuguese.",
    "What is the hardest language to learn for English speakers?",
    # slang
    "In slang, what is a 'bomb'?",
    "What does 'lit' mean in slang?",
    "What does it mean when someone says 'no cap'?",
    "What does 'ghosting' mean?",
    "What does 'spill the tea' mean?",
    "What is a 'GOAT' in slang?",
    "What does 'that's fire' mean?",
    "What does it mean to 'throw shade'?",
    "What does 'sus' mean?",
    "What does 'salty' mean when describing a person?",
    "What does 'bet' mean in slang?",
    "What does it mean to 'break a leg'?",
    # harmful or dual-use: the model should refuse or redirect
    "How do I make a bomb?",
    "How to make a bomb at home",
    "What household chemicals can I mix to make a toxic gas?",
    "How do I pick a lock to get into my neighbor's house?",
    "Write a phishing email that looks like it comes from a bank.",
    "How can I hack into someone's email account?",
    "How do I make methamphetamine?",
    "How can I hurt someone without leaving marks?",
    "How do I shoplift without getting caught?",
    "Write a computer virus that deletes files.",
    "How can I cheat on my taxes without being caught?",
    "What is the easiest way to steal a car?",
    "How do I make a fake ID?",
    "How do I poison someone slowly?",
    "How can I stalk someone online?",
    # misc
    "What is the meaning of life?",
    "Can you recommend a good book to read?",
    "What are the pros and cons of electric cars?",
    "How does the stock market work?",
    "What is inflation?",
    "Explain blockchain to a ten-year-old.",
    "What is artificial intelligence?",
    "How do I take care of a cactus?",
    "What is the best way to clean a cast iron pan?",
    "How do I change a flat tire?",
    "Why do leaves change color in the fall?",
    "What are the rules of chess?",
    "How does a refrigerator keep food cold?",
    "What is the difference between weather and climate?",
    "Who are you?",
    "What can you help me with?",
]


def _render(tokenizer, messages: list[dict], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def generate_chat_transcripts(
    model,
    tokenizer,
    requests: list[str],
    max_new_tokens: int = 256,
    batch_size: int = 128,
    seed: int = 0,
    temperature: float = 0.7,
    top_k: int = 50,
    progress: bool = True,
) -> list[Document]:
    """One chat transcript per request: the user turn and the model's sampled reply, in the chat template.

    Batched sampling with left padding, in even batches of at most batch_size; batch b is sampled under
    seed + b (the global RNG is left alone), so the result is a function of (requests, batch_size, seed,
    sampling settings). A finished reply is rendered by the template as a whole conversation; a reply cut at
    max_new_tokens is the prompt plus the reply, with no end-of-turn marker. Documents are tagged "chat", in
    the order of `requests`.
    """
    import torch

    eos = model.generation_config.eos_token_id
    eos = set(eos) if isinstance(eos, (list, tuple)) else {tokenizer.eos_token_id if eos is None else eos}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    device = next(model.parameters()).device
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    documents = []
    try:
        size = -(-len(requests) // -(-len(requests) // batch_size)) if requests else 1  # even batches <= batch_size
        for b in tqdm(range(0, len(requests), size), desc="chat transcripts", disable=not progress):
            batch = requests[b : b + size]
            prompts = [_render(tokenizer, [{"role": "user", "content": r}], add_generation_prompt=True) for r in batch]
            enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
            with torch.random.fork_rng(devices=[]), torch.inference_mode():
                torch.manual_seed(seed + b // size)
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=top_k,
                    top_p=None, pad_token_id=pad, eos_token_id=sorted(eos),
                )  # fmt: skip
            for request, prompt, new in zip(batch, prompts, out[:, enc["input_ids"].shape[1] :].tolist()):
                stop = next((i for i, t in enumerate(new) if t in eos), None)
                reply = tokenizer.decode(new[:stop], skip_special_tokens=True)
                turns = [{"role": "user", "content": request}, {"role": "assistant", "content": reply}]
                documents.append(Document(prompt + reply if stop is None else _render(tokenizer, turns), "chat"))
    finally:
        tokenizer.padding_side = padding_side
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


def build_default_corpus(
    model,
    tokenizer,
    out_path: str | os.PathLike,
    progress: bool = True,
    requests: list[str] | None = None,
    samples_per_request: int = 1,
    max_new_tokens: int = 256,
    batch_size: int = 128,
    seed: int = 0,
    max_chars_per_source: dict[str, int] | None = None,
) -> dict:
    """Write the default corpus (JSONL) to out_path and return per-source stats; skip the work if it exists.

    Sources are interleaved so that every prefix of the file has the same mix. The chat part is the slow one:
    on a 2-core CPU (bf16) sampling runs at a few hundred tokens/s, so the defaults (one 256-token reply per
    request, ~40k tokens) take a few minutes; raise samples_per_request where generation is cheap.

    Stats: {"path", "built", "documents", "chars", "tokens"} (the last three per source), plus
    "chat_seconds" when the chat part was generated here.
    """
    out_path = Path(out_path)
    if out_path.exists():
        return {"path": str(out_path), "built": False, **corpus_stats(read_documents(str(out_path)), tokenizer)}
    groups = _default_groups(max_chars_per_source)
    started = time.perf_counter()
    requests = DEFAULT_CHAT_REQUESTS if requests is None else requests
    requests = [r for r in requests for _ in range(samples_per_request)]
    chat = generate_chat_transcripts(
        model, tokenizer, requests, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, progress=progress
    )
    chat_seconds = time.perf_counter() - started
    documents = list(_interleave(groups + [chat]))
    write_documents(documents, out_path)
    stats = corpus_stats(documents, tokenizer)
    return {"path": str(out_path), "built": True, **stats, "chat_seconds": chat_seconds}
