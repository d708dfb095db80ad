"""``python -m train.prepare`` (issue 17): tokenizers, inputs, determinism, resume, bad input.

Text comes from the Python standard library's ``json`` and ``email`` packages (~400 KB, shipped
with Python);
tokenizers are trained here on it (a byte-level BPE with ``tokenizers``, a sentencepiece model),
so nothing is downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.tokenizer_utils import train_byte_bpe
from train.data import TokenShards, verify_shards
from train.prepare import STATE, PrepareArgs, main, parse_args, prepare

ROOT = Path(__file__).resolve().parents[2]
STDLIB_JSON = Path(json.__file__).parent


def _paragraphs() -> list[str]:
    """~1,300 distinct non-empty documents: the paragraphs of the json and email sources."""
    files = sorted(STDLIB_JSON.glob("*.py")) + sorted((STDLIB_JSON.parent / "email").glob("*.py"))
    text = "".join(p.read_text() for p in files)
    return list(dict.fromkeys(p for p in text.split("\n\n") if p.strip()))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE (vocabulary 512, EOS ``<|endoftext|>``) saved as tokenizer.json."""
    tok = train_byte_bpe(_paragraphs(), 512, ["<|endoftext|>"])
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path


def _hf(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def _docs_of(out: Path, split: str, decode, eos: int) -> list[str]:
    """The documents of a shard: split at EOS (every document ends with one), decoded."""
    meta = json.loads((out / "meta.json").read_text())
    ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]).tolist()
    assert ids and ids[-1] == eos, "a shard ends with EOS"
    docs, cur = [], []
    for i in ids:
        if i == eos:
            docs.append(decode(cur))
            cur = []
        else:
            cur.append(i)
    return docs


def _assert_round_trip(out: Path, expected: list[str], decode, eos: int) -> dict:
    meta = json.loads((out / "meta.json").read_text())
    train, val = (_docs_of(out, s, decode, eos) for s in ("train", "val"))
    assert train and val
    assert sorted(train + val) == sorted(expected)  # every document, exactly once
    for split in (train, val):  # each split keeps the input order
        pos = [expected.index(d) for d in split]
        assert pos == sorted(pos)
    assert meta["documents"] == {"train": len(train), "val": len(val)}
    assert meta["eos_id"] == eos
    assert meta["text_bytes"]["train"] == sum(len(d.encode()) for d in train)
    assert meta["text_bytes"]["val"] == sum(len(d.encode()) for d in val)
    return meta


def _jsonl_and_texts(tmp_path: Path, n_jsonl: int = 200, n_txt: int = 60) -> tuple[Path, list]:
    """``corpus/a.jsonl`` (one paragraph per line) and ``corpus/texts/*.txt`` (one per file);
    returns the folder and the documents in input order (files sorted by path)."""
    paras = _paragraphs()
    corpus = tmp_path / "corpus"
    (corpus / "texts").mkdir(parents=True)
    lines = [json.dumps({"id": i, "text": p}) for i, p in enumerate(paras[:n_jsonl])]
    (corpus / "a.jsonl").write_text("\n".join(lines) + "\n")
    txt = paras[n_jsonl : n_jsonl + n_txt]
    for i, p in enumerate(txt):
        (corpus / "texts" / f"{i:03d}.txt").write_text(p)
    return corpus, paras[:n_jsonl] + txt


def _run(tmp_path: Path, out: str, *argv: str) -> Path:
    assert main(["--out", str(tmp_path / out), "--quiet", *argv]) == 0
    return tmp_path / out


def test_hf_bpe_from_jsonl_and_text_folder_round_trips(tmp_path: Path, bpe: Path) -> None:
    corpus, docs = _jsonl_and_texts(tmp_path)
    out = _run(tmp_path, "out", "--tokenizer", str(bpe), "--val-fraction", "0.2", str(corpus))
    tok = _hf(bpe)
    eos = tok.token_to_id("<|endoftext|>")
    meta = _assert_round_trip(out, docs, tok.decode, eos)
    assert meta["vocab_size"] == tok.get_vocab_size() == 512
    assert meta["dtype"] == "uint16"
    assert meta["tokenizer"]["kind"] == "hf" and meta["tokenizer"]["name"].endswith(
        "tokenizer.json"
    )
    assert meta["tokenizer"]["sha256"] == hashlib.sha256(bpe.read_bytes()).hexdigest()
    assert meta["split"]["by"] == "document"
    assert meta["shards"]["train.bin"] == {
        "tokens": meta["train_tokens"],
        "bytes": 2 * meta["train_tokens"],
    }
    # BPE compresses: fewer tokens than bytes of text
    assert meta["train_tokens"] < meta["text_bytes"]["train"]
    # the trainer's side of the contract still holds
    assert verify_shards(out) == meta
    assert TokenShards.open(out, "val").tokens.size == meta["val_tokens"]
    assert not (out / STATE).exists()


