"""Corpora for the language models: vocabulary, tokenisation, a content-keyed cache, batching.

A corpus is a folder holding ``train.txt``, ``valid.txt`` and ``test.txt`` (``./getdata.sh``
prepares them). The tokenisation is awd-lstm-lm's ``data.py``: every line is split on whitespace
and ``<eos>`` is appended to it; the vocabulary is built over train, valid and test in that order,
so a token's id is its rank of first appearance in that stream and is the same on every machine.
The same rule serves every corpus of the paper: word-level PTB and WikiText (``<unk>`` is an
ordinary word), character-level PTB (characters are space-separated, ``_`` stands for a space)
and enwik8 (each byte written as its decimal value).

Two details differ from the reference code, both on inputs it would have mangled: a UTF-8 byte
order mark at the very start of a file is dropped instead of being glued onto the first token,
and a file that is not UTF-8 text (invalid UTF-8, NUL bytes) is an error that names the file and
the byte offset.

The tokenised corpus is cached under ``<corpus>/.cache/<key>/`` as plain data (tensors saved with
``torch.save`` and read back with ``weights_only=True``, the vocabulary as UTF-8 text, a JSON
record). The key is the SHA-256 of the three files' bytes together with :data:`CACHE_VERSION`, so
an edited file is never served from a stale cache (the reference code keyed a pickle on the md5
of the *path*). The cache is written atomically and is only an optimisation: a read-only folder,
an unreadable or corrupt entry, or a failed write falls back to tokenising, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

__all__ = [
    "CACHE_VERSION", "EOS", "SPLITS", "KNOWN_CORPORA", "DataError", "Dictionary", "Corpus",
    "load_corpus", "tokenize_file", "vocab_fingerprint", "data_fingerprint", "batchify",
    "get_batch", "check_vocab", "check_data",
]

log = logging.getLogger(__name__)

# Bump when the tokenisation or the cache layout changes: every existing cache entry then misses.
CACHE_VERSION = 1
EOS = "<eos>"
SPLITS = ("train", "valid", "test")
# Folder names that ./getdata.sh prepares (its ALL_DATASETS, less mnist).
KNOWN_CORPORA = ("penn", "pennchar", "enwik8", "wikitext-2", "wikitext-103", "toy")
CACHE_DIR = ".cache"

# Files are read in blocks of this many bytes, each cut after its last newline or space. Blocks
# that fit the CPU caches tokenise fastest (measured: 256 KiB about 1.5x faster than 8 MiB).
_BLOCK_BYTES = 256 << 10
_BOM = b"\xef\xbb\xbf"
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 24 * 3600
# Integer types a cached split may be stored in (the smallest that holds the vocabulary).
_CACHE_DTYPES = {"uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32,
                 "int64": torch.int64}

PathLike = Union[str, os.PathLike]


class DataError(ValueError):
    """A corpus or batching input that cannot be used; the message says what, where and how to
    fix it."""


class Dictionary:
    """Token <-> id maps: ``word2idx`` (dict) and ``idx2word`` (list); ids count from 0 in the
    order tokens were added."""

    def __init__(self, words: Iterable[str] = ()):
        self.word2idx: Dict[str, int] = {}
        self.idx2word: List[str] = []
        for word in words:
            self.add_word(word)

    def add_word(self, word: str) -> int:
        """The id of ``word``, adding it first when it is new."""
        idx = self.word2idx.get(word)
        if idx is None:
            idx = self.word2idx[word] = len(self.idx2word)
            self.idx2word.append(word)
        return idx

    def __len__(self) -> int:
        return len(self.idx2word)

    def __repr__(self) -> str:
        return f"Dictionary({len(self)} tokens)"


@dataclass(eq=False)
class Corpus:
    """A tokenised corpus: the shared vocabulary and one 1-D ``torch.long`` id tensor per split.

    ``fingerprint`` is :func:`vocab_fingerprint` of the vocabulary; a checkpoint stores it so that
    :func:`check_vocab` can tell whether its token ids mean the same words. ``data`` is
    :func:`data_fingerprint` of the three files' bytes (the text itself: "" when unknown).
    ``path`` is the corpus folder (for messages).
    """

    dictionary: Dictionary
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    fingerprint: str
    path: str = ""
    data: str = ""


def data_fingerprint(digests: Dict[str, str]) -> str:
    """SHA-256 (hex) over the SHA-256 digests of the split files (``{split: digest}``): the
    identity of the corpus's text, whatever folder it lies in."""
    record = {s: digests[s] for s in SPLITS}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode("ascii")).hexdigest()


