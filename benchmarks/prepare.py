"""Prepare benchmark: ``python -m train.prepare`` against Hugging Face ``datasets`` on one corpus.

    python -m benchmarks.prepare                           # 200 MB corpus, 3 repeats, RSS 50/500 MB
    python -m benchmarks.prepare --mb 4 --repeat 1 --rss-small-mb 2 --rss-large-mb 20   # a smoke run

One run, in a work folder (``--work``, default ``/tmp/lattice_prepare_bench``) that is deleted at
the end:

* **Corpus**: ``--mb`` MB of JSON lines (field ``text``), generated deterministically (seed 0):
  documents of 20..4000 words (log-uniform), words drawn Zipf-like from the identifiers of the
  Python stdlib's ``.py`` files, a newline every ~12 words.
* **Tokenizer**: one byte-level BPE (``tokenizers``, vocabulary 8,192, special token
  ``<|endoftext|>``) trained on the corpus's first 4 MB; both sides use this ``tokenizer.json``.
* **Lattice**: ``python -m train.prepare --tokenizer tok.json --out DIR --workers 2 --quiet
  corpus.jsonl``, a fresh ``DIR`` per run. It writes ``train.bin`` + ``val.bin`` (uint16 ids, EOS
  after every document) and ``meta.json``.
* **datasets**: in a fresh process, ``load_dataset("json", data_files=corpus, split="train",
  cache_dir=C)`` then ``.map(tokenize, batched=True, num_proc=2, remove_columns=["text"])`` with
  ``tokenize`` = ``Tokenizer.from_file(tok.json).encode_batch(texts, add_special_tokens=False)``
  plus the EOS id after every document (as Lattice does). ``C`` is a fresh cache folder per run
  and ``keep_in_memory`` is left False, so the time includes writing datasets' Arrow cache (the
  corpus as Arrow, then the ``input_ids`` column, int64 lists: datasets' default).
* **datasets_fast**: the same with ``encode_batch_fast`` (the same ids, no character offsets;
  Lattice's encoder calls it), so the ratio that remains is the pipelines', not that call's.

Both sides run as subprocesses timed by wall clock from start to exit (interpreter start and
imports included), ``TOKENIZERS_PARALLELISM=false`` for both (the two processes are the
parallelism; Lattice's workers set it themselves), ``--repeat`` times each, alternating; the
figures are medians. ratio = datasets seconds / Lattice seconds (>= 1: Lattice at least as fast).
The 1-minute load average before and after every run is recorded (the cores may be shared).
The token counts must be equal, and after the timed runs the token streams are compared in full:
datasets' per-document ids, split by Lattice's documented rule (crc32 of ``corpus.jsonl#INDEX``)
and concatenated, must equal ``train.bin`` and ``val.bin``.

**Peak RSS**: ``python -m train.prepare --workers 2`` on a ``--rss-small-mb`` corpus (seed 1) and
on a ``--rss-large-mb`` corpus (the small one repeated), the process tree's RSS (parent plus all
descendants, summed) polled with psutil every 0.05 s; the peak of that sum is reported. Summed RSS
counts pages shared by the forked workers once per process, so it overstates the real footprint
but equally for both sizes. Pass: large/small <= 1.10.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np

from benchmarks.common import median, write_results

ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000
EOS = "<|endoftext|>"
VOCAB = 8192
TOKENIZER_SAMPLE = 4 * MB
POLL_S = 0.05
VAL_FRACTION = 0.05  # train.prepare's default, used by the stream comparison
# side -> the datasets tokenize function's Tokenizer method ("" = Lattice)
SIDES = {"lattice": "", "datasets": "encode_batch", "datasets_fast": "encode_batch_fast"}


# -- corpus and tokenizer --------------------------------------------------------------------
def stdlib_words(limit: int = 30_000) -> list[str]:
    """Distinct identifiers of the stdlib's .py files (sorted files, first-seen order)."""
    seen: dict[str, None] = {}
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in f.parts or "test" in f.parts:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]{1,20}", text):
            seen.setdefault(w, None)
            if len(seen) >= limit:
                return list(seen)
    return list(seen)