def test_sentencepiece_round_trips(tmp_path: Path) -> None:
    import sentencepiece as spm

    corpus, docs = _jsonl_and_texts(tmp_path, 150, 20)
    (tmp_path / "train.txt").write_text("\n".join(docs))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "train.txt"),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        max_sentence_length=100_000,
        character_coverage=1.0,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    out = _run(
        tmp_path,
        "out",
        "--tokenizer",
        str(tmp_path / "sp.model"),
        "--val-fraction",
        "0.2",
        str(corpus),
    )
    meta = _assert_round_trip(out, docs, sp.Decode, sp.eos_id())
    assert meta["vocab_size"] == 400 and meta["tokenizer"]["kind"] == "sentencepiece"


def test_parquet_rows_are_documents(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _paragraphs()[:300]
    table = pa.table({"id": list(range(len(docs))), "body": docs})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=40)  # 8 row groups
    assert pq.ParquetFile(tmp_path / "d.parquet").num_row_groups == 8
    out = _run(
        tmp_path, "out", "--field", "body", "--val-fraction", "0.2", str(tmp_path / "d.parquet")
    )
    meta = _assert_round_trip(out, docs, lambda ids: bytes(ids).decode(), 0)
    assert meta["vocab_size"] == 256 and meta["tokenizer"]["kind"] == "bytes"
    # bytes tokenizer: one token per UTF-8 byte, plus one EOS per document
    n = meta["documents"]
    assert meta["train_tokens"] == meta["text_bytes"]["train"] + n["train"]


def test_jsonl_gz_matches_plain_jsonl(tmp_path: Path) -> None:
    corpus, _ = _jsonl_and_texts(tmp_path, 100, 0)
    gz = tmp_path / "gz"
    gz.mkdir()
    with gzip.open(gz / "a.jsonl.gz", "wb") as f:
        f.write((corpus / "a.jsonl").read_bytes())
    a = _run(tmp_path, "a", "--val-fraction", "0.2", str(corpus / "a.jsonl"))
    b = _run(tmp_path, "b", "--val-fraction", "0.2", str(gz / "a.jsonl.gz"))
    for name in ("train.bin", "val.bin"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {n: (out / n).read_bytes() for n in ("train.bin", "val.bin", "meta.json")}


def test_output_is_identical_for_any_number_of_workers(tmp_path: Path, bpe: Path) -> None:
    corpus, _ = _jsonl_and_texts(tmp_path, 400, 40)
    common = ["--tokenizer", str(bpe), "--batch-docs", "7", "--val-fraction", "0.1", str(corpus)]
    one = _shard_bytes(_run(tmp_path, "w1", "--workers", "1", *common))
    two = _shard_bytes(_run(tmp_path, "w2", "--workers", "2", *common))
    assert one == two
    assert len(one["train.bin"]) > 10_000


def test_resume_after_sigkill_gives_the_uninterrupted_bytes(tmp_path: Path, bpe: Path) -> None:
    corpus, _ = _jsonl_and_texts(tmp_path, 400, 40)
    common = ["--tokenizer", str(bpe), "--batch-docs", "10", "--commit-batches", "2"]
    common += ["--val-fraction", "0.1", str(corpus)]
    ref = _shard_bytes(_run(tmp_path, "ref", *common))
    out = tmp_path / "out"
    # The same command in a child process, SIGKILLed right after its 3rd commit (60 documents).
    script = textwrap.dedent(
        f"""
        import os, signal
        from train.prepare import parse_args, prepare
        args = parse_args({["--out", str(out), "--quiet", *common]!r})
        def on_commit(progress):
            if progress.docs_done >= 60:
                os.kill(os.getpid(), signal.SIGKILL)
        prepare(args, on_commit)
        """
    )
    child = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True)
    assert child.returncode == -9, child.stderr.decode()
    state = json.loads((out / STATE).read_text())
    assert state["docs_done"] == 60 and not (out / "meta.json").exists()
    # bytes written after the last commit (a kill mid-write) are dropped on resume
    for name in ("train.bin", "val.bin"):
        with (out / name).open("ab") as f:
            f.write(b"\x07" * 9)
    seen = []
    args = parse_args(["--out", str(out), "--quiet", "--workers", "2", *common])
    prepare(args, lambda p: seen.append(p.docs_done))
    assert seen[0] == 80  # continued after document 60, not from the start
    assert _shard_bytes(out) == ref
    assert not (out / STATE).exists()


