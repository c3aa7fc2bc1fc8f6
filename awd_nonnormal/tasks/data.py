"""Data of the synthetic long-memory tasks (Orhan & Pitkow 2020, section 3.1.1).

Three tasks, each as pure generator functions that draw from a ``torch.Generator`` (the expRNN
``copying_data`` style) plus a compact data set that a trainer indexes batch by batch:

* **copy**: 10 symbols in ``1..8``, a delay of blanks (``0``), the cue ``9``, 10 more blanks; the
  target is blank everywhere except the last 10 steps, which repeat the 10 symbols. Two layouts:
  ``paper`` (the paper's code: ``T`` steps in total, a delay of ``T - 21`` blanks) and
  ``arjovsky`` (Arjovsky et al. 2016, scoRNN, nnRNN: ``T`` steps between the last symbol and the
  first output step, the cue included, so ``T + 20`` steps in total). Both put the cue at step
  ``L - 11`` and the outputs at ``L - 10 .. L - 1`` of a sequence of total length ``L``.
* **addition**: two channels of length ``T``; channel 0 holds two markers, one uniformly in each
  half, channel 1 values ``U[0, 1)``; the target is the sum of the two marked values.
* **psMNIST**: MNIST images as 784 steps of one pixel in [0, 1], in the order of one fixed random
  permutation; read from the standard IDX files by :func:`read_idx`.

A data set stores only what is random (copy: the 10 symbols of each sequence; addition: values
and marker positions; psMNIST: the images as bytes) and builds the float input of a batch on
demand, so 60,000 copy sequences take 600 kB instead of 1.2 GB of one-hot tensors.

Every random stream of a run comes from :func:`generator` (run seed, purpose), so that the streams
are independent and each can be recreated on its own.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..prepare import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, parse_idx_header

logger = logging.getLogger(__name__)

__all__ = [
    "COPY_LAYOUTS", "COPY_SYMBOLS", "COPY_CLASSES", "COPY_MEMORY", "COPY_CUE",
    "copy_total_length", "copy_baseline", "copy_symbols", "copy_sequences", "copy_batch",
    "one_hot", "addition_baseline", "addition_parts", "addition_sequences", "addition_batch",
    "MNIST_PIXELS", "DEFAULT_PERM_SEED", "psmnist_baseline", "pixel_permutation", "permute_pixels",
    "IDXError", "read_idx", "find_idx_file", "load_mnist", "mnist_fingerprint", "derive_seed", "generator",
    "CopySet", "AdditionSet", "MnistSet", "mnist_sets",
]

PathLike = Union[str, Path]

# --------------------------------------------------------------------------------------------
# Copy task
# --------------------------------------------------------------------------------------------

def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one use (``"init"``, ``"train"``, ``"val"``, ``"shuffle/3"``) of a run
    seed, so that the streams are independent and each can be recreated on its own."""
    digest = hashlib.sha256(f"awd-nonnormal/{seed}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def generator(seed: int, purpose: str, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with :func:`derive_seed` ``(seed, purpose)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, purpose))


COPY_LAYOUTS = ("paper", "arjovsky")
COPY_SYMBOLS = 10  #: input alphabet: 0 blank, 1..8 data, 9 cue (inputs are one-hot over these)
COPY_CLASSES = 9   #: output classes 0..8 (blank and the 8 data symbols; the cue is never a target)
COPY_MEMORY = 10   #: number of symbols to remember
COPY_CUE = 9
_COPY_DATA_SYMBOLS = 8  # data symbols are 1..8


def copy_total_length(T: int, layout: str = "paper") -> int:
    """Total sequence length of a copy task of length ``T`` in ``layout``.

    ``paper``: ``T`` in total (10 symbols, ``T - 21`` blanks, the cue, 10 blanks; needs
    ``T >= 21``). ``arjovsky``: 10 symbols, ``T - 1`` blanks and the cue (``T`` steps of delay),
    then 10 blanks: ``T + 20`` in total (needs ``T >= 1``).
    """
    if layout not in COPY_LAYOUTS:
        raise ValueError(f"unknown copy layout {layout!r}; valid layouts: {', '.join(COPY_LAYOUTS)}")
    if not isinstance(T, int) or isinstance(T, bool):
        raise ValueError(f"copy task length T must be an integer, got {T!r}")
    if layout == "paper":
        if T < 2 * COPY_MEMORY + 1:
            raise ValueError(f"copy task (paper layout) needs T >= {2 * COPY_MEMORY + 1} "
                             f"(10 symbols, the cue, 10 outputs), got T = {T}")
        return T
    if T < 1:
        raise ValueError(f"copy task (arjovsky layout) needs T >= 1, got T = {T}")
    return T + 2 * COPY_MEMORY


def copy_baseline(T: int, layout: str = "paper") -> float:
    """Cross-entropy per step of the best memoryless model: it predicts blank with certainty where
    the target is blank and a uniform guess over the 8 symbols at the 10 output steps, so the loss
    averaged over all ``L`` steps is ``10 ln 8 / L`` (0.0416 for the paper's T = 500, 0.0400 for
    the Arjovsky layout at T = 500)."""
    return COPY_MEMORY * math.log(_COPY_DATA_SYMBOLS) / copy_total_length(T, layout)


def copy_symbols(n: int, generator: torch.Generator) -> Tensor:
    """The random part of ``n`` copy sequences: (n, 10) uint8 symbols, uniform in ``1..8``."""
    return torch.randint(1, _COPY_DATA_SYMBOLS + 1, (n, COPY_MEMORY), generator=generator,
                         dtype=torch.uint8)


def copy_sequences(symbols: Tensor, T: int, layout: str = "paper") -> Tuple[Tensor, Tensor]:
    """Build copy inputs and targets from (B, 10) symbols.

    Returns ``(x, y)``, both (L, B) int64 (sequence-first), ``L = copy_total_length(T, layout)``::

        x[0:10] = symbols, x[10:L-11] = 0, x[L-11] = 9 (cue), x[L-10:L] = 0
        y[0:L-10] = 0,     y[L-10:L] = symbols
    """
    L = copy_total_length(T, layout)
    B = symbols.shape[0]
    s = symbols.t().long()  # (10, B)
    x = torch.zeros(L, B, dtype=torch.long, device=symbols.device)
    y = torch.zeros(L, B, dtype=torch.long, device=symbols.device)
    x[:COPY_MEMORY] = s
    x[L - COPY_MEMORY - 1] = COPY_CUE
    y[L - COPY_MEMORY:] = s
    return x, y


def copy_batch(batch_size: int, T: int, generator: torch.Generator,
               layout: str = "paper") -> Tuple[Tensor, Tensor]:
    """A fresh batch of copy sequences: ``(x, y)`` as in :func:`copy_sequences`."""
    return copy_sequences(copy_symbols(batch_size, generator), T, layout)


def one_hot(tokens: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(...) integer tokens -> (..., num_classes) one-hot floats."""
    out = torch.zeros(*tokens.shape, num_classes, dtype=dtype, device=tokens.device)
    return out.scatter_(-1, tokens.unsqueeze(-1), 1.0)


# --------------------------------------------------------------------------------------------
# Addition task
# --------------------------------------------------------------------------------------------

def addition_baseline() -> float:
    """MSE of the best constant prediction. The target is ``u1 + u2`` with ``u1, u2 ~ U[0, 1)``
    independent, so its mean is 1 and the best constant is 1; its MSE is the variance
    ``Var(u1) + Var(u2) = 2 * 1/12 = 1/6`` (independent of T)."""
    return 1.0 / 6.0


def _check_addition_T(T: int) -> None:
    if not isinstance(T, int) or isinstance(T, bool) or T < 2:
        raise ValueError(f"addition task needs an integer length T >= 2 (one marker in each half), "
                         f"got {T!r}")


def addition_parts(n: int, T: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """The random part of ``n`` addition sequences: values (n, T) float32 in ``U[0, 1)`` and
    marker positions (n, 2) int64, the first uniform in ``[0, T//2)``, the second in
    ``[T//2, T)``."""
    _check_addition_T(T)
    half = T // 2
    values = torch.rand(n, T, generator=generator)
    first = torch.randint(0, half, (n,), generator=generator)
    second = torch.randint(half, T, (n,), generator=generator)
    return values, torch.stack([first, second], dim=1)


def addition_sequences(values: Tensor, positions: Tensor) -> Tuple[Tensor, Tensor]:
    """Build addition inputs and targets: ``x`` (T, B, 2) with the markers in channel 0 and the
    values in channel 1, ``y`` (B,) the sum of the two marked values."""
    B, T = values.shape
    x = torch.zeros(T, B, 2, dtype=values.dtype, device=values.device)
    x[:, :, 1] = values.t()
    batch = torch.arange(B, device=values.device)
    x[positions[:, 0], batch, 0] = 1.0
    x[positions[:, 1], batch, 0] = 1.0
    y = values.gather(1, positions).sum(1)  # (B,)
    return x, y


def addition_batch(batch_size: int, T: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """A fresh batch of addition sequences: ``(x, y)`` as in :func:`addition_sequences`."""
    return addition_sequences(*addition_parts(batch_size, T, generator))


# --------------------------------------------------------------------------------------------
# psMNIST: permutation
# --------------------------------------------------------------------------------------------

MNIST_PIXELS = 28 * 28
#: The permutation seed of expRNN and scoRNN: ``numpy.random.RandomState(92916).permutation(784)``.
DEFAULT_PERM_SEED = 92916


def psmnist_baseline() -> float:
    """Cross-entropy of a uniform guess over the 10 classes: ``ln 10``."""
    return math.log(10)


def pixel_permutation(seed: int, n: int = MNIST_PIXELS) -> Tensor:
    """The fixed pixel order of psMNIST: ``numpy.random.RandomState(seed).permutation(n)`` as an
    int64 tensor. With seed 92916 this is exactly the permutation of expRNN and scoRNN; the
    paper's code drew it from NumPy seeded with the run seed (``--perm-seed run``)."""
    return torch.from_numpy(np.random.RandomState(seed).permutation(n).astype(np.int64))


def permute_pixels(images: Tensor, perm: Tensor) -> Tensor:
    """(B, 784) flattened images -> (784, B, 1) sequence in which step ``t`` shows pixel
    ``perm[t]`` (``images[:, perm]``, the expRNN convention)."""
    return images[:, perm].t().unsqueeze(-1)


# --------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------

GETDATA_HINT = "run ./getdata.sh mnist (or point --mnist-dir at a folder with the IDX files)"


class IDXError(ValueError):
    """A missing or malformed IDX file; the message names the file, the problem and the fix."""


def read_idx(path: PathLike, magic: Optional[int] = None) -> Tensor:
    """Read an IDX file of unsigned bytes, gzipped (``.gz``) or raw, into a uint8 tensor.

    The format (LeCun & Cortes): a big-endian int32 magic number ``0x0000 08 nd`` (type 0x08 =
    unsigned byte, ``nd`` dimensions), ``nd`` big-endian int32 sizes, then the data in row-major
    order. ``magic`` (2051 for images, 2049 for labels) is checked when given. Raises
    :class:`IDXError` for a missing file, a bad magic number, a truncated header or payload, or
    trailing bytes.
    """
    path = Path(path)
    if not path.is_file():
        raise IDXError(f"{path}: no such file; {GETDATA_HINT}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise IDXError(f"{path}: cannot read ({exc}); {GETDATA_HINT}") from None
    try:
        found, dims, header = parse_idx_header(data)
    except ValueError as exc:
        raise IDXError(f"{path}: {exc}; {GETDATA_HINT}") from None
    if magic is not None and found != magic:
        raise IDXError(f"{path}: IDX magic number {found}, expected {magic} "
                       f"({'images' if magic == IDX_IMAGES_MAGIC else 'labels'}); {GETDATA_HINT}")
    size = math.prod(dims)
    if len(data) - header != size:
        problem = "truncated" if len(data) - header < size else "has trailing bytes"
        raise IDXError(f"{path}: {problem}: header says {' x '.join(map(str, dims))} = {size} "
                       f"bytes of data, found {len(data) - header}; {GETDATA_HINT}")
    array = np.frombuffer(data, dtype=np.uint8, count=size, offset=header).reshape(dims)
    return torch.from_numpy(array.copy())


def find_idx_file(folder: PathLike, stem: str) -> Path:
    """``folder/stem.gz`` or ``folder/stem`` (gzipped preferred); :class:`IDXError` if neither."""
    folder = Path(folder)
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise IDXError(f"{folder}: no {stem}.gz or {stem}; {GETDATA_HINT}")


def load_mnist(folder: PathLike, split: str) -> Tuple[Tensor, Tensor]:
    """One MNIST split (``train`` or ``t10k``) from ``folder``: images (n, 784) uint8 and labels
    (n,) int64. Any 28 x 28 IDX set works (Fashion-MNIST too). Checks that the images are
    28 x 28, that images and labels have the same count and that labels are in 0..9."""
    if split not in ("train", "t10k"):
        raise ValueError(f"unknown MNIST split {split!r}; valid: train, t10k")
    img_path = find_idx_file(folder, f"{split}-images-idx3-ubyte")
    lab_path = find_idx_file(folder, f"{split}-labels-idx1-ubyte")
    images = read_idx(img_path, IDX_IMAGES_MAGIC)
    labels = read_idx(lab_path, IDX_LABELS_MAGIC)
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise IDXError(f"{img_path}: images of shape {tuple(images.shape[1:])}, expected 28 x 28; "
                       f"{GETDATA_HINT}")
    if labels.dim() != 1:
        raise IDXError(f"{lab_path}: labels must be 1-dimensional, got shape {tuple(labels.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise IDXError(f"{folder}: {images.shape[0]} {split} images but {labels.shape[0]} labels; "
                       f"{GETDATA_HINT}")
    if labels.numel() and int(labels.max()) > 9:
        raise IDXError(f"{lab_path}: label {int(labels.max())} out of range 0..9")
    return images.reshape(-1, MNIST_PIXELS), labels.long()


#: (path, size, mtime_ns) -> SHA-256 of the file's data: a file is hashed once per process.
_DIGESTS: Dict[Tuple[str, int, int], str] = {}


def _idx_digest(path: Path) -> str:
    """SHA-256 of the IDX data in ``path`` (decompressed for ``.gz``, so a gzipped copy and a
    raw one of the same file have the same digest)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        hasher = hashlib.sha256()
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    hasher.update(block)
        except (OSError, EOFError) as exc:
            raise IDXError(f"{path}: cannot read ({exc}); {GETDATA_HINT}") from None
        _DIGESTS[key] = hasher.hexdigest()
    return _DIGESTS[key]


def mnist_fingerprint(folder: PathLike, splits: Sequence[str] = ("train", "t10k")) -> str:
    """The identity of the MNIST data a run reads: SHA-256 over the digests of the images and
    labels of ``splits`` in ``folder`` (see :func:`_idx_digest`). Raises :class:`IDXError` for a
    missing file."""
    digests = {}
    for split in splits:
        for kind in ("images-idx3", "labels-idx1"):
            stem = f"{split}-{kind}-ubyte"
            digests[stem] = _idx_digest(find_idx_file(folder, stem))
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode("ascii")).hexdigest()


# --------------------------------------------------------------------------------------------
# Data sets: compact storage, batches built on demand
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CopySet:
    """Copy sequences stored as their (n, 10) uint8 symbols."""
    symbols: Tensor
    T: int
    layout: str = "paper"

    @classmethod
    def generate(cls, n: int, T: int, generator: torch.Generator, layout: str = "paper") -> "CopySet":
        copy_total_length(T, layout)  # validate
        return cls(copy_symbols(n, generator), T, layout)

    def __len__(self) -> int:
        return self.symbols.shape[0]

    def batch(self, index: Tensor, device: torch.device) -> Tuple[Tensor, Tensor]:
        """Inputs (L, B, 10) one-hot floats and targets (L, B) int64 on ``device``."""
        x, y = self.symbol_batch(index, device)
        return one_hot(x, COPY_SYMBOLS), y

    def symbol_batch(self, index: Tensor, device: torch.device) -> Tuple[Tensor, Tensor]:
        """Inputs (L, B) int64 symbols (what :meth:`batch` one-hot encodes) and targets (L, B)."""
        return copy_sequences(self.symbols[index].to(device), self.T, self.layout)


@dataclass(frozen=True)
class AdditionSet:
    """Addition sequences stored as values (n, T) float32 and marker positions (n, 2)."""
    values: Tensor
    positions: Tensor

    @classmethod
    def generate(cls, n: int, T: int, generator: torch.Generator) -> "AdditionSet":
        return cls(*addition_parts(n, T, generator))

    def __len__(self) -> int:
        return self.values.shape[0]

    def batch(self, index: Tensor, device: torch.device) -> Tuple[Tensor, Tensor]:
        """Inputs (T, B, 2) and targets (B,) on ``device``."""
        return addition_sequences(self.values[index].to(device), self.positions[index].to(device))


@dataclass(frozen=True)
class MnistSet:
    """MNIST images (n, 784) uint8 with labels (n,), fed in the order of ``perm``."""
    images: Tensor
    labels: Tensor
    perm: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, index: Tensor, device: torch.device) -> Tuple[Tensor, Tensor]:
        """Inputs (784, B, 1) pixels in [0, 1] and labels (B,) on ``device``."""
        images = self.images[index].to(device).float().div_(255.0)  # (B, 784)
        return permute_pixels(images, self.perm.to(device)), self.labels[index].to(device)


DataSet = Union[CopySet, AdditionSet, MnistSet]


def mnist_sets(folder: PathLike, perm: Tensor, n_train: int, n_val: int,
               validation: str = "test") -> Tuple[MnistSet, MnistSet, Dict[str, object]]:
    """psMNIST training and validation sets.

    ``validation="test"`` (default, as the paper's Keras code): train on the first ``n_train``
    training images, validate on the first ``n_val`` images of the t10k split.
    ``validation="holdout"``: hold out the last ``n_val`` training images for validation and
    train on the first ``n_train`` of the rest; t10k is not read.
    """
    images, labels = load_mnist(folder, "train")
    if validation == "test":
        val_images, val_labels = load_mnist(folder, "t10k")
        source = "t10k"
    elif validation == "holdout":
        if n_val >= images.shape[0]:
            raise ValueError(f"--n-val {n_val} leaves no training images of {images.shape[0]}")
        val_images, val_labels = images[-n_val:], labels[-n_val:]
        images, labels = images[:-n_val], labels[:-n_val]
        source = "train (held-out tail)"
    else:
        raise ValueError(f"unknown psMNIST validation split {validation!r}; valid: test, holdout")
    if n_train > images.shape[0]:
        raise ValueError(f"--n-train {n_train} is more than the {images.shape[0]} training images "
                         f"available in {folder}")
    if n_val > val_images.shape[0]:
        raise ValueError(f"--n-val {n_val} is more than the {val_images.shape[0]} validation images "
                         f"available in {folder} ({source})")
    train = MnistSet(images[:n_train].contiguous(), labels[:n_train].contiguous(), perm)
    val = MnistSet(val_images[:n_val].contiguous(), val_labels[:n_val].contiguous(), perm)
    return train, val, {"validation_source": source}
