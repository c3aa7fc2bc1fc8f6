"""getdata.sh and awd_nonnormal/prepare.py, offline: tiny archives of the real formats are built
in a temporary folder and served as a mirror: a folder, or a localhost HTTP server for the
download path (with curl and with wget).
"""

import bz2
import contextlib
import functools
import gzip
import hashlib
import http.server
import io
import json
import lzma
import os
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from awd_nonnormal import prepare

ROOT = Path(__file__).resolve().parents[1]
GETDATA = ROOT / "getdata.sh"

PTB = {
    "ptb.train.txt": " the cat sat on the mat \n a <unk> dog N \n",
    "ptb.valid.txt": " valid line one \n valid line two \n",
    "ptb.test.txt": " test line \n",
    "ptb.char.train.txt": "t h e _ c a t\nd o g\n",
    "ptb.char.valid.txt": "v a l i d\n",
    "ptb.char.test.txt": "t e s t\n",
}
WIKI = {"train": " = Title = \n\n A train line .\n", "valid": " valid @-@ text\n",
        "test": " test <unk>\n"}
ENWIK8_TEST_BYTES = 60
MNIST_ITEMS = {"train": 5, "t10k": 3}
MNIST_OPTS = ["--mnist-items", "5,3", "--enwik8-test-bytes", str(ENWIK8_TEST_BYTES)]
ALL = ["penn", "pennchar", "enwik8", "wikitext-2", "mnist"]


def enwik8_bytes() -> bytes:
    # Every byte value, newlines at the start, doubled and at the ends of the splits, UTF-8 text.
    rng = random.Random(0)
    body = bytes(range(256)) + "<page>naïve Zürich 東京</page>\n\n".encode() * 3
    body += bytes(rng.randrange(256) for _ in range(100))
    return b"\n" + body + b"\n"


def idx_images(n: int, magic: int = 2051) -> bytes:
    return struct.pack(">iiii", magic, n, 28, 28) + bytes((i * 7) % 256 for i in range(n * 784))


def idx_labels(n: int) -> bytes:
    return struct.pack(">ii", 2049, n) + bytes(i % 10 for i in range(n))


def mnist_payloads() -> dict:
    return {
        "train-images-idx3-ubyte.gz": idx_images(MNIST_ITEMS["train"]),
        "train-labels-idx1-ubyte.gz": idx_labels(MNIST_ITEMS["train"]),
        "t10k-images-idx3-ubyte.gz": idx_images(MNIST_ITEMS["t10k"]),
        "t10k-labels-idx1-ubyte.gz": idx_labels(MNIST_ITEMS["t10k"]),
    }


def build_mirror(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "simple-examples.tgz", "w:gz") as tf:
        members = {f"./simple-examples/data/{k}": v.encode() for k, v in PTB.items()}
        members["./simple-examples/data/README"] = b"not extracted\n"
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with zipfile.ZipFile(folder / "enwik8.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", enwik8_bytes())
    with zipfile.ZipFile(folder / "wikitext-2-v1.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for split, text in WIKI.items():
            zf.writestr(f"wikitext-2/wiki.{split}.tokens", text)
    for name, payload in mnist_payloads().items():
        (folder / name).write_bytes(gzip.compress(payload))
    write_sums(folder)
    return folder


SUMS = "SHA256SUMS.json"  # the test mirror's own sums (its archives are not the published ones)


def write_sums(folder: Path, skip=()) -> Path:
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name != SUMS and p.name not in skip}
    (folder / SUMS).write_text(json.dumps(sums))
    return folder / SUMS


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    return build_mirror(tmp_path_factory.mktemp("mirror"))