def test_a_single_text_file_is_split_by_bytes(tmp_path: Path) -> None:
    text = "".join(_paragraphs()[:50]) + " naïve café ☃" * 40
    (tmp_path / "one.txt").write_text(text)
    out = _run(tmp_path, "out", "--val-fraction", "0.1", str(tmp_path / "one.txt"))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["split"]["by"] == "bytes"
    assert meta["documents"] == {"train": 1, "val": 1}
    data = text.encode()
    tr = np.fromfile(out / "train.bin", dtype=np.uint16)
    va = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert tr[-1] == 0 and va[-1] == 0
    assert bytes(tr[:-1].astype(np.uint8)) + bytes(va[:-1].astype(np.uint8)) == data
    assert abs(va.size - 1 - 0.1 * len(data)) <= 3  # the last 10%, cut at a character boundary
    bytes(va[:-1].astype(np.uint8)).decode()  # valid UTF-8 on its own


def test_a_folder_of_a_few_markdown_files_is_split_by_bytes(tmp_path: Path) -> None:
    """Three files at --val-fraction 0.05 would rarely give a validation document by the
    document rule: each file's last 5% is validation; a file too short to cut stays in train."""
    docs = tmp_path / "docs"
    docs.mkdir()
    texts = {"a.md": "# A\n" + _paragraphs()[0] * 3, "b.md": "".join(_paragraphs()[1:4]) + " ☃"}
    texts["c.md"] = "tiny"  # 4 bytes: 5% of it rounds to nothing
    for name, text in texts.items():
        (docs / name).write_text(text)
    out = _run(tmp_path, "out", str(docs))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["split"]["by"] == "bytes"
    assert meta["documents"] == {"train": 3, "val": 2}
    tr, va = (np.fromfile(out / f"{s}.bin", dtype=np.uint16).tolist() for s in ("train", "val"))
    train_docs = bytes(tr).split(b"\0")[:-1]
    val_docs = bytes(va).split(b"\0")[:-1]
    assert train_docs[2] == b"tiny"
    for i, name in enumerate(("a.md", "b.md")):
        data = texts[name].encode()
        assert train_docs[i] + val_docs[i] == data
        assert abs(len(val_docs[i]) - 0.05 * len(data)) <= 3