def write_corpus(path: Path, mb: float, seed: int, words: list[str]) -> int:
    """``mb`` MB (at least) of jsonl documents; returns the bytes written."""
    rng = np.random.default_rng(seed)
    vocab = np.array(words, dtype=object)
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.05
    p /= p.sum()
    target, size = int(mb * MB), 0
    with path.open("w", encoding="utf-8") as f:
        while size < target:
            lines = []
            for _ in range(64):
                n = int(np.exp(rng.uniform(np.log(20), np.log(4000))))
                toks = vocab[rng.choice(len(words), size=n, p=p)]
                breaks = rng.random(n) < 1 / 12
                text = "".join(w + ("\n" if b else " ") for w, b in zip(toks, breaks)).strip()
                lines.append(json.dumps({"text": text}) + "\n")
            chunk = "".join(lines)
            f.write(chunk)
            size += len(chunk.encode("utf-8"))
    return size


def train_tokenizer(corpus: Path, out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def sample():
        n = 0
        with corpus.open(encoding="utf-8") as f:
            for line in f:
                n += len(line)
                yield json.loads(line)["text"]
                if n >= TOKENIZER_SAMPLE:
                    return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample(), trainer)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.json"
    tok.save(str(path))
    return path


# -- the datasets side (run in its own process) ----------------------------------------------
_TOK = None


def _tokenize(batch: dict, tok_path: str, eos: int, method: str) -> dict:
    global _TOK
    if _TOK is None:
        from tokenizers import Tokenizer

        _TOK = Tokenizer.from_file(tok_path)
    encs = getattr(_TOK, method)(batch["text"], add_special_tokens=False)
    return {"input_ids": [[*e.ids, eos] for e in encs]}


def datasets_side(
    corpus: str,
    tok_path: str,
    cache: str,
    out_json: str,
    verify: str = "",
    method: str = "encode_batch",
) -> None:
    """``load_dataset("json")`` + ``.map(batched=True, num_proc=2)`` tokenizing with
    ``Tokenizer.<method>``; writes its figures to ``out_json``. With ``verify`` (a Lattice output
    folder) the token streams are compared."""
    t0 = time.perf_counter()
    import pyarrow.compute as pc
    from datasets import load_dataset
    from tokenizers import Tokenizer

    eos = Tokenizer.from_file(tok_path).token_to_id(EOS)
    t_import = time.perf_counter()
    ds = load_dataset("json", data_files=corpus, split="train", cache_dir=cache)
    t_load = time.perf_counter()
    ds = ds.map(
        _tokenize,
        batched=True,
        num_proc=2,
        remove_columns=["text"],
        fn_kwargs={"tok_path": tok_path, "eos": eos, "method": method},
        desc=None,
    )
    t_map = time.perf_counter()
    col = ds.data.column("input_ids")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    res = {
        "documents": len(ds),
        "tokens": int(lengths.sum()),
        "import_s": t_import - t0,
        "load_s": t_load - t_import,
        "map_s": t_map - t_load,
        "cache_files": [c["filename"] for c in ds.cache_files],
    }
    res["cache_bytes"] = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file())
    if verify:
        flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
        keys = [f"corpus.jsonl#{i}".encode() for i in range(len(ds))]
        is_val = np.array([zlib.crc32(k) % 10_000 < VAL_FRACTION * 10_000 for k in keys])
        token_val = np.repeat(is_val, lengths)
        meta = json.loads((Path(verify) / "meta.json").read_text())
        same = {}
        for split, mask in (("train", ~token_val), ("val", token_val)):
            shard = np.fromfile(Path(verify) / f"{split}.bin", dtype=meta["dtype"])
            want = flat[mask]
            same[split] = bool(shard.size == want.size and np.array_equal(shard, want))
        res["streams_identical"] = same
        res["documents_per_split"] = {"train": int((~is_val).sum()), "val": int(is_val.sum())}
    Path(out_json).write_text(json.dumps(res))


