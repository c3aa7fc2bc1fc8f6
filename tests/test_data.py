"""awd_nonnormal.data: vocabulary and ids, batching, the content-keyed corpus cache, errors.

Every corpus is a few lines written to ``tmp_path``. A plain per-line loop (awd-lstm-lm's rule:
read as text, ``line.split() + ['<eos>']``) is the reference for the block-wise tokeniser.
"""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from awd_nonnormal import data
from awd_nonnormal.data import (
    DataError, Dictionary, batchify, check_vocab, get_batch, load_corpus, vocab_fingerprint,
)

SMALL = {"train": "a b c\nb a\n", "valid": "c d\n", "test": "e a\n"}


def write_corpus(folder: Path, texts=SMALL, encoding="utf-8") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        body = text if isinstance(text, bytes) else text.encode(encoding)
        (folder / f"{split}.txt").write_bytes(body)
    return folder


def reference_ids(folder: Path):
    """awd-lstm-lm's per-token loop: the ids of each split and the vocabulary."""
    w2i, out = {}, {}
    for split in data.SPLITS:
        ids = []
        with open(folder / f"{split}.txt", encoding="utf-8") as f:
            for line in f:
                for w in line.split() + ["<eos>"]:
                    ids.append(w2i.setdefault(w, len(w2i)))
        out[split] = ids
    return out, list(w2i)


def decode(corpus, ids):
    return " ".join(corpus.dictionary.idx2word[i] for i in ids.tolist())


def cache_entries(folder: Path):
    root = folder / data.CACHE_DIR
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def assert_same(a, b):
    assert a.dictionary.idx2word == b.dictionary.idx2word
    assert a.dictionary.word2idx == b.dictionary.word2idx
    assert a.fingerprint == b.fingerprint
    for split in data.SPLITS:
        x, y = getattr(a, split), getattr(b, split)
        assert x.dtype == y.dtype == torch.long and x.dim() == 1
        assert torch.equal(x, y)


# --------------------------------------------------------------------------------------------
# Vocabulary and ids


def test_ids_in_order_of_first_appearance_and_decode_back(tmp_path):
    c = load_corpus(write_corpus(tmp_path / "small"))
    assert c.dictionary.idx2word == ["a", "b", "c", "<eos>", "d", "e"]
    assert c.dictionary.word2idx == {w: i for i, w in enumerate(c.dictionary.idx2word)}
    assert len(c.dictionary) == 6
    assert c.train.tolist() == [0, 1, 2, 3, 1, 0, 3]
    assert c.valid.tolist() == [2, 4, 3]
    assert c.test.tolist() == [5, 0, 3]
    for split in data.SPLITS:
        ids = getattr(c, split)
        assert ids.dtype == torch.long and ids.dim() == 1
        assert decode(c, ids) == SMALL[split].replace("\n", " <eos> ").strip()


def test_dictionary_add_word():
    d = Dictionary()
    assert d.add_word("x") == 0 and d.add_word("y") == 1 and d.add_word("x") == 0
    assert len(d) == 2 and d.idx2word == ["x", "y"] and d.word2idx == {"x": 0, "y": 1}


@pytest.mark.parametrize("block_bytes", [None, 5])
def test_matches_reference_loop_on_awkward_text(tmp_path, monkeypatch, block_bytes):
    """Blank lines, tabs, form feeds, non-breaking spaces, CR and CRLF line ends, a last line
    without newline, multi-byte characters, a literal <eos>; also with tiny read blocks, so
    that blocks end inside characters and between CR and LF."""
    if block_bytes:
        monkeypatch.setattr(data, "_BLOCK_BYTES", block_bytes)
    texts = {
        "train": "  the cat\tsat \n\n\x0con the\xa0mat\r\nnaïve 日本 café\rlast <eos> line",
        "valid": "\n\n  \n the dog \r\n",
        "test": "tail 日本\n\n",
    }
    folder = write_corpus(tmp_path / "awkward", texts)
    c = load_corpus(folder, cache=False)
    ref, vocab = reference_ids(folder)
    assert c.dictionary.idx2word == vocab
    for split in data.SPLITS:
        assert getattr(c, split).tolist() == ref[split], split