def vocab_fingerprint(idx2word: List[str]) -> str:
    """SHA-256 (hex) of the vocabulary in id order, the tokens joined by newlines.

    Tokens never contain whitespace (lines are split on it), so the joined text determines the
    list. Two vocabularies with the same words in another order get different fingerprints, as
    their ids differ.
    """
    return hashlib.sha256("\n".join(idx2word).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# Locating the corpus


def _getdata_hint(folder: Path, again: bool = False) -> str:
    """How to (re)create ``folder``: the ``getdata.sh`` call for a corpus it knows. ``again``
    adds ``--force``, which a folder that getdata.sh marked complete needs."""
    name = folder.name
    if name in KNOWN_CORPORA:
        force = "--force " if again else ""
        return (f"run ./getdata.sh {force}{name} to prepare it{' again' if again else ''} (with "
                f"--dest {folder.parent} when that is not the default data folder)")
    return ("./getdata.sh prepares the standard corpora (see ./getdata.sh --help); any folder "
            "with train.txt, valid.txt and test.txt works")


def _split_files(folder: Path) -> Dict[str, Path]:
    """The three split files of ``folder``, or a DataError naming what is missing."""
    if not folder.exists():
        raise DataError(f"corpus folder {folder} does not exist; {_getdata_hint(folder)}")
    if not folder.is_dir():
        raise DataError(f"corpus path {folder} is not a folder; give the folder that holds "
                        f"train.txt, valid.txt and test.txt")
    files = {split: folder / f"{split}.txt" for split in SPLITS}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise DataError(f"corpus folder {folder} lacks {', '.join(missing)} (it needs train.txt, "
                        f"valid.txt and test.txt); {_getdata_hint(folder)}")
    return files


# --------------------------------------------------------------------------------------------
# Tokenisation


def _line_blocks(f, hasher) -> Iterator[Tuple[int, bytes]]:
    """``(offset, piece)`` over a binary file, each piece cut just after a newline or a space
    byte (the last piece anywhere). Neither byte occurs inside a multi-byte UTF-8 sequence nor
    splits ``\r\n``, and a space between two pieces separates tokens as it would within one, so
    pieces decode, translate line ends and split on their own. Every byte read is fed to
    ``hasher``."""
    pending: List[bytes] = []  # bytes since the last cut (a list: no quadratic re-copying)
    offset = 0
    while True:
        block = f.read(_BLOCK_BYTES)
        if not block:
            break
        hasher.update(block)
        cut = max(block.rfind(b"\n"), block.rfind(b" ")) + 1
        if cut == 0:
            pending.append(block)
            continue
        pending.append(block[:cut])
        piece = b"".join(pending)
        pending = [block[cut:]] if cut < len(block) else []
        yield offset, piece
        offset += len(piece)
    if pending:
        yield offset, b"".join(pending)


def _decode(piece: bytes, offset: int, line: int, path: Path) -> str:
    """``piece`` as text; DataError naming the file, byte offset and line for binary data."""
    nul = piece.find(b"\x00")
    if nul >= 0:
        at_line = line + piece.count(b"\n", 0, nul)
        raise DataError(
            f"{path} contains a NUL byte at byte offset {offset + nul} (line {at_line}): it "
            f"looks like a binary file, not a text corpus; the split files must be UTF-8 text; "
            f"{_getdata_hint(path.parent, again=True)}")
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = piece[e.start:e.end]
        at_line = line + piece.count(b"\n", 0, e.start)
        raise DataError(
            f"{path} is not valid UTF-8: byte(s) {bad.hex(' ')} at byte offset "
            f"{offset + e.start} (line {at_line}) ({e.reason}); "
            f"convert the file to UTF-8 (e.g. with iconv -f latin1 -t utf-8); "
            f"{_getdata_hint(path.parent, again=True)}") from None


def tokenize_file(path: PathLike, dictionary: Dictionary) -> Tuple[torch.Tensor, str]:
    """The ids of ``path`` (1-D ``torch.long``), adding new tokens to ``dictionary``, and the
    SHA-256 of the bytes read.

    Same result as awd-lstm-lm's per-token loop (read as text with universal newlines, each line
    ``split()`` plus ``<eos>``), done a block at a time: line ends become ``<eos>`` words, one
    ``str.split`` cuts the block, and the ids come from one list comprehension over the tokens.
    The vocabulary only changes in blocks that hold a new token.
    """
    path = Path(path)
    w2i = dictionary.word2idx
    eos_line = f" {EOS} "
    hasher = hashlib.sha256()
    chunks: List[np.ndarray] = []
    words = 0  # tokens other than the appended <eos>, to tell an empty split
    line = 1
    ends_in_newline = True
    try:
        with open(path, "rb") as f:
            for offset, piece in _line_blocks(f, hasher):
                start = 0
                if offset == 0 and piece.startswith(_BOM):
                    start = len(_BOM)
                text = _decode(piece[start:], offset + start, line, path)
                line += piece.count(b"\n")
                if "\r" in text:  # universal newlines, as text-mode reading does
                    text = text.replace("\r\n", "\n").replace("\r", "\n")
                if not text:
                    continue
                ends_in_newline = text.endswith("\n")
                tokens = text.replace("\n", eos_line).split()
                words += len(tokens) - text.count("\n")
                try:
                    ids = [w2i[t] for t in tokens]
                except KeyError:  # new tokens: add them in order of first appearance
                    for t in dict.fromkeys(tokens):
                        dictionary.add_word(t)
                    ids = [w2i[t] for t in tokens]
                # int32 while collecting (ids < 2^31), so that the peak memory is 1.5x the result
                chunks.append(np.fromiter(ids, dtype=np.int32, count=len(ids)))
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if not ends_in_newline:  # the last line has no newline but still ends with <eos>
        chunks.append(np.array([dictionary.add_word(EOS)], dtype=np.int32))
    if words <= 0:
        raise DataError(f"{path} has no tokens (the file is empty or holds only whitespace); "
                        f"every split needs text; {_getdata_hint(path.parent, again=True)}")
    return torch.from_numpy(np.concatenate(chunks, dtype=np.int64)), hasher.hexdigest()


def _file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK_BYTES)
            if not block:
                return hasher.hexdigest()
            hasher.update(block)