def getdata(*args, path=None, sums=None):
    """Run getdata.sh; a --mirror folder's own SHA256SUMS.json replaces the published sums
    (``sums`` names another file; ``sums=False``: the published sums)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWD_")}
    args = [str(a) for a in args]
    if sums is None and "--mirror" in args:
        own = Path(args[args.index("--mirror") + 1]) / SUMS
        sums = own if own.is_file() else None
    if sums:
        env["AWD_DATA_SUMS"] = str(sums)
    env["PYTHON"] = sys.executable
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"  # the test server is local
    if path is not None:
        env["PATH"] = path
    bash = shutil.which("bash") or "/bin/bash"
    return subprocess.run([bash, str(GETDATA), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=120)


def snapshot(dest: Path) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(dest.rglob("*"))
            if p.is_file()}


def test_help_and_unknown_name():
    r = getdata("--help")
    assert r.returncode == 0 and "--mirror" in r.stdout and "wikitext-103" in r.stdout
    r = getdata("penn", "ptb")
    assert r.returncode == 2
    assert "'ptb'" in r.stderr
    for name in ["penn", "pennchar", "enwik8", "wikitext-2", "wikitext-103", "mnist"]:
        assert name in r.stderr
    assert getdata("--bogus").returncode == 2


def test_prepares_everything_from_mirror(mirror, tmp_path):
    dest = tmp_path / "data"
    r = getdata("--mirror", mirror, "--dest", dest, *MNIST_OPTS, *ALL)
    assert r.returncode == 0, r.stderr
    for name in ["train", "valid", "test"]:
        assert (dest / "penn" / f"{name}.txt").read_text() == PTB[f"ptb.{name}.txt"]
        assert (dest / "pennchar" / f"{name}.txt").read_text() == PTB[f"ptb.char.{name}.txt"]
        assert (dest / "wikitext-2" / f"{name}.txt").read_text() == WIKI[name]
    assert sorted(p.name for p in (dest / "penn").iterdir()) == [
        ".complete", "test.txt", "train.txt", "valid.txt"]

    # enwik8: the last 2 x 60 bytes are valid / test; byte values round-trip, newlines kept.
    raw = enwik8_bytes()
    n = ENWIK8_TEST_BYTES
    expected = {"train": raw[:-2 * n], "valid": raw[-2 * n:-n], "test": raw[-n:]}
    for split, data in expected.items():
        text = (dest / "enwik8" / f"{split}.txt").read_text(encoding="ascii")
        assert text.count("\n") == data.count(b"\n")
        assert prepare.decode_text(text) == data
        tokens = [int(t) for line in text.split("\n") for t in line.split()]
        assert tokens == [b for b in data if b != 10]
        assert all(line == line.strip() and "  " not in line for line in text.split("\n"))

    for name, payload in mnist_payloads().items():
        assert gzip.decompress((dest / "mnist" / name).read_bytes()) == payload
    # A folder mirror is used in place: nothing cached, no temporary files left.
    assert not (dest / ".downloads").exists()
    assert not list(dest.rglob("*.part"))


def test_second_run_skips_and_leaves_files_alone(mirror, tmp_path):
    dest = tmp_path / "data"
    assert getdata("--mirror", mirror, "--dest", dest, *MNIST_OPTS, *ALL).returncode == 0
    before = snapshot(dest)
    r = getdata("--mirror", mirror, "--dest", dest, *MNIST_OPTS, *ALL)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("skipping") == len(ALL)
    assert snapshot(dest) == before
    # Other parameters than the complete folder's: refused before anything is touched (here the
    # default 5,000,000 test bytes, which the tiny file could not even hold), unless --force.
    for opts in (["--enwik8-test-bytes", 50], []):
        r = getdata("--mirror", mirror, "--dest", dest, *MNIST_OPTS[:2], *opts, "enwik8")
        assert r.returncode == 1
        errors = [line for line in r.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and "--enwik8-test-bytes 60 there" in errors[0], r.stderr
        assert "--force" in errors[0] and "Traceback" not in r.stderr
        assert snapshot(dest) == before
    r = getdata("--mirror", mirror, "--dest", dest, "--mnist-items", "any", "mnist")
    assert r.returncode == 1 and "--mnist-items 5,3 there, any now" in r.stderr
    assert snapshot(dest) == before
    # The whole run is refused before any dataset is touched, even one named before the conflict.
    shutil.rmtree(dest / "penn")
    r = getdata("--mirror", mirror, "--dest", dest, "penn", "enwik8")
    assert r.returncode == 1 and "--enwik8-test-bytes 60 there, 5000000 now" in r.stderr
    assert not (dest / "penn").exists()
    before = snapshot(dest)
    r = getdata("--mirror", mirror, "--dest", dest, *MNIST_OPTS[:2], "--enwik8-test-bytes", 50,
                "--force", "enwik8", "mnist")
    assert r.returncode == 0, r.stderr
    text = (dest / "enwik8" / "test.txt").read_text()
    assert prepare.decode_text(text) == enwik8_bytes()[-50:]
    assert prepare.is_complete(dest / "enwik8", {"test_bytes": 50})


def test_mnist_items_with_leading_zeros(mirror, tmp_path):
    # 05,3 is 5,3: recorded as valid JSON numbers, so the folder is complete and a rerun (with
    # either spelling) skips it instead of preparing it again.
    dest = tmp_path / "data"
    r = getdata("--mirror", mirror, "--dest", dest, "--mnist-items", "05,003", "mnist")
    assert r.returncode == 0, r.stderr
    assert "usage" not in r.stderr and "Traceback" not in r.stderr
    assert prepare.is_complete(dest / "mnist", {"items": MNIST_ITEMS})
    before = snapshot(dest)
    for items in ("05,003", "5,3"):
        r = getdata("--mirror", mirror, "--dest", dest, "--mnist-items", items, "mnist")
        assert r.returncode == 0 and "skipping" in r.stderr, r.stderr
        assert "usage" not in r.stderr
    assert snapshot(dest) == before


def test_incomplete_folders_are_redone(mirror, tmp_path):
    dest = tmp_path / "data"
    assert getdata("--mirror", mirror, "--dest", dest, "penn", "wikitext-2").returncode == 0
    # penn: interrupted before the stamp (stamp missing, a stale temporary output left over).
    (dest / "penn" / ".complete").unlink()
    (dest / "penn" / "train.txt").write_text("half")
    (dest / "penn" / "valid.txt.part").write_text("stale")
    # wikitext-2: stamp present but a file truncated afterwards.
    (dest / "wikitext-2" / "test.txt").write_text("")
    r = getdata("--mirror", mirror, "--dest", dest, "penn", "wikitext-2")
    assert r.returncode == 0, r.stderr
    assert "skipping" not in r.stderr
    assert (dest / "penn" / "train.txt").read_text() == PTB["ptb.train.txt"]
    assert (dest / "penn" / "valid.txt").read_text() == PTB["ptb.valid.txt"]
    assert not (dest / "penn" / "valid.txt.part").exists()
    assert (dest / "wikitext-2" / "test.txt").read_text() == WIKI["test"]
    assert (dest / "penn" / ".complete").is_file()
    # --force redoes a complete folder.
    r = getdata("--mirror", mirror, "--dest", dest, "--force", "penn")
    assert r.returncode == 0 and "skipping" not in r.stderr


def test_missing_mirror_file(mirror, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(mirror / "simple-examples.tgz", partial)
    r = getdata("--mirror", partial, "--dest", tmp_path / "data", "penn", "wikitext-2")
    assert r.returncode == 1
    assert "wikitext-2-v1.zip" in r.stderr and str(partial) in r.stderr
    assert (tmp_path / "data" / "penn" / ".complete").is_file()
    assert not (tmp_path / "data" / "wikitext-2" / ".complete").exists()


def test_corrupt_idx_magic(mirror, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(mirror, bad)
    payload = bytearray(mnist_payloads()["train-labels-idx1-ubyte.gz"])
    payload[:4] = struct.pack(">i", 2052)
    (bad / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(payload)))
    write_sums(bad)
    r = getdata("--mirror", bad, "--dest", tmp_path / "data", *MNIST_OPTS, "mnist")
    assert r.returncode == 1
    assert "magic" in r.stderr and "2052" in r.stderr and "train-labels" in r.stderr
    assert not (tmp_path / "data" / "mnist" / ".complete").exists()
    # The default counts are the real ones: the tiny set is refused without --mnist-items.
    r = getdata("--mirror", mirror, "--dest", tmp_path / "data", "mnist")
    assert r.returncode == 1 and "expected 60000" in r.stderr


def test_enwik8_too_short(mirror, tmp_path):
    r = getdata("--mirror", mirror, "--dest", tmp_path / "data", "--enwik8-test-bytes", 1000,
                "enwik8")
    assert r.returncode == 1
    assert "must be longer than 2 x 1000" in r.stderr
    assert not list((tmp_path / "data" / "enwik8").glob("*.txt"))


TOOLS = ["dirname", "basename", "mkdir", "rm", "mv"]


def path_with(tmp_path: Path, tools) -> str:
    """A PATH holding only the named tools (so one downloader, or none, is visible)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in tools:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    return str(bin_dir)