def test_long_runs_across_tiny_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_BLOCK_BYTES", 3)
    texts = {"train": "abcdefghijklmnop qrstuvwxyz日本語日本語\r\n  x ",
             "valid": "abcdefghijklmnop", "test": "\r\r\n x\n"}
    folder = write_corpus(tmp_path / "runs", texts)
    c = load_corpus(folder, cache=False)
    ref, vocab = reference_ids(folder)
    assert c.dictionary.idx2word == vocab
    for split in data.SPLITS:
        assert getattr(c, split).tolist() == ref[split], split


def test_last_line_without_newline_gets_eos(tmp_path):
    c = load_corpus(write_corpus(tmp_path / "c", {"train": "x y\nz", "valid": "x",
                                                  "test": "y\n"}), cache=False)
    assert decode(c, c.train) == "x y <eos> z <eos>"
    assert decode(c, c.valid) == "x <eos>"


def test_utf8_byte_order_mark_is_dropped(tmp_path):
    c = load_corpus(write_corpus(tmp_path / "c", {"train": b"\xef\xbb\xbfhello world\n",
                                                  "valid": "hello\n", "test": "world\n"}),
                    cache=False)
    assert c.dictionary.idx2word == ["hello", "world", "<eos>"]


def test_char_level_corpus(tmp_path):
    texts = {"train": "t h e _ c a t\nd o g\n", "valid": "c a t _ d o g\n", "test": "t o e\n"}
    c = load_corpus(write_corpus(tmp_path / "pennchar", texts))
    assert c.dictionary.idx2word == ["t", "h", "e", "_", "c", "a", "<eos>", "d", "o", "g"]
    assert all(len(w) == 1 for w in c.dictionary.idx2word if w != "<eos>")
    assert decode(c, c.valid) == "c a t _ d o g <eos>"


def test_enwik8_style_corpus(tmp_path):
    raw = "Wiki\u00e9 <page>\n\n[[x]]\n".encode("utf-8")
    lines = raw.split(b"\n")
    text = "\n".join(" ".join(str(b) for b in line) for line in lines)
    c = load_corpus(write_corpus(tmp_path / "enwik8", {"train": text, "valid": "87 105\n",
                                                       "test": "195 169\n"}))
    assert c.dictionary.idx2word[:3] == ["87", "105", "107"]
    assert all(w.isdigit() and 0 <= int(w) < 256 for w in c.dictionary.idx2word if w != "<eos>")
    # decoding the ids gives back the bytes, <eos> standing for each newline
    decoded = bytes(10 if w == "<eos>" else int(w)
                    for w in (c.dictionary.idx2word[i] for i in c.train.tolist()))
    assert decoded == raw
    assert load_corpus(tmp_path / "enwik8").fingerprint == c.fingerprint  # from the cache


# --------------------------------------------------------------------------------------------
# Batching


def test_batchify_shape_and_columns_are_contiguous_slices():
    stream = torch.arange(23)
    b = batchify(stream, 4)
    assert b.shape == (5, 4) and b.is_contiguous() and b.dtype == stream.dtype
    for col in range(4):
        assert torch.equal(b[:, col], stream[col * 5:(col + 1) * 5])  # remainder 20..22 dropped
    assert batchify(stream, 4, device="cpu").device.type == "cpu"
    assert batchify(stream, 11).shape == (2, 11)


def test_batchify_accepts_numpy_integers():
    assert batchify(torch.arange(23), np.int64(4)).shape == (5, 4)


@pytest.mark.parametrize("bsz", [24, 12, 0, -1, 2.0, True, "4"])
def test_batchify_rejects_bad_batch_sizes(bsz):
    with pytest.raises(DataError, match="batch size"):
        batchify(torch.arange(23), bsz)


def test_batchify_rejects_2d():
    with pytest.raises(DataError, match="1-D"):
        batchify(torch.zeros(4, 4, dtype=torch.long), 2)


def test_get_batch_shapes_targets_and_short_last_batch():
    source = batchify(torch.arange(30), 3)  # (10, 3)
    data_, target = get_batch(source, 0, 4)
    assert data_.shape == (4, 3) and target.shape == (12,)
    assert torch.equal(target, source[1:5].reshape(-1))
    assert torch.equal(target.view(4, 3), data_ + 1)  # the next token of each column
    seen = []
    for i in range(0, len(source) - 1, 4):
        x, y = get_batch(source, i, 4)
        assert torch.equal(y.view(-1, 3), source[i + 1:i + 1 + len(x)])
        seen.append(len(x))
    assert seen == [4, 4, 1]  # 9 (input, target) rows; the last batch is shorter
    with pytest.raises(IndexError):
        get_batch(source, 9, 4)