def _cache_key(digests: Dict[str, str]) -> str:
    record = {"version": CACHE_VERSION, "files": {s: digests[s] for s in SPLITS}}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode("ascii")).hexdigest()


# --------------------------------------------------------------------------------------------
# The cache: <corpus>/.cache/<key>/{train,valid,test}.pt, vocab.txt, meta.json


def _storage_dtype(vocab_size: int) -> str:
    for name, limit in (("uint8", 1 << 8), ("int16", 1 << 15), ("int32", 1 << 31)):
        if vocab_size <= limit:
            return name
    return "int64"


def _read_cache(entry: Path, key: str) -> Tuple[Dictionary, Dict[str, torch.Tensor]]:
    """Load and check a cache entry; any exception means "do not use it"."""
    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    if meta.get("version") != CACHE_VERSION or meta.get("key") != key:
        raise ValueError("its record names another key or cache version")
    vocab_text = (entry / "vocab.txt").read_bytes().decode("utf-8")
    if not vocab_text.endswith("\n"):
        raise ValueError("vocab.txt is truncated")
    idx2word = vocab_text[:-1].split("\n")
    if vocab_fingerprint(idx2word) != meta["fingerprint"]:
        raise ValueError("vocab.txt does not match the fingerprint in meta.json")
    dictionary = Dictionary(idx2word)
    if len(dictionary) != len(idx2word):
        raise ValueError("vocab.txt repeats a token")
    dtype = _CACHE_DTYPES[meta["dtype"]]
    splits = {}
    for split in SPLITS:
        ids = torch.load(entry / f"{split}.pt", map_location="cpu", weights_only=True)
        if not isinstance(ids, torch.Tensor) or ids.dtype != dtype or ids.dim() != 1:
            raise ValueError(f"{split}.pt does not hold a 1-D {meta['dtype']} tensor")
        if ids.numel() != meta["tokens"][split] or ids.numel() == 0:
            raise ValueError(f"{split}.pt holds {ids.numel()} ids, its record says "
                             f"{meta['tokens'][split]}")
        if int(ids.min()) < 0 or int(ids.max()) >= len(dictionary):
            raise ValueError(f"{split}.pt holds ids outside the vocabulary")
        splits[split] = ids.long()
    return dictionary, splits


