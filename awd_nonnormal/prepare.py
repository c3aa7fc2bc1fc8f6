"""Dataset preparation: the Python side of ``getdata.sh``.

``getdata.sh`` fetches the archives (download, cache, or a local mirror) and calls this module for
everything that reads them: integrity checks of a finished download, extraction of the corpus
files, the enwik8 split, the MNIST IDX checks, and the completion stamps.

The module only uses the standard library, so that preparation works with any Python 3.8+
(no torch). ``getdata.sh`` runs it as a script (``python awd_nonnormal/prepare.py ...``), which
does not import the package ``__init__``; ``python -m awd_nonnormal.prepare ...`` works as well.

Every output is written to ``<name>.part`` in its target folder and renamed into place when
complete. A folder counts as prepared only when its stamp file (:data:`STAMP`, written last)
exists, names the same parameters, and every file it lists has the recorded size.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import gzip
import hashlib
import json
import logging
import lzma
import os
import random
import shutil
import struct
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

STAMP = ".complete"

# enwik8: the last 2 x 5,000,000 bytes are valid and test (Mahoney's split, as in awd-lstm-lm).
ENWIK8_TEST_BYTES = 5_000_000
ENWIK8_MEMBER = "enwik8"
CHUNK_BYTES = 1 << 20

# MNIST: IDX magic numbers (big-endian int32: 0x0000 0803 = ubyte, 3 dims; 0x0000 0801 = ubyte,
# 1 dim), image size and the item counts of the real data set.
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
MNIST_ROWS = MNIST_COLS = 28
MNIST_ITEMS = {"train": 60_000, "t10k": 10_000}
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": ("train", "images"),
    "train-labels-idx1-ubyte.gz": ("train", "labels"),
    "t10k-images-idx3-ubyte.gz": ("t10k", "images"),
    "t10k-labels-idx1-ubyte.gz": ("t10k", "labels"),
}


class PrepareError(Exception):
    """A problem with an input file; the message says which file and what is wrong."""


# --------------------------------------------------------------------------------------------
# Atomic outputs and completion stamps


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open ``<path>.part`` for writing; rename it to ``path`` on success, delete it on error.

    Text modes write ASCII with ``\n`` line ends on every platform.
    """
    path = Path(path)
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {} if "b" in mode else {"encoding": "ascii", "newline": ""}
    try:
        with open(part, mode, **kwargs) as f:
            yield f
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, path)