@contextlib.contextmanager
def serve(folder: Path):
    """Serve ``folder`` over HTTP on localhost; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()


@pytest.fixture(scope="module")
def http_mirror(mirror):
    with serve(mirror) as url:
        yield url


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def downloaders():
    return [pytest.param(tool, marks=pytest.mark.skipif(shutil.which(tool) is None,
                                                        reason=f"{tool} not installed"))
            for tool in ["curl", "wget"]]


@pytest.mark.parametrize("tool", downloaders())
def test_url_mirror_downloads_into_cache(mirror, http_mirror, tmp_path, tool):
    dest = tmp_path / "data"
    cache = dest / ".downloads"
    cache.mkdir(parents=True)
    (cache / "simple-examples.tgz.part").write_bytes(b"interrupted download")
    path = path_with(tmp_path, TOOLS + [tool])
    r = getdata("--mirror", http_mirror, "--dest", dest, "penn", "pennchar", path=path)
    assert r.returncode == 0, r.stderr
    archive = (mirror / "simple-examples.tgz").read_bytes()
    assert (cache / "simple-examples.tgz").read_bytes() == archive
    assert not (cache / "simple-examples.tgz.part").exists()
    assert r.stderr.count("downloading") == 1  # pennchar reuses the cached archive
    assert (dest / "pennchar" / "valid.txt").read_text() == PTB["ptb.char.valid.txt"]
    # The cache is used without any mirror or network.
    r = getdata("--dest", dest, "--force", "penn", path=path)
    assert r.returncode == 0 and "downloading" not in r.stderr


@pytest.mark.parametrize("tool", downloaders())
def test_failed_or_damaged_download(mirror, tmp_path, tool):
    dest = tmp_path / "data"
    served = tmp_path / "served"
    served.mkdir()
    with serve(served) as url:
        path = path_with(tmp_path, TOOLS + [tool])
        r = getdata("--mirror", url, "--dest", dest, "wikitext-2", path=path)
        assert r.returncode == 1
        assert f"{url}/wikitext-2-v1.zip" in r.stderr
        assert not list((dest / ".downloads").iterdir())
        # A truncated archive is refused before it reaches the cache.
        zipped = (mirror / "wikitext-2-v1.zip").read_bytes()
        (served / "wikitext-2-v1.zip").write_bytes(zipped[:-30])
        r = getdata("--mirror", url, "--dest", dest, "wikitext-2", path=path)
        assert r.returncode == 1 and "damaged" in r.stderr
        assert not list((dest / ".downloads").iterdir())


def test_no_downloader(tmp_path):
    r = getdata("--dest", tmp_path / "data", "penn", path=path_with(tmp_path, TOOLS))
    assert r.returncode == 1
    assert "neither curl nor wget" in r.stderr and "--mirror" in r.stderr


def test_encode_bytes_across_chunks():
    raw = enwik8_bytes()
    for chunk in [1, 2, 7, 64, len(raw)]:
        out = io.StringIO()
        prepare.encode_bytes((raw[i:i + chunk] for i in range(0, len(raw), chunk)), out)
        assert prepare.decode_text(out.getvalue()) == raw
        assert out.getvalue().split("\n")[:2] == ["", "0 1 2 3 4 5 6 7 8 9"]


def test_enwik8_splits_and_raw_source(tmp_path):
    assert prepare.enwik8_splits(10 ** 8) == {
        "train": (0, 90_000_000), "valid": (90_000_000, 95_000_000),
        "test": (95_000_000, 100_000_000)}
    with pytest.raises(prepare.PrepareError, match="longer than"):
        prepare.enwik8_splits(10, 5)
    raw = enwik8_bytes()
    (tmp_path / "enwik8").write_bytes(raw)
    prepare.prepare_enwik8(tmp_path / "enwik8", tmp_path / "out", test_bytes=40, chunk_bytes=3)
    assert prepare.decode_text((tmp_path / "out" / "train.txt").read_text()) == raw[:-80]
    assert prepare.is_complete(tmp_path / "out", {"test_bytes": 40})
    assert not prepare.is_complete(tmp_path / "out", {"test_bytes": 5_000_000})


def test_toy_corpus_is_local_deterministic_and_has_its_long_range_dependency(tmp_path):
    for dest in ("a", "b"):
        out = subprocess.run(["bash", str(GETDATA), "--dest", str(tmp_path / dest), "toy"],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    for split in ("train.txt", "valid.txt", "test.txt"):
        a = (tmp_path / "a" / "toy" / split).read_text()
        assert a == (tmp_path / "b" / "toy" / split).read_text()
        lines = a.splitlines()
        assert len(lines) == (4000 if split == "train.txt" else 400)
        for line in lines:
            words = line.split()
            assert words[-2] == "=" and words[-1] == words[0] and words[0].startswith("t")
            assert all(w.startswith("w") for w in words[1:-2]) and 10 <= len(words) - 3 <= 40
    again = subprocess.run(["bash", str(GETDATA), "--dest", str(tmp_path / "a"), "toy"],
                           capture_output=True, text=True)
    assert again.returncode == 0 and "skipping" in again.stderr


# --------------------------------------------------------------------------------------------
# Corrupt archives: refused before anything is extracted


def flip_in_data(name: str, raw: bytes) -> bytes:
    """``raw`` with one byte of its compressed payload flipped (not a header or directory)."""
    if name.endswith(".zip"):
        info = zipfile.ZipFile(io.BytesIO(raw)).infolist()[0]
        local = raw[info.header_offset:]
        start = info.header_offset + 30 + struct.unpack("<HH", local[26:30])[0] \
            + struct.unpack("<HH", local[26:30])[1]
        at = start + info.compress_size // 2
    else:  # gzip: a 10-byte header, an 8-byte trailer
        at = 10 + (len(raw) - 18) // 2
    out = bytearray(raw)
    out[at] ^= 0x20
    return bytes(out)


CORRUPTIBLE = [("penn", "simple-examples.tgz"), ("wikitext-2", "wikitext-2-v1.zip"),
               ("enwik8", "enwik8.zip"), ("mnist", "train-images-idx3-ubyte.gz")]


@pytest.mark.parametrize("dataset,archive", CORRUPTIBLE)
@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_a_corrupt_archive_never_becomes_a_corpus(mirror, tmp_path, dataset, archive, damage):
    bad = tmp_path / "bad"
    shutil.copytree(mirror, bad)
    raw = (mirror / archive).read_bytes()
    (bad / archive).write_bytes(flip_in_data(archive, raw) if damage == "flipped"
                                else raw[:len(raw) * 2 // 3])
    no_sums = tmp_path / "none.json"
    no_sums.write_text("{}")  # integrity alone (the sum check has its own test)
    dest = tmp_path / "data"
    r = getdata("--mirror", bad, "--dest", dest, *MNIST_OPTS, dataset, sums=no_sums)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, r.stderr
    assert str(bad / archive) in errors[0] and "corrupt" in errors[0]
    assert "Traceback" not in r.stderr and "method gz" not in r.stderr
    folder = dest / dataset
    assert not folder.exists() or not any(folder.iterdir())  # nothing extracted, no stamp


def test_published_and_listed_sums(mirror, tmp_path):
    dest = tmp_path / "data"
    # The built-in published sums: the tiny WikiText zip is not the original one; PTB has none.
    r = getdata("--mirror", mirror, "--dest", dest, "wikitext-2", sums=False)
    assert r.returncode == 1
    assert "corrupt or not the original wikitext-2-v1.zip" in r.stderr and "published" in r.stderr
    assert prepare.PUBLISHED_SHA256["wikitext-2-v1.zip"] in r.stderr
    assert not (dest / "wikitext-2").exists()
    assert getdata("--mirror", mirror, "--dest", dest, "penn", sums=False).returncode == 0
    # A table naming another sum refuses an intact archive; one naming its sum accepts it.
    fake = tmp_path / "fake.json"
    fake.write_text(json.dumps({"simple-examples.tgz": "0" * 64}))
    r = getdata("--mirror", mirror, "--dest", dest, "--force", "--sums", fake, "pennchar")
    assert r.returncode == 1 and "its SHA-256 is" in r.stderr and "0" * 64 in r.stderr
    assert not (dest / "pennchar").exists()
    r = getdata("--mirror", mirror, "--dest", dest, "--sums", mirror / SUMS, "pennchar")
    assert r.returncode == 0, r.stderr


def _tar(mode: str, members: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


MEMBERS = {"d/a.txt": b"the cat sat on the mat\n" * 5, "d/b.txt": bytes(range(256))}
ARCHIVES = {
    "x.zip": lambda: _zip(MEMBERS),
    "x.tgz": lambda: _tar("w:gz", MEMBERS),
    "x.tar.bz2": lambda: _tar("w:bz2", MEMBERS),
    "x.tar.xz": lambda: _tar("w:xz", MEMBERS),
    "x.gz": lambda: gzip.compress(MEMBERS["d/a.txt"]),
    "x.bz2": lambda: bz2.compress(MEMBERS["d/a.txt"]),
    "x.xz": lambda: lzma.compress(MEMBERS["d/a.txt"]),
}


def _contents(path: Path):
    """What a trusting reader would take from the archive."""
    kind, stream = prepare.archive_kind(path.name)
    if kind == "zip":
        with zipfile.ZipFile(path) as zf:
            return {i.filename: zf.read(i) for i in zf.infolist()}
    if kind == "tar":
        with tarfile.open(path, "r:*") as tf:
            return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
    with stream.open(path) as f:
        return f.read()


@pytest.mark.parametrize("name", sorted(ARCHIVES))
def test_every_single_byte_flip_is_caught_or_harmless(tmp_path, name):
    """Flip each byte of a small archive in turn: verify_archive refuses it, or what it holds is
    exactly the original (a flip in a zip's timestamps, say, changes nothing that is read)."""
    raw = ARCHIVES[name]()
    path = tmp_path / name
    path.write_bytes(raw)
    prepare.verify_archive(path, sums={})
    original = _contents(path)
    caught = 0
    for i in range(len(raw)):
        flipped = bytearray(raw)
        flipped[i] ^= 0x01
        path.write_bytes(bytes(flipped))
        try:
            prepare.verify_archive(path, sums={})
        except prepare.PrepareError as e:
            assert "corrupt" in str(e) and "\n" not in str(e)
            caught += 1
            continue
        assert _contents(path) == original, f"byte {i} flipped, not caught, contents differ"
    for cut in (1, len(raw) // 2, len(raw) - 1):
        path.write_bytes(raw[:cut])
        with pytest.raises(prepare.PrepareError, match="corrupt"):
            prepare.verify_archive(path, sums={})
    assert caught > len(raw) // 2