def _write_cache(root: Path, key: str, corpus: Corpus, digests: Dict[str, str]) -> None:
    """Write the entry ``root/key`` atomically (a temporary folder renamed into place), then
    prune the other entries. Raises OSError (or a torch error) on failure, leaving no partial
    entry behind."""
    root.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root))
    try:
        dtype = _storage_dtype(len(corpus.dictionary))
        tokens = {}
        for split in SPLITS:
            ids = getattr(corpus, split)
            tokens[split] = ids.numel()
            torch.save(ids.to(_CACHE_DTYPES[dtype]), tmp / f"{split}.pt")
        (tmp / "vocab.txt").write_bytes(
            ("\n".join(corpus.dictionary.idx2word) + "\n").encode("utf-8"))
        meta = {"version": CACHE_VERSION, "key": key, "fingerprint": corpus.fingerprint,
                "vocab_size": len(corpus.dictionary), "dtype": dtype, "tokens": tokens,
                "sha256": {s: digests[s] for s in SPLITS}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n",
                                       encoding="utf-8")
        entry = root / key
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "meta.json").is_file():
                raise
            # Another process wrote the same entry in the meantime; theirs is as good as ours.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _prune(root, keep=key)


def _prune(root: Path, keep: str) -> None:
    """Remove the entries of other file contents or cache versions, and temporary folders that
    a crashed writer left (after a day, so as not to race a writer still at work)."""
    now = time.time()
    for child in root.iterdir():
        try:
            if _KEY_RE.match(child.name) and child.name != keep:
                log.info("removing old corpus cache entry %s", child)
                shutil.rmtree(child, ignore_errors=True)
            elif (child.name.startswith(_TMP_PREFIX)
                  and now - child.stat().st_mtime > _STALE_TMP_SECONDS):
                shutil.rmtree(child, ignore_errors=True)
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# Loading


def load_corpus(path: PathLike, cache: bool = True) -> Corpus:
    """Tokenise the corpus folder ``path`` (``train.txt``, ``valid.txt``, ``test.txt``), or load
    it from its cache when the files are unchanged.

    ``cache=False`` neither reads nor writes the cache. Raises DataError for a missing folder or
    file, an empty split, or a file that is not UTF-8 text; nothing is cached then.
    """
    folder = Path(path).expanduser()
    files = _split_files(folder)
    root = folder / CACHE_DIR
    if cache:
        try:
            digests = {s: _file_sha256(p) for s, p in files.items()}
            key = _cache_key(digests)
        except OSError as e:
            raise DataError(f"cannot read corpus {folder}: {e}") from e
        entry = root / key
        if entry.is_dir():
            try:
                dictionary, splits = _read_cache(entry, key)
            except Exception as e:  # noqa: BLE001 - any failure: tokenise instead
                log.warning("corpus cache %s is unreadable or corrupt (%s: %s); tokenising "
                            "the corpus again", entry, type(e).__name__, e)
                shutil.rmtree(entry, ignore_errors=True)  # to be written afresh below
            else:
                log.info("loaded corpus %s from its cache %s (%d tokens in the vocabulary)",
                         folder, entry, len(dictionary))
                return Corpus(dictionary, splits["train"], splits["valid"], splits["test"],
                              vocab_fingerprint(dictionary.idx2word), str(folder),
                              data_fingerprint(digests))

    log.info("tokenising corpus %s", folder)
    start = time.perf_counter()
    dictionary = Dictionary()
    splits, digests = {}, {}
    for split, file in files.items():
        splits[split], digests[split] = tokenize_file(file, dictionary)
    corpus = Corpus(dictionary, splits["train"], splits["valid"], splits["test"],
                    vocab_fingerprint(dictionary.idx2word), str(folder), data_fingerprint(digests))
    log.info("tokenised corpus %s in %.1f s: %d tokens in the vocabulary; train / valid / test "
             "%d / %d / %d tokens", folder, time.perf_counter() - start, len(dictionary),
             len(corpus.train), len(corpus.valid), len(corpus.test))

    if cache:
        # Key the entry on the bytes actually tokenised: a file that changed since it was hashed
        # above is then cached under its new content, never under the old key.
        key = _cache_key(digests)
        try:
            _write_cache(root, key, corpus, digests)
        except Exception as e:  # noqa: BLE001 - the cache is only an optimisation
            log.warning("could not write the corpus cache in %s (%s: %s); the corpus will be "
                        "tokenised again next time", root, type(e).__name__, e)
        else:
            log.info("cached corpus %s in %s", folder, root / key)
    return corpus