# --------------------------------------------------------------------------------------------
# Cache


def test_second_load_uses_the_cache(tmp_path, monkeypatch, caplog):
    folder = write_corpus(tmp_path / "penn")
    with caplog.at_level(logging.INFO, logger="awd_nonnormal.data"):
        first = load_corpus(folder)
    assert any("tokenising corpus" in r.getMessage() for r in caplog.records)
    assert len(cache_entries(folder)) == 1

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised although the cache is valid")

    monkeypatch.setattr(data, "tokenize_file", no_tokenising)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="awd_nonnormal.data"):
        second = load_corpus(folder)
    assert any("from its cache" in r.getMessage() for r in caplog.records)
    assert_same(first, second)


def test_cache_false_neither_reads_nor_writes(tmp_path):
    folder = write_corpus(tmp_path / "c")
    load_corpus(folder, cache=False)
    assert not (folder / data.CACHE_DIR).exists()


def test_same_size_edit_invalidates_and_prunes(tmp_path, caplog):
    folder = write_corpus(tmp_path / "c")
    old = load_corpus(folder)
    (old_entry,) = cache_entries(folder)
    stat = (folder / "valid.txt").stat()
    (folder / "valid.txt").write_text("c z\n", encoding="utf-8")  # was "c d\n": same size
    os.utime(folder / "valid.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and same mtime
    with caplog.at_level(logging.INFO, logger="awd_nonnormal.data"):
        new = load_corpus(folder)
    assert any("tokenising corpus" in r.getMessage() for r in caplog.records)
    assert "z" in new.dictionary.word2idx and "d" not in new.dictionary.word2idx
    assert new.fingerprint != old.fingerprint
    assert decode(new, new.valid) == "c z <eos>"
    (entry,) = cache_entries(folder)  # the old entry was pruned
    assert entry != old_entry
    assert_same(new, load_corpus(folder))


def corrupt_pt(entry):
    (entry / "train.pt").write_bytes(b"this is not a torch file")


def truncate_pt(entry):
    body = (entry / "valid.pt").read_bytes()
    (entry / "valid.pt").write_bytes(body[: len(body) // 2])


def out_of_range_ids(entry):
    torch.save(torch.tensor([0, 1, 200], dtype=torch.uint8), entry / "test.pt")


def wrong_length(entry):
    torch.save(torch.tensor([0, 1], dtype=torch.uint8), entry / "test.pt")


def reordered_vocab(entry):
    words = (entry / "vocab.txt").read_text(encoding="utf-8").split("\n")
    words[0], words[1] = words[1], words[0]
    (entry / "vocab.txt").write_text("\n".join(words), encoding="utf-8")


def bad_meta(entry):
    (entry / "meta.json").write_text("{not json", encoding="utf-8")


def missing_file(entry):
    (entry / "vocab.txt").unlink()


def pickled_object(entry):
    torch.save({"tensor": torch.arange(3), "obj": Dictionary(["x"])}, entry / "train.pt")


@pytest.mark.parametrize("damage", [corrupt_pt, truncate_pt, out_of_range_ids, wrong_length,
                                    reordered_vocab, bad_meta, missing_file, pickled_object])
def test_corrupt_cache_falls_back_to_tokenising(tmp_path, caplog, damage):
    folder = write_corpus(tmp_path / "c")
    good = load_corpus(folder)
    (entry,) = cache_entries(folder)
    damage(folder / data.CACHE_DIR / entry)
    with caplog.at_level(logging.INFO, logger="awd_nonnormal.data"):
        again = load_corpus(folder)
    assert any(r.levelno == logging.WARNING and "corrupt" in r.getMessage()
               for r in caplog.records)
    assert_same(good, again)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="awd_nonnormal.data"):
        assert_same(good, load_corpus(folder))  # the entry was rewritten
    assert any("from its cache" in r.getMessage() for r in caplog.records)
    assert cache_entries(folder) == [entry]


def test_cache_is_plain_data_loadable_with_weights_only(tmp_path):
    odd = ["back\\slash", "\\n", "naïve", "日本語", "emoji\U0001F600", "quote\"'", "<unk>",
           "{json}", "tab\\t", "#", "é"]
    folder = write_corpus(tmp_path / "odd", {"train": " ".join(odd) + "\n", "valid": "é x\n",
                                             "test": "\\ y\n"})
    c = load_corpus(folder)
    (entry,) = cache_entries(folder)
    entry = folder / data.CACHE_DIR / entry
    assert sorted(p.name for p in entry.iterdir()) == \
        ["meta.json", "test.pt", "train.pt", "valid.pt", "vocab.txt"]
    for split in data.SPLITS:
        ids = torch.load(entry / f"{split}.pt", map_location="cpu", weights_only=True)
        assert isinstance(ids, torch.Tensor) and ids.dim() == 1
        assert torch.equal(ids.long(), getattr(c, split))
    vocab = (entry / "vocab.txt").read_bytes().decode("utf-8").split("\n")[:-1]
    assert vocab == c.dictionary.idx2word and vocab[:len(odd)] == odd
    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    assert meta["fingerprint"] == c.fingerprint and meta["version"] == data.CACHE_VERSION
    assert_same(c, load_corpus(folder))  # the odd tokens round-trip through the cache


def test_cache_file_in_the_way_still_loads(tmp_path, caplog):
    folder = write_corpus(tmp_path / "c")
    (folder / data.CACHE_DIR).write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="awd_nonnormal.data"):
        c = load_corpus(folder)
    assert any("could not write the corpus cache" in r.getMessage() for r in caplog.records)
    assert c.train.tolist() == [0, 1, 2, 3, 1, 0, 3]


def test_unwritable_folder_still_loads(tmp_path, monkeypatch, caplog):
    folder = write_corpus(tmp_path / "c")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(folder / data.CACHE_DIR))

    monkeypatch.setattr(data.tempfile, "mkdtemp", denied)
    with caplog.at_level(logging.WARNING, logger="awd_nonnormal.data"):
        c = load_corpus(folder)
    assert any("could not write the corpus cache" in r.getMessage() for r in caplog.records)
    assert len(c.dictionary) == 6
    assert cache_entries(folder) == []  # the .cache folder may exist, but holds nothing


