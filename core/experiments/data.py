"""Byte-level text for the language models: the Python documentation, or the user's files.

The built-in corpus ``pydoc`` is ``pydoc_data.topics``, the help texts of Python's
``help()`` that ship with CPython (about 466 KB of English on CPython 3.11) under the
PSF licence: the topics in sorted order of their names, joined by blank lines, as UTF-8
bytes. A user corpus is one text file, or every ``*.txt`` file under a directory in
sorted order of their paths, joined the same way. Either way the first 90 % of the bytes
are the training split and the last 10 % the validation split. Nothing is downloaded.

Batches are windows of ``seq_len + 1`` bytes at random offsets into the training split;
the offsets of step ``s`` depend only on the seed and ``s``, so that a resumed run sees
the batches an uninterrupted one would, and a frozen model can be shown the same
batches again. Validation uses evenly spaced, non-overlapping windows of the validation
split, the same for every run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import attrs
import torch

from ..errors import ConfigError, suggest

#: Built-in data sets: ``pydoc`` (text) and ``simulation`` (the emulator's grid states).
BUILT_IN = ("pydoc", "simulation")
VALIDATION_FRACTION = 0.1
VOCAB = 256
SEPARATOR = b"\n\n"


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator whose stream depends on (*seed*, *step*) only.

    torch seeds its CPU generator with 32 bits, so the pair is hashed into 32 bits
    rather than packed into a larger number (whose high bits would be dropped).
    """
    digest = hashlib.sha256(f"{seed}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:4], "little"))


@attrs.frozen(eq=False)
class Corpus:
    """Training and validation bytes (``uint8`` tensors) and where they came from."""

    name: str
    train: torch.Tensor
    val: torch.Tensor
    sha256: str

    @classmethod
    def from_bytes(cls, name: str, data: bytes) -> Corpus:
        cut = int(len(data) * (1 - VALIDATION_FRACTION))
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return cls(name, tensor[:cut].clone(), tensor[cut:].clone(),
                   hashlib.sha256(data).hexdigest())

    def require(self, seq_len: int) -> None:
        """Raise unless both splits hold at least one window of ``seq_len + 1`` bytes."""
        for split, data in (("training", self.train), ("validation", self.val)):
            if len(data) < seq_len + 1:
                raise ConfigError(
                    f"data.seq_len: the {split} split of {self.name} has {len(data)} bytes, "
                    f"fewer than seq_len + 1 = {seq_len + 1}; use more text or a shorter "
                    "seq_len"
                )

    def batch(self, step: int, seed: int, batch_size: int, seq_len: int) -> torch.Tensor:
        """``(batch_size, seq_len + 1)`` token ids (int64) for training step *step*."""
        gen = step_generator(seed, step)
        starts = torch.randint(len(self.train) - seq_len, (batch_size,), generator=gen)
        index = starts[:, None] + torch.arange(seq_len + 1)
        return self.train[index].long()

    def validation(self, windows: int, seq_len: int) -> torch.Tensor:
        """Up to *windows* evenly spaced, non-overlapping validation windows (int64)."""
        available = len(self.val) // (seq_len + 1)
        count = min(windows, available)
        stride = available // count * (seq_len + 1)
        index = torch.arange(count)[:, None] * stride + torch.arange(seq_len + 1)
        return self.val[index].long()


def pydoc_text() -> bytes:
    """The built-in corpus as bytes (see the module docstring)."""
    from pydoc_data import topics

    return SEPARATOR.join(topics.topics[key].encode("utf-8") for key in sorted(topics.topics))


def text_files(path: Path) -> list[Path]:
    """The files a user corpus at *path* is made of, in order."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise ConfigError(f"data.source: the directory {path} holds no *.txt file")
    return files


def load_corpus(source: str, *, base: Path | None = None) -> Corpus:
    """The corpus named by a config's ``data.source``: ``pydoc`` or a path.

    A relative path is taken from *base* (the config file's folder).
    """
    if source == "pydoc":
        return Corpus.from_bytes("pydoc", pydoc_text())
    if source in BUILT_IN:
        raise ConfigError(
            f"data.source: {source!r} is the emulator's data, not text; language models "
            "take 'pydoc' or a path to text"
        )
    path = Path(source).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.exists():
        raise ConfigError(
            f"data.source: {source!r} is neither built-in data ({', '.join(BUILT_IN)})"
            f"{suggest(source, BUILT_IN)} nor an existing file or directory ({path})"
        )
    try:
        data = SEPARATOR.join(f.read_bytes() for f in text_files(path))
    except OSError as exc:
        raise ConfigError(f"data.source: cannot read {exc.filename}: {exc.strerror}") from None
    return Corpus.from_bytes(str(path), data)