def check_vocab(corpus: Corpus, fingerprint: str, where: str,
                ntokens: Optional[int] = None) -> None:
    """DataError unless ``fingerprint`` (stored in a checkpoint) is the corpus's vocabulary.

    ``where`` names the checkpoint; ``ntokens``, the checkpoint's vocabulary size (e.g. the rows
    of its embedding), makes the message more informative when given.
    """
    if not isinstance(fingerprint, str) or not fingerprint:
        raise DataError(f"checkpoint {where} records no vocabulary fingerprint, so it cannot be "
                        f"checked against corpus {corpus.path or '(unnamed)'}")
    if fingerprint != corpus.fingerprint:
        size = f"{ntokens} tokens" if ntokens is not None else "a vocabulary of unknown size"
        raise DataError(
            f"checkpoint {where} was trained on a different vocabulary ({size}) than corpus "
            f"{corpus.path or '(unnamed)'} ({len(corpus.dictionary)} tokens): its token ids "
            f"mean other words; use the corpus it was trained on (fingerprint {fingerprint[:12]} "
            f"vs {corpus.fingerprint[:12]})")


def check_data(corpus: Corpus, fingerprint: Optional[str], where: str) -> None:
    """DataError unless ``fingerprint`` (a checkpoint's ``data_fingerprint``) is the corpus's
    text (:func:`data_fingerprint`): a resumed run must go on on the text it started on. A
    checkpoint without one (written before they were recorded) is let through with a warning."""
    if not fingerprint:
        log.warning("checkpoint %s records no data fingerprint (written before checkpoints "
                    "recorded one): its text is unknown and taken to be corpus %s", where,
                    corpus.path or "(unnamed)")
        return
    if corpus.data and fingerprint != corpus.data:
        raise DataError(f"checkpoint {where} was trained on another text than corpus "
                        f"{corpus.path or '(unnamed)'} (data fingerprint {fingerprint[:12]} vs "
                        f"{corpus.data[:12]}): resume it on the corpus it started on, or start a "
                        f"new run")


# --------------------------------------------------------------------------------------------
# Batching


def batchify(data: torch.Tensor, batch_size: int, device=None) -> torch.Tensor:
    """Cut the id stream into ``batch_size`` contiguous columns: a ``(nbatch, batch_size)``
    tensor whose column ``b`` is ``data[b * nbatch:(b + 1) * nbatch]``. The remainder of
    ``len(data) % batch_size`` tokens is dropped. Moved to ``device`` when given."""
    if data.dim() != 1:
        raise DataError(f"batchify expects a 1-D id stream, got shape {tuple(data.shape)}")
    try:
        if isinstance(batch_size, bool):
            raise TypeError
        batch_size = operator.index(batch_size)  # accepts NumPy integers, not 2.0
    except TypeError:
        raise DataError(f"batch size must be a positive integer, got {batch_size!r}") from None
    if batch_size < 1:
        raise DataError(f"batch size must be a positive integer, got {batch_size!r}")
    nbatch = data.size(0) // batch_size
    if nbatch < 2:
        raise DataError(
            f"batch size {batch_size} is too large for {data.size(0)} tokens: each of the "
            f"columns needs at least 2 tokens (an input and its target), so the batch size can "
            f"be at most {data.size(0) // 2}; use a smaller batch size")
    data = data[: nbatch * batch_size].view(batch_size, nbatch).t().contiguous()  # (nbatch, B)
    return data if device is None else data.to(device)


def get_batch(source: torch.Tensor, i: int, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The inputs ``source[i:i+L]`` (``(L, B)``) and their targets, the next token of each,
    flattened to ``(L * B,)``; ``L = min(seq_len, len(source) - 1 - i)``, so the last batch of a
    pass may be shorter."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    if not 0 <= i < len(source) - 1:
        raise IndexError(f"batch start {i} is outside [0, {len(source) - 1}) for a source of "
                         f"{len(source)} rows")
    seq_len = min(seq_len, len(source) - 1 - i)
    data = source[i:i + seq_len]  # (L, B)
    target = source[i + 1:i + 1 + seq_len].reshape(-1)  # (L * B,)
    return data, target