def _error(tmp_path: Path, capsys, *argv: str) -> str:
    assert main(["--out", str(tmp_path / "out"), "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert not (tmp_path / "out" / "meta.json").exists()
    return err


def test_empty_folder_is_no_input_files(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.bin").write_bytes(b"\x00\x01")  # filtered out by suffix
    err = _error(tmp_path, capsys, str(tmp_path / "empty"))
    assert "no input files in" in err and str(tmp_path / "empty") in err and "--suffix" in err


def test_bad_jsonl_line_names_file_and_line(tmp_path: Path, capsys) -> None:
    lines = ['{"text": "a"}', '{"text": "b"}', "{not json", '{"text": "d"}']
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    err = _error(tmp_path, capsys, str(tmp_path / "d.jsonl"))
    assert f"{tmp_path / 'd.jsonl'}:3: not a JSON object" in err


def test_missing_field_names_file_line_and_fix(tmp_path: Path, capsys) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n\n{"body": "b"}\n')
    err = _error(tmp_path, capsys, str(tmp_path / "d.jsonl"))
    assert f"{tmp_path / 'd.jsonl'}:3: no field 'text'" in err and "--field NAME" in err
    err = _error(tmp_path, capsys, "--field", "body", str(tmp_path / "d.jsonl"))
    assert f"{tmp_path / 'd.jsonl'}:1: no field 'body'" in err
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    err = _error(tmp_path, capsys, str(tmp_path / "p.parquet"))
    assert "p.parquet: no column 'text' (columns: body)" in err and "--field" in err


def test_binary_file_given_as_text_is_refused(tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("fine text\n" * 20)
    (src / "b.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    err = _error(tmp_path, capsys, str(src))
    assert f"{src / 'b.txt'}: NUL byte at offset 4" in err and "binary" in err
    (src / "b.txt").write_bytes(b"caf\xe9 latin-1")
    err = _error(tmp_path, capsys, str(src))
    assert f"{src / 'b.txt'}: invalid UTF-8 at byte 3" in err


def _wordlevel(tmp_path: Path, n: int, eos: bool) -> Path:
    """A word-level tokenizer.json with ``n`` words ``w0..w{n-1}`` (and ``</s>`` when eos)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if eos:
        tok.add_special_tokens([AddedToken("</s>", special=True)])
    path = tmp_path / f"wl{n}" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return path


def test_vocabulary_over_uint16_is_refused_or_uint32(tmp_path: Path, capsys) -> None:
    tok = _wordlevel(tmp_path, 70_000, eos=True)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"{i}.txt").write_text(f"w{69_990 + i % 10} w{i} w65536")
    err = _error(tmp_path, capsys, "--tokenizer", str(tok), "--dtype", "uint16", str(src))
    assert "vocabulary of 70,001, which exceeds --dtype uint16 (65,536 ids)" in err
    assert "--dtype uint32" in err
    out = _run(tmp_path, "ok", "--tokenizer", str(tok), "--val-fraction", "0.3", str(src))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_001 and meta["eos_id"] == 70_000
    ids = np.fromfile(out / "train.bin", dtype=np.uint32)
    assert ids.max() == 70_000 and 65_536 in ids.tolist()  # no wrap-around


def test_tokenizer_without_eos_needs_eos_id(tmp_path: Path, capsys) -> None:
    tok = _wordlevel(tmp_path, 100, eos=False)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"{i}.txt").write_text(f"w{i} w{i + 1}")
    err = _error(tmp_path, capsys, "--tokenizer", str(tok), str(src))
    assert "has no end-of-document token: pass --eos-id" in err
    out = _run(
        tmp_path, "ok", "--tokenizer", str(tok), "--eos-id", "99", "--val-fraction", "0.3", str(src)
    )
    assert json.loads((out / "meta.json").read_text())["eos_id"] == 99


def test_rerun_of_a_finished_preparation_keeps_it(tmp_path: Path) -> None:
    corpus, _ = _jsonl_and_texts(tmp_path, 50, 10)
    out = _run(tmp_path, "out", "--val-fraction", "0.2", str(corpus))
    before = _shard_bytes(out)
    mtime = (out / "train.bin").stat().st_mtime_ns
    meta = prepare(PrepareArgs(out=out, inputs=[corpus], val_fraction=0.2, quiet=True))
    assert (
        meta == json.loads(before["meta.json"]) and (out / "train.bin").stat().st_mtime_ns == mtime
    )
    # other arguments: the folder is prepared afresh, not appended to
    meta = prepare(PrepareArgs(out=out, inputs=[corpus], val_fraction=0.5, quiet=True))
    old = json.loads(before["meta.json"])
    assert meta["split"]["val_fraction"] == 0.5 and meta["val_tokens"] > old["val_tokens"]
    assert meta["train_tokens"] + meta["val_tokens"] == old["train_tokens"] + old["val_tokens"]


def test_bpe_shards_train_50_steps_with_the_vocabulary_from_meta(tmp_path: Path, bpe: Path):
    """Must-show 1 of the real-text issue: a BPE tokenizer trained here, shards prepared with
    it, 50 training steps; model.vocab_size (default 0) comes from meta.json."""
    from tests.trainer_utils import TINY, run_trainer

    corpus, _ = _jsonl_and_texts(tmp_path, n_jsonl=600, n_txt=100)
    out = _run(tmp_path, "shards", "--tokenizer", str(bpe), str(corpus))
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 512
    base = [o for o in TINY if not o.startswith("data.max_bytes")]
    res = run_trainer(
        [
            "train.steps=50",
            "optim.lr=3e-3",
            "data.name=shards",
            f"data.path={out}",
            f"run.dir={tmp_path / 'run'}",
        ],
        base=base,
    )
    assert res["weights"]["tok_embeddings.weight"].shape[0] == 512
    assert res["weights"]["output.weight"].shape[0] == 512
    losses = res["losses"]
    assert len(losses) == 50
    assert abs(losses[0] - math.log(512)) < 0.3  # starts near uniform over 512 ids
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5  # and learns (6.25 -> 5.4 measured)
    assert "val_bits_per_byte" in res["final"]