def write_stamp(folder: Path, files: Sequence[str], params: Optional[Mapping] = None,
                source: Sequence[str] = ()) -> Path:
    """Write the completion stamp of ``folder``, listing ``files`` with their sizes. Call last."""
    folder = Path(folder)
    record = {
        "files": {name: (folder / name).stat().st_size for name in files},
        "params": dict(params or {}),
        "source": list(source),
    }
    stamp = folder / STAMP
    with atomic_write(stamp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
    return stamp


def clear_stamp(folder: Path) -> None:
    """Remove the stamp before (re)preparing ``folder``, so a half-done folder is never trusted."""
    (Path(folder) / STAMP).unlink(missing_ok=True)


def complete_params(folder: Path) -> Optional[Dict]:
    """The parameters ``folder`` was prepared with, when its stamp is readable and every file it
    lists is intact; None otherwise."""
    folder = Path(folder)
    try:
        record = json.loads((folder / STAMP).read_text(encoding="ascii"))
        files = record["files"]
        if not files or not all((folder / name).is_file() and
                                (folder / name).stat().st_size == size
                                for name, size in files.items()):
            return None
        return dict(record.get("params", {}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def is_complete(folder: Path, params: Optional[Mapping] = None) -> bool:
    """True when ``folder`` has a readable stamp with the same ``params`` and intact files."""
    return complete_params(folder) == dict(params or {})


#: The getdata.sh options behind the stamp parameters (for messages).
PARAM_OPTIONS = {"test_bytes": "--enwik8-test-bytes", "items": "--mnist-items"}

# `prepare check` exit codes
CHECK_COMPLETE, CHECK_TODO, CHECK_CONFLICT = 0, 1, 3


def check_folder(folder: Path, params: Optional[Mapping] = None) -> int:
    """:data:`CHECK_COMPLETE` when ``folder`` is complete with ``params``; :data:`CHECK_CONFLICT`
    (and an error logged) when it is complete with other parameters, which a rerun must not
    destroy unasked; :data:`CHECK_TODO` otherwise."""
    found = complete_params(folder)
    params = dict(params or {})
    if found is None:
        return CHECK_TODO
    if found == params:
        return CHECK_COMPLETE
    diff = ", ".join(f"{PARAM_OPTIONS.get(k, k)} {_show(found.get(k))} there, {_show(params.get(k))} "
                     f"now" for k in sorted(set(found) | set(params)) if found.get(k) != params.get(k))
    log.error("error: %s is already prepared with other settings (%s); rerun with the same "
              "settings to keep it, or add --force to prepare it again", folder, diff)
    return CHECK_CONFLICT


def _show(value) -> str:
    if isinstance(value, dict):  # MNIST item counts
        return ",".join(str(value[k]) for k in ("train", "t10k") if k in value) or "any"
    return "(none)" if value is None else str(value)


# --------------------------------------------------------------------------------------------
# Archive integrity: every archive is read completely, and checked against its published SHA-256
# where one is known, before anything is extracted from it


#: SHA-256 of the original archives, as published by others who downloaded them from the original
#: sites: enwik8.zip by Hugging Face datasets (``enwik8/dataset_infos.json``, 36,445,475 bytes),
#: the WikiText zips by the Julia package LanguageModelingDatasets.jl (its DataDeps
#: registrations, ``src/datasets/wikitext.jl``), the four MNIST files by TensorFlow Datasets
#: (``url_checksums/mnist.txt``). Each agrees with other independent copies of the same sum.
#: PTB's simple-examples.tgz has no published SHA-256 that we could find: integrity check only.
PUBLISHED_SHA256 = {
    "enwik8.zip": "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
    "wikitext-2-v1.zip": "92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c",
    "wikitext-103-v1.zip": "242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590",
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

# file name ending -> (archive kind, stream module); the longest matching ending wins
_KINDS = {".zip": ("zip", None), ".tgz": ("tar", gzip), ".tar.gz": ("tar", gzip),
          ".tbz2": ("tar", bz2), ".tar.bz2": ("tar", bz2), ".txz": ("tar", lzma),
          ".tar.xz": ("tar", lzma), ".gz": ("stream", gzip), ".bz2": ("stream", bz2),
          ".xz": ("stream", lzma)}
# what a damaged file raises while it is read (zlib.error: a bad deflate stream inside a zip;
# RuntimeError: a flipped zip flag bit that marks a member encrypted or of an unknown method)
_READ_ERRORS = (OSError, EOFError, ValueError, RuntimeError, struct.error, zipfile.BadZipFile,
                zlib.error, tarfile.TarError, lzma.LZMAError)


def archive_kind(name: str):
    """``(kind, stream module)`` of an archive named ``name``: kind ``zip``, ``tar`` (compressed
    with the module's format) or ``stream`` (one compressed file)."""
    for ending in sorted(_KINDS, key=len, reverse=True):
        if name.endswith(ending):
            return _KINDS[ending]
    raise PrepareError(f"{name}: unknown archive kind (expected one of {', '.join(_KINDS)})")


def load_sums(path: Optional[Path]) -> Mapping[str, str]:
    """The SHA-256 table to check archives against: :data:`PUBLISHED_SHA256`, or the JSON object
    ``{file name: sha256}`` in ``path`` instead (archives it does not name are not sum-checked)."""
    if path is None:
        return PUBLISHED_SHA256
    try:
        sums = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PrepareError(f"{path}: cannot read the checksum file ({e})") from None
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise PrepareError(f"{path}: expected a JSON object of file name -> SHA-256 hex digest")
    return {k: v.lower() for k, v in sums.items()}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def verify_archive(path: Path, name: Optional[str] = None,
                   sums: Optional[Mapping[str, str]] = None) -> None:
    """Check an archive completely before anything is taken from it; ``name`` (default: the file
    name) decides the kind and the published sum (``sums``, default :data:`PUBLISHED_SHA256`).

    A file with a published SHA-256 must match it. Then the whole archive is read: zip: every
    member's CRC-32; tar.gz / tar.bz2 / tar.xz: the compressed stream to its end (its CRC and
    length), then the tar structure; .gz / .bz2 / .xz: the stream to its end. Raises
    :class:`PrepareError` naming the file as corrupt.
    """
    path = Path(path)
    name = name or path.name
    sums = PUBLISHED_SHA256 if sums is None else sums
    kind, stream = archive_kind(name)
    if not path.is_file():
        raise PrepareError(f"{path}: no such file")
    want = sums.get(name)
    if want is not None:
        log.info("checking %s against its published SHA-256", name)
        got = sha256_of(path)
        if got != want:
            source = "published" if sums is PUBLISHED_SHA256 else "listed"
            raise PrepareError(f"{path}: corrupt or not the original {name}: its SHA-256 is "
                               f"{got}, the {source} one {want}; delete it and fetch it again")
    log.info("checking %s", name)
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
                listed = len(zf.infolist())
            if bad is not None:
                raise PrepareError(f"{path}: corrupt {name} (member {bad!r} fails its CRC check)")
            entries = _zip_entries(path)
            if entries is not None and entries != listed:
                raise PrepareError(f"{path}: corrupt {name} (its directory lists {listed} "
                                   f"members, its end record {entries})")
        else:
            with stream.open(path, "rb") as f:
                _drain(f)
            if kind == "tar":
                with tarfile.open(path, f"r:{_TAR_MODES[stream]}") as tf:
                    for member in tf:
                        if member.isfile():
                            with tf.extractfile(member) as f:
                                _drain(f)
    except _READ_ERRORS as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PrepareError(f"{path}: corrupt {name} ({detail}); if it is a cached download, "
                           f"delete it and run again") from None


_TAR_MODES = {gzip: "gz", bz2: "bz2", lzma: "xz"}


def _zip_entries(path: Path) -> Optional[int]:
    """The member count in a zip's end-of-central-directory record (PKWARE APPNOTE 4.3.16), or
    None for a zip64 archive. A damaged directory entry can hide the members after it from
    ``zipfile``; the count in the end record does not change with it."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - (22 + 0xFFFF)))  # the record (22 bytes) and a comment of <= 64 KiB
        tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) < at + 22:
        raise PrepareError(f"{path}: corrupt zip archive (no end-of-directory record)")
    total = struct.unpack("<H", tail[at + 10:at + 12])[0]
    return None if total == 0xFFFF else total


def _drain(f: BinaryIO) -> int:
    n = 0
    while True:
        block = f.read(CHUNK_BYTES)
        if not block:
            return n
        n += len(block)


# --------------------------------------------------------------------------------------------
# Corpus extraction (PTB from simple-examples.tgz, WikiText from its zip)


def _norm(member: str) -> str:
    while member.startswith("./"):
        member = member[2:]
    return member


def extract_members(archive: Path, dest: Path, mapping: Sequence[Tuple[str, str]],
                    sums: Optional[Mapping[str, str]] = None) -> List[str]:
    """Copy archive members to files in ``dest``: ``mapping`` is ``[(member, out_name), ...]``.

    The archive is verified completely first (:func:`verify_archive`, with ``sums``), so a
    corrupt one leaves ``dest`` untouched. Works on zip and compressed tar archives (the file name
    decides which), matches member names with or without a leading ``./``, writes each output
    atomically, and then writes the stamp. Returns the output names.
    """
    archive, dest = Path(archive), Path(dest)
    verify_archive(archive, sums=sums)
    kind, stream = archive_kind(archive.name)
    wanted = {_norm(m): out for m, out in mapping}
    found = set()

    def copy(member_name: str, src: BinaryIO) -> None:
        out = wanted[_norm(member_name)]
        log.info("%s: %s -> %s", archive.name, member_name, dest / out)
        with atomic_write(dest / out) as dst:
            shutil.copyfileobj(src, dst, CHUNK_BYTES)
        found.add(_norm(member_name))

    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                names = {_norm(i.filename) for i in zf.infolist() if not i.is_dir()}
                _require(archive, wanted, names)
                dest.mkdir(parents=True, exist_ok=True)
                clear_stamp(dest)
                for info in zf.infolist():
                    if _norm(info.filename) in wanted and not info.is_dir():
                        with zf.open(info) as src:
                            copy(info.filename, src)
        elif kind == "tar":
            with tarfile.open(archive, f"r:{_TAR_MODES[stream]}") as tf:
                members = [m for m in tf.getmembers() if m.isfile()]
                _require(archive, wanted, {_norm(m.name) for m in members})
                dest.mkdir(parents=True, exist_ok=True)
                clear_stamp(dest)
                for member in members:
                    if _norm(member.name) in wanted:
                        with tf.extractfile(member) as src:
                            copy(member.name, src)
        else:
            raise PrepareError(f"{archive}: not a zip or tar archive")
    except _READ_ERRORS as e:
        raise PrepareError(f"{archive}: corrupt archive ({e}); if it is a cached download, "
                           f"delete it and run again") from e
    outs = [out for _, out in mapping]
    write_stamp(dest, outs, source=[archive.name])
    return outs


def _require(archive: Path, wanted: Mapping[str, str], names: Iterable[str]) -> None:
    missing = sorted(set(wanted) - set(names))
    if missing:
        raise PrepareError(f"{archive}: not the expected archive: it has no {', '.join(missing)}")


# --------------------------------------------------------------------------------------------
# enwik8


# Decimal text of every byte value; the newline byte is handled separately (it ends a line).
_BYTE_TEXT = [str(b) for b in range(256)]


def encode_bytes(chunks: Iterable[bytes], out, at_line_start: bool = True) -> bool:
    """Write byte chunks as decimal tokens: one space between values, byte 10 as a line break.

    Chunk boundaries may fall anywhere (inside a line). Returns whether the output ends at the
    start of a line, to be passed back in when continuing the same stream.
    """
    for chunk in chunks:
        for i, piece in enumerate(chunk.split(b"\n")):
            if i:
                out.write("\n")
                at_line_start = True
            if piece:
                if not at_line_start:
                    out.write(" ")
                out.write(" ".join(map(_BYTE_TEXT.__getitem__, piece)))
                at_line_start = False
    return at_line_start


def decode_text(text: str) -> bytes:
    """Inverse of :func:`encode_bytes` (used by the tests and handy for checking a split)."""
    return b"\n".join(bytes(int(t) for t in line.split()) for line in text.split("\n"))


def enwik8_splits(total: int, test_bytes: int = ENWIK8_TEST_BYTES) -> Dict[str, Tuple[int, int]]:
    """Byte ranges ``[start, end)`` of train / valid / test: the last 2 x ``test_bytes`` are
    valid and test, the rest is train (90M / 5M / 5M for the real file)."""
    if test_bytes <= 0:
        raise PrepareError(f"enwik8: test bytes must be positive, got {test_bytes}")
    if total <= 2 * test_bytes:
        raise PrepareError(f"enwik8: the file has {total} bytes, it must be longer than "
                           f"2 x {test_bytes} (valid + test) to leave a training split")
    return {
        "train": (0, total - 2 * test_bytes),
        "valid": (total - 2 * test_bytes, total - test_bytes),
        "test": (total - test_bytes, total),
    }


@contextlib.contextmanager
def _open_enwik8(src: Path) -> Iterator[Tuple[BinaryIO, int]]:
    """The enwik8 byte stream and its length, from ``enwik8.zip`` or from the raw file."""
    if src.name.endswith(".zip"):
        with zipfile.ZipFile(src) as zf:
            try:
                info = zf.getinfo(ENWIK8_MEMBER)
            except KeyError:
                raise PrepareError(f"{src}: no member named {ENWIK8_MEMBER!r}") from None
            with zf.open(info) as f:
                yield f, info.file_size
    else:
        with open(src, "rb") as f:
            yield f, os.fstat(f.fileno()).st_size


def prepare_enwik8(src: Path, dest: Path, test_bytes: int = ENWIK8_TEST_BYTES,
                   chunk_bytes: int = CHUNK_BYTES,
                   sums: Optional[Mapping[str, str]] = None) -> List[str]:
    """Split enwik8 (``src``: ``enwik8.zip`` or the raw file) into ``dest/{train,valid,test}.txt``.

    Format of awd-lstm-lm's ``prep_enwik8.py``: each byte as its decimal value, separated by
    spaces, with newline bytes kept as line breaks, so a whitespace tokenizer sees byte values.
    Streams in ``chunk_bytes`` blocks. A zip is verified first (:func:`verify_archive`).
    """
    src, dest = Path(src), Path(dest)
    if src.name.endswith(".zip"):
        verify_archive(src, sums=sums)
    outs = []
    try:
        with _open_enwik8(src) as (stream, total):
            splits = enwik8_splits(total, test_bytes)  # a bad size is refused before dest is touched
            dest.mkdir(parents=True, exist_ok=True)
            clear_stamp(dest)
            for split, (start, end) in splits.items():
                out = f"{split}.txt"
                log.info("enwik8: bytes [%d, %d) -> %s", start, end, dest / out)
                with atomic_write(dest / out, "w") as f:
                    encode_bytes(_read_exact(stream, end - start, chunk_bytes, src), f)
                outs.append(out)
    except _READ_ERRORS as e:
        raise PrepareError(f"{src}: corrupt ({e}); if it is a cached download, delete it "
                           f"and run again") from e
    write_stamp(dest, outs, params={"test_bytes": test_bytes}, source=[src.name])
    return outs


def _read_exact(f: BinaryIO, n: int, chunk_bytes: int, name) -> Iterable[bytes]:
    while n > 0:
        block = f.read(min(n, chunk_bytes))
        if not block:
            raise PrepareError(f"{name}: ended {n} bytes early")
        n -= len(block)
        yield block


# --------------------------------------------------------------------------------------------
# MNIST


def parse_idx_header(data: bytes) -> Tuple[int, Tuple[int, ...], int]:
    """``(magic, dims, header length)`` from the first bytes of an IDX file of unsigned bytes
    (LeCun & Cortes: a big-endian int32 magic ``0x000008nd``, then ``nd`` big-endian int32
    sizes). Raises ``ValueError`` with the reason. Shared with the psMNIST reader."""
    if len(data) < 4:
        raise ValueError(f"too short for an IDX header ({len(data)} bytes)")
    (magic,) = struct.unpack(">i", data[:4])
    if magic >> 8 != 0x08 or not 1 <= (magic & 0xFF) <= 4:
        raise ValueError(f"bad IDX magic number {magic} (expected {IDX_IMAGES_MAGIC} for images "
                         f"or {IDX_LABELS_MAGIC} for labels)")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError("truncated IDX header")
    dims = struct.unpack(f">{ndim}i", data[4:header])
    if any(d < 0 for d in dims):
        raise ValueError(f"negative IDX dimension in {dims}")
    return magic, dims, header


def read_idx_gz(path: Path) -> Tuple[int, Tuple[int, ...], int]:
    """Check a gzipped IDX file of unsigned bytes: returns ``(magic, dims, max value)``.

    The magic number must be 2049 (1-d, labels) or 2051 (3-d, images), and the payload must hold
    exactly ``prod(dims)`` bytes. The file is streamed, never held in memory.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(4 + 4 * 4)  # the longest header (4 dimensions)
            # MNIST has only these two: say so before a wrong one is read as another shape
            found = struct.unpack(">i", head[:4])[0] if len(head) >= 4 else None
            if found is not None and found not in (IDX_LABELS_MAGIC, IDX_IMAGES_MAGIC):
                raise PrepareError(f"{path}: bad IDX magic number {found} (expected "
                                   f"{IDX_IMAGES_MAGIC} for images or {IDX_LABELS_MAGIC} for labels)")
            try:
                magic, dims, header = parse_idx_header(head)
            except ValueError as e:
                raise PrepareError(f"{path}: {e}") from None
            expected = 1
            for d in dims:
                expected *= d
            first = head[header:]
            size, top = len(first), max(first, default=0)
            while True:
                block = f.read(CHUNK_BYTES)
                if not block:
                    break
                size += len(block)
                top = max(top, max(block))
    except (OSError, EOFError, zlib.error) as e:
        raise PrepareError(f"{path}: corrupt gzip file ({e})") from e
    if size != expected:
        raise PrepareError(f"{path}: header says {dims} = {expected} bytes of data, "
                           f"found {size}")
    return magic, dims, top


def check_mnist(files: Mapping[str, Path], items: Optional[Mapping[str, int]] = None) -> None:
    """Check the four MNIST files (keyed by their standard names).

    Images: magic 2051, 28 x 28; labels: magic 2049, values 0..9; images and labels of a split
    have the same count, and that count equals ``items[split]`` where given (``items`` defaults
    to the real 60,000 / 10,000; pass ``{}`` to accept any count).
    """
    items = MNIST_ITEMS if items is None else items
    counts: Dict[Tuple[str, str], int] = {}
    for name, (split, kind) in MNIST_FILES.items():
        path = Path(files[name])
        magic, dims, top = read_idx_gz(path)
        if kind == "images":
            if magic != IDX_IMAGES_MAGIC or len(dims) != 3:
                raise PrepareError(f"{path}: expected an image file (magic {IDX_IMAGES_MAGIC}), "
                                   f"got magic {magic}")
            if dims[1:] != (MNIST_ROWS, MNIST_COLS):
                raise PrepareError(f"{path}: images are {dims[1]} x {dims[2]}, expected "
                                   f"{MNIST_ROWS} x {MNIST_COLS}")
        else:
            if magic != IDX_LABELS_MAGIC:
                raise PrepareError(f"{path}: expected a label file (magic {IDX_LABELS_MAGIC}), "
                                   f"got magic {magic}")
            if top > 9:
                raise PrepareError(f"{path}: label {top} out of range 0..9")
        counts[split, kind] = dims[0]
        want = items.get(split)
        if want is not None and dims[0] != want:
            raise PrepareError(f"{path}: {dims[0]} items, expected {want}")
    for split in MNIST_ITEMS:
        if counts[split, "images"] != counts[split, "labels"]:
            raise PrepareError(f"mnist {split}: {counts[split, 'images']} images but "
                               f"{counts[split, 'labels']} labels")


def prepare_mnist(sources: Sequence[Path], dest: Path,
                  items: Optional[Mapping[str, int]] = None,
                  sums: Optional[Mapping[str, str]] = None) -> List[str]:
    """Check the four ``.gz`` IDX files (``sources``, by their standard names: their gzip streams
    and published sums, see :func:`verify_archive`, then :func:`check_mnist` with ``items``) and
    copy them, still gzipped, into ``dest``. Nothing in ``dest`` is touched before the checks."""
    dest = Path(dest)
    by_name = {Path(p).name: Path(p) for p in sources}
    missing = sorted(set(MNIST_FILES) - set(by_name))
    unknown = sorted(set(by_name) - set(MNIST_FILES))
    if missing or unknown:
        raise PrepareError(f"mnist: need exactly {', '.join(MNIST_FILES)}; "
                           f"missing {missing}, unexpected {unknown}")
    for name in MNIST_FILES:
        verify_archive(by_name[name], sums=sums)
    log.info("mnist: checking IDX headers and sizes")
    check_mnist(by_name, items)
    dest.mkdir(parents=True, exist_ok=True)
    clear_stamp(dest)
    for name in MNIST_FILES:
        src = by_name[name]
        if src.resolve() != (dest / name).resolve():
            with open(src, "rb") as fi, atomic_write(dest / name) as fo:
                shutil.copyfileobj(fi, fo, CHUNK_BYTES)
    params = {"items": dict(MNIST_ITEMS if items is None else items)}
    write_stamp(dest, list(MNIST_FILES), params=params, source=list(MNIST_FILES))
    return list(MNIST_FILES)


# --------------------------------------------------------------------------------------------
# A synthetic corpus made locally, for smoke runs and offline machines

TOY_FILES = ("train.txt", "valid.txt", "test.txt")


def toy_lines(n_lines: int, rng: random.Random, n_topics: int = 20, n_words: int = 200,
              min_len: int = 10, max_len: int = 40) -> List[str]:
    """Lines of a toy language with a long-range dependency: a topic word, a run of filler words
    from a sparse bigram chain (each word has a few likely successors), then ``=`` and the topic
    word again. Only a model that remembers the line's start can predict its end."""
    successors = [[rng.randrange(n_words) for _ in range(4)] for _ in range(n_words)]
    lines = []
    for _ in range(n_lines):
        topic = f"t{rng.randrange(n_topics):02d}"
        word = rng.randrange(n_words)
        words = [topic]
        for _ in range(rng.randint(min_len, max_len)):
            words.append(f"w{word:03d}")
            word = rng.choice(successors[word]) if rng.random() < 0.9 else rng.randrange(n_words)
        words += ["=", topic]
        lines.append(" ".join(words))
    return lines


def prepare_toy(dest: Path, lines: int = 4000, seed: int = 0) -> List[str]:
    """Write ``train/valid/test.txt`` of :func:`toy_lines` (``lines`` training lines and a tenth of
    that for valid and test each) into ``dest``; deterministic in ``seed``."""
    if lines < 10:
        raise PrepareError(f"toy: need at least 10 training lines, got {lines}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    clear_stamp(dest)
    rng = random.Random(seed)
    all_lines = toy_lines(lines + 2 * (lines // 10), rng)
    # the bigram chain is drawn once, so every split speaks the same language
    splits = {"train.txt": all_lines[:lines], "valid.txt": all_lines[lines:lines + lines // 10],
              "test.txt": all_lines[lines + lines // 10:]}
    for name, text in splits.items():
        with atomic_write(dest / name, "w") as f:
            f.write("\n".join(text) + "\n")
    write_stamp(dest, list(TOY_FILES), params={"lines": lines, "seed": seed})
    return list(TOY_FILES)


def parse_items(text: str) -> Dict[str, int]:
    """``"60000,10000"`` -> ``{"train": 60000, "t10k": 10000}``; ``"any"`` -> ``{}``."""
    if text.strip().lower() == "any":
        return {}
    try:
        train, test = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TRAIN,TEST item counts or 'any', got "
                                         f"{text!r}") from None
    return {"train": train, "t10k": test}


# --------------------------------------------------------------------------------------------
# Command line (called by getdata.sh)


def _params_arg(text: str) -> Dict:
    try:
        return json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--params expects JSON, got {text!r}") from None


def _member_arg(text: str) -> Tuple[str, str]:
    member, sep, out = text.partition("=")
    if not sep or not member or not out or "/" in out:
        raise argparse.ArgumentTypeError(f"expected MEMBER=OUTNAME, got {text!r}")
    return member, out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--sums", type=Path, default=None,
                   help="JSON object {file name: SHA-256} checked instead of the published sums")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("check", help="exit 0 if FOLDER is completely prepared, 1 if not, 3 if "
                                     "it is prepared with other parameters")
    c.add_argument("folder", type=Path)
    c.add_argument("--params", type=_params_arg, default={},
                   help="JSON object the stamp's parameters must equal")

    v = sub.add_parser("verify", help="check a downloaded archive's integrity")
    v.add_argument("archive", type=Path)
    v.add_argument("--name", help="file name that decides the kind (for NAME.part files)")

    x = sub.add_parser("extract", help="extract archive members into a folder")
    x.add_argument("archive", type=Path)
    x.add_argument("dest", type=Path)
    x.add_argument("members", nargs="+", type=_member_arg, metavar="MEMBER=OUTNAME")

    e = sub.add_parser("enwik8", help="split enwik8 into train/valid/test byte-value text")
    e.add_argument("src", type=Path, help="enwik8.zip or the raw enwik8 file")
    e.add_argument("dest", type=Path)
    e.add_argument("--test-bytes", type=int, default=ENWIK8_TEST_BYTES,
                   help="bytes in each of valid and test, taken from the end (default "
                        "%(default)s)")

    t = sub.add_parser("toy", help="write the synthetic toy corpus (no download)")
    t.add_argument("dest", type=Path)
    t.add_argument("--lines", type=int, default=4000, help="training lines (default %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="seed (default %(default)s)")

    m = sub.add_parser("mnist", help="check the four MNIST .gz IDX files and copy them")
    m.add_argument("dest", type=Path)
    m.add_argument("files", nargs="+", type=Path)
    m.add_argument("--items", type=parse_items, default=None,
                   help="expected TRAIN,TEST item counts, or 'any' (default 60000,10000)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="getdata: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "check":
            return check_folder(args.folder, args.params)
        sums = load_sums(args.sums)
        if args.cmd == "verify":
            verify_archive(args.archive, args.name, sums)
        elif args.cmd == "extract":
            extract_members(args.archive, args.dest, args.members, sums)
        elif args.cmd == "enwik8":
            prepare_enwik8(args.src, args.dest, args.test_bytes, sums=sums)
        elif args.cmd == "mnist":
            prepare_mnist(args.files, args.dest, args.items, sums)
        elif args.cmd == "toy":
            prepare_toy(args.dest, args.lines, args.seed)
    except PrepareError as e:
        log.error("error: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