def test_failed_cache_write_leaves_nothing(tmp_path, monkeypatch):
    folder = write_corpus(tmp_path / "c")
    real_save = torch.save
    calls = []

    def flaky_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(data.torch, "save", flaky_save)
    load_corpus(folder)
    assert cache_entries(folder) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="needs POSIX permissions and a non-root user")
def test_read_only_folder_still_loads(tmp_path):
    folder = write_corpus(tmp_path / "c")
    folder.chmod(0o555)
    try:
        c = load_corpus(folder)
    finally:
        folder.chmod(0o755)
    assert len(c.dictionary) == 6 and not (folder / data.CACHE_DIR).exists()


# --------------------------------------------------------------------------------------------
# Fingerprint and check_vocab


def test_fingerprint_stable_and_specific(tmp_path):
    a = load_corpus(write_corpus(tmp_path / "a"))
    assert a.fingerprint == vocab_fingerprint(a.dictionary.idx2word)
    assert len(a.fingerprint) == 64 and int(a.fingerprint, 16) >= 0
    assert load_corpus(tmp_path / "a").fingerprint == a.fingerprint  # cached
    assert load_corpus(tmp_path / "a", cache=False).fingerprint == a.fingerprint
    b = load_corpus(write_corpus(tmp_path / "b", {**SMALL, "test": "e a f\n"}))
    assert b.fingerprint != a.fingerprint
    # same words, other order: other ids, so another fingerprint
    assert vocab_fingerprint(["a", "b"]) != vocab_fingerprint(["b", "a"])
    assert vocab_fingerprint(["ab"]) != vocab_fingerprint(["a", "b"])


def test_check_vocab(tmp_path):
    a = load_corpus(write_corpus(tmp_path / "a"))
    b = load_corpus(write_corpus(tmp_path / "b", {**SMALL, "test": "e a f\n"}))
    check_vocab(a, a.fingerprint, "runs/a.pt")
    with pytest.raises(DataError) as e:
        check_vocab(a, b.fingerprint, "runs/b.pt", ntokens=len(b.dictionary))
    msg = str(e.value)
    assert "checkpoint runs/b.pt was trained on a different vocabulary (7 tokens)" in msg
    assert f"corpus {tmp_path / 'a'} (6 tokens)" in msg
    with pytest.raises(DataError, match="runs/b.pt"):
        check_vocab(a, b.fingerprint, "runs/b.pt")
    with pytest.raises(DataError, match="no vocabulary fingerprint"):
        check_vocab(a, None, "runs/old.pt")