# -- running and measuring -------------------------------------------------------------------
def run_tree(cmd: list[str], env: dict, log: Path) -> tuple[float, int]:
    """Wall seconds and peak summed RSS (bytes) of ``cmd``'s process tree (psutil, every
    ``POLL_S`` s)."""
    import psutil

    with log.open("w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        ps, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            total = 0
            try:
                procs = [ps, *ps.children(recursive=True)]
            except psutil.Error:
                procs = []
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            peak = max(peak, total)
            time.sleep(POLL_S)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    return wall, peak


def env_for() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    }


def lattice_cmd(corpus: Path, tok: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "train.prepare", "--tokenizer", str(tok), "--out", str(out),
        "--workers", "2", "--quiet", str(corpus),
    ]  # fmt: skip


def datasets_cmd(
    corpus: Path, tok: Path, cache: Path, res: Path, verify: Path | None, method: str
) -> list:
    code = "import sys; from benchmarks.prepare import datasets_side; datasets_side(*sys.argv[1:])"
    args = [str(corpus), str(tok), str(cache), str(res), str(verify or ""), method]
    return [sys.executable, "-c", code, *args]


def load_average() -> float:
    """The 1-minute load average (other users of the machine's cores show here)."""
    return os.getloadavg()[0]


def _lattice_run(corpus: Path, tok: Path, out: Path, env: dict, log: Path) -> dict:
    load = load_average()
    wall, peak = run_tree(lattice_cmd(corpus, tok, out), env, log)
    meta = json.loads((out / "meta.json").read_text())
    written = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return {
        "seconds": wall,
        "peak_rss_mb": peak / MB,
        "tokens": meta["train_tokens"] + meta["val_tokens"],
        "documents": meta["documents"]["train"] + meta["documents"]["val"],
        "written_mb": written / MB,
        "load_before": load,
        "load_after": load_average(),
    }


def _datasets_run(work: Path, name: str, corpus: Path, tok: Path, env: dict, method: str) -> dict:
    cache, res = work / f"hf_cache_{name}", work / f"hf_{name}.json"
    load = load_average()
    cmd = datasets_cmd(corpus, tok, cache, res, None, method)
    wall, peak = run_tree(cmd, env, res.with_suffix(".log"))
    r = json.loads(res.read_text())
    shutil.rmtree(cache)
    return {
        "seconds": wall,
        "peak_rss_mb": peak / MB,
        "tokens": r["tokens"],
        "documents": r["documents"],
        "written_mb": r["cache_bytes"] / MB,
        "in_process_s": {k: r[k] for k in ("import_s", "load_s", "map_s")},
        "load_before": load,
        "load_after": load_average(),
    }


def rss_case(work: Path, corpus: Path, tok: Path, env: dict) -> dict:
    out = work / f"rss_{corpus.stem}"
    wall, peak = run_tree(lattice_cmd(corpus, tok, out), env, work / f"rss_{corpus.stem}.log")
    meta = json.loads((out / "meta.json").read_text())
    shutil.rmtree(out)
    return {
        "corpus_mb": corpus.stat().st_size / MB,
        "seconds": wall,
        "peak_rss_mb": peak / MB,
        "tokens": meta["train_tokens"] + meta["val_tokens"],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.prepare", description=__doc__)
    ap.add_argument("--mb", type=float, default=200, help="corpus size for the timing (MB)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per side")
    ap.add_argument("--rss-small-mb", type=float, default=50)
    ap.add_argument("--rss-large-mb", type=float, default=500)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lattice_prepare_bench"))
    ap.add_argument("--name", default="prepare", help="results file name")
    a = ap.parse_args(argv)
    work, env = a.work, env_for()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        _bench(a, work, env)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bench(a, work: Path, env: dict) -> None:
    t = time.perf_counter()
    words = stdlib_words()
    corpus = work / "corpus.jsonl"
    size = write_corpus(corpus, a.mb, 0, words)
    tok = train_tokenizer(corpus, work / "tok")
    print(f"corpus {size / MB:.1f} MB, tokenizer trained ({time.perf_counter() - t:.0f} s)")

    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for i in range(a.repeat):
        out = work / f"lattice_{i}"
        runs["lattice"].append(_lattice_run(corpus, tok, out, env, work / f"lattice_{i}.log"))
        keep = out  # the last run's shards are compared with datasets' stream
        if i < a.repeat - 1:
            shutil.rmtree(out)
        for side, method in SIDES.items():
            if method:
                runs[side].append(_datasets_run(work, f"{side}_{i}", corpus, tok, env, method))
        print(f"run {i}: " + ", ".join(f"{k} {v[-1]['seconds']:.1f} s" for k, v in runs.items()))

    # untimed: the full token streams, datasets' split by Lattice's rule vs Lattice's shards
    cache, res = work / "hf_cache_verify", work / "hf_verify.json"
    cmd = datasets_cmd(corpus, tok, cache, res, keep, "encode_batch")
    run_tree(cmd, env, res.with_suffix(".log"))
    verify = json.loads(res.read_text())
    shutil.rmtree(cache)
    shutil.rmtree(keep)
    lat_tokens = {r["tokens"] for r in runs["lattice"]}
    hf_tokens = {r["tokens"] for side in SIDES if SIDES[side] for r in runs[side]}
    assert len(lat_tokens) == 1 and lat_tokens == hf_tokens, (lat_tokens, hf_tokens)
    assert all(verify["streams_identical"].values()), verify["streams_identical"]
    tokens = lat_tokens.pop()
    corpus.unlink()

    # peak RSS of train.prepare on a small and a large corpus
    small, large = work / "rss_small.jsonl", work / "rss_large.jsonl"
    write_corpus(small, a.rss_small_mb, 1, words)
    reps = max(1, round(a.rss_large_mb / a.rss_small_mb))
    with large.open("wb") as f:
        for _ in range(reps):
            with small.open("rb") as s:
                shutil.copyfileobj(s, f, 1 << 22)
    rss = {"small": rss_case(work, small, tok, env), "large": rss_case(work, large, tok, env)}
    rss_ratio = rss["large"]["peak_rss_mb"] / rss["small"]["peak_rss_mb"]

    summary, rows = {}, []
    for side, rs in runs.items():
        sec = median([r["seconds"] for r in rs])
        summary[side] = {
            "seconds": sec,
            "mb_per_s": median([size / MB / r["seconds"] for r in rs]),
            "tokens_per_s": median([tokens / r["seconds"] for r in rs]),
            "peak_rss_mb": median([r["peak_rss_mb"] for r in rs]),
            "written_mb": median([r["written_mb"] for r in rs]),
        }
        rows.append({"side": side, **summary[side], "runs": len(rs)})
    ratio = summary["datasets"]["seconds"] / summary["lattice"]["seconds"]
    ratio_fast = summary["datasets_fast"]["seconds"] / summary["lattice"]["seconds"]
    loads = [r[k] for rs in runs.values() for r in rs for k in ("load_before", "load_after")]
    rss_ok = rss_ratio <= 1.10
    for k in ("small", "large"):
        rows.append(
            {
                "side": f"lattice RSS {k} ({rss[k]['corpus_mb']:.0f} MB)",
                "seconds": rss[k]["seconds"],
                "mb_per_s": rss[k]["corpus_mb"] / rss[k]["seconds"],
                "tokens_per_s": rss[k]["tokens"] / rss[k]["seconds"],
                "peak_rss_mb": rss[k]["peak_rss_mb"],
                "written_mb": "",
                "runs": 1,
            }
        )
    command = (
        f"python -m benchmarks.prepare --mb {a.mb:g} --repeat {a.repeat} "
        f"--rss-small-mb {a.rss_small_mb:g} --rss-large-mb {a.rss_large_mb:g}"
    )
    data = {
        "command": command,
        "corpus_mb": size / MB,
        "documents": runs["lattice"][0]["documents"],
        "tokens": tokens,
        "tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab_size": VOCAB, "eos": EOS},
        "repeat": a.repeat,
        "summary": summary,
        "ratio_datasets_over_lattice": ratio,
        "ratio_datasets_fast_over_lattice": ratio_fast,
        "lattice_at_least_as_fast": ratio >= 1,
        "load_average_1min": {"min": min(loads), "max": max(loads)},
        "streams_identical": verify["streams_identical"],
        "runs": runs,
        "rss": {**rss, "ratio_large_over_small": rss_ratio, "within_10_percent": rss_ok},
        "rss_method": "psutil: sum of RSS over the process and all descendants, every 0.05 s",
        "writes": {
            "lattice": "train.bin + val.bin (uint16 ids, EOS after each document) + meta.json",
            "datasets": "Arrow cache: the corpus as Arrow (load_dataset json) and the input_ids "
            "column (int64 lists) from map(num_proc=2), fresh cache dir per run",
            "datasets_fast": "the same, tokenizing with encode_batch_fast (no offsets, as "
            "Lattice's encoder does)",
        },
    }
    notes = (
        f"`{command}` on this machine's 2 CPU cores (times are this CPU's, wall clock of each "
        f"side's whole process: start, imports, reading, tokenizing, writing). Corpus: "
        f"{size / MB:.0f} MB of jsonl, {data['documents']:,} documents, {tokens:,} tokens "
        f"(byte-level BPE, vocabulary {VOCAB:,}, EOS after each document), the same tokenizer.json "
        f"on both sides. Lattice: `python -m train.prepare --workers 2` (writes train.bin + "
        f"val.bin uint16 + meta.json). datasets: `load_dataset('json')` + `.map(batched=True, "
        f"num_proc=2)`, fresh cache dir per run, keep_in_memory=False (writes its Arrow cache: "
        f"the text and int64 input_ids); its tokenize function calls `Tokenizer.encode_batch`, "
        f"and datasets_fast calls `encode_batch_fast` (the same ids without character offsets, "
        f"which is what Lattice's encoder calls). Medians of {a.repeat} runs per side, the sides "
        f"alternating. **ratio datasets/Lattice = {ratio:.2f}**, datasets_fast/Lattice = "
        f"{ratio_fast:.2f} (>= 1: Lattice at least as fast). 1-minute load average (other "
        f"engineers share the 2 cores) between {min(loads):.2f} and {max(loads):.2f} around the "
        f"timed runs (a load above ~2 means the runs competed for the cores). Token counts "
        f"equal; full token streams identical (datasets' ids split by Lattice's crc32 rule vs "
        f"train.bin/val.bin): {verify['streams_identical']}. Peak RSS of the train.prepare "
        f"process tree (psutil, RSS summed over parent and workers, every 0.05 s): "
        f"{rss['small']['peak_rss_mb']:.0f} MB on {rss['small']['corpus_mb']:.0f} MB, "
        f"{rss['large']['peak_rss_mb']:.0f} MB on {rss['large']['corpus_mb']:.0f} MB: "
        f"**ratio {rss_ratio:.3f}** (within 10%: {rss_ok})."
    )
    write_results(a.name, data, rows, notes)
    print(json.dumps({k: data[k] for k in ("summary", "ratio_datasets_over_lattice")}, indent=1))
    print(json.dumps(data["rss"], indent=1))


if __name__ == "__main__":
    main()