# --------------------------------------------------------------------------------------------
# Errors: each a DataError that says what and where, and nothing cached


def assert_no_cache(folder: Path):
    assert not (folder / data.CACHE_DIR).exists()


def test_missing_known_folder_hints_getdata_name(tmp_path):
    with pytest.raises(DataError) as e:
        load_corpus(tmp_path / "penn")
    assert str(tmp_path / "penn") in str(e.value) and "./getdata.sh penn" in str(e.value)
    with pytest.raises(DataError, match=r"\./getdata\.sh wikitext-103"):
        load_corpus(tmp_path / "data" / "wikitext-103")


def test_missing_other_folder_hints_generic_getdata(tmp_path):
    with pytest.raises(DataError) as e:
        load_corpus(tmp_path / "mycorpus")
    msg = str(e.value)
    assert str(tmp_path / "mycorpus") in msg and "./getdata.sh" in msg
    assert "./getdata.sh mycorpus" not in msg


def test_path_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        load_corpus(tmp_path / "f")


def test_missing_split_file(tmp_path):
    folder = write_corpus(tmp_path / "pennchar", {"train": "a\n", "test": "a\n"})
    with pytest.raises(DataError) as e:
        load_corpus(folder)
    assert "valid.txt" in str(e.value) and "./getdata.sh pennchar" in str(e.value)
    assert str(folder) in str(e.value)
    assert_no_cache(folder)


@pytest.mark.parametrize("empty", ["", " \n\t\n  \r\n", "\n"])
@pytest.mark.parametrize("split", data.SPLITS)
def test_empty_split(tmp_path, split, empty):
    folder = write_corpus(tmp_path / "wikitext-2", {**SMALL, split: empty})
    with pytest.raises(DataError, match="no tokens") as e:
        load_corpus(folder)
    assert str(folder / f"{split}.txt") in str(e.value)
    assert "./getdata.sh --force wikitext-2" in str(e.value)
    assert_no_cache(folder)


@pytest.mark.parametrize("block_bytes", [None, 4])
def test_invalid_utf8_names_file_and_offset(tmp_path, monkeypatch, block_bytes):
    if block_bytes:
        monkeypatch.setattr(data, "_BLOCK_BYTES", block_bytes)
    body = "café ok\nsecond line \xff here\n".encode("latin-1")
    folder = write_corpus(tmp_path / "c", {**SMALL, "valid": body})
    with pytest.raises(DataError) as e:
        load_corpus(folder)
    msg = str(e.value)
    assert str(folder / "valid.txt") in msg and "UTF-8" in msg
    bad = body.index(b"\xe9")
    assert f"byte offset {bad} (line 1)" in msg
    assert_no_cache(folder)


def test_invalid_utf8_offset_in_later_line(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_BLOCK_BYTES", 3)
    body = "ok\nfine\nbad \xff\n".encode("latin-1")
    folder = write_corpus(tmp_path / "c", {**SMALL, "test": body})
    bad = body.index(b"\xff")
    with pytest.raises(DataError, match=rf"byte offset {bad} \(line 3\)"):
        load_corpus(folder)
    assert_no_cache(folder)


def test_nul_bytes_mean_binary(tmp_path):
    body = b"valid text\n\x00\x01\x02binary\n"
    folder = write_corpus(tmp_path / "c", {**SMALL, "train": body})
    with pytest.raises(DataError, match="NUL byte") as e:
        load_corpus(folder)
    assert str(folder / "train.txt") in str(e.value) and "byte offset 11" in str(e.value)
    assert "binary" in str(e.value) and "./getdata.sh --force" not in str(e.value)
    assert_no_cache(folder)


def test_error_after_a_valid_cache_leaves_it_alone(tmp_path):
    folder = write_corpus(tmp_path / "c")
    load_corpus(folder)
    entries = cache_entries(folder)
    (folder / "test.txt").write_text("   \n", encoding="utf-8")
    with pytest.raises(DataError, match="no tokens"):
        load_corpus(folder)
    assert cache_entries(folder) == entries  # no new (partial) entry
