"""The README's "Start from a Hugging Face model" commands run as written (issue 16, must-show 6):
prepare shards with the model's tokenizer, import and train on one process and on 4 ranks (tp2 x
pp2), export to a Hugging Face folder, generate with Lattice and with transformers from the export.

The commands are read from the README's bash block, so the test fails when the README changes
to something that does not work. Only paths (``/models/my-llama``, ``/data/my-shards``,
``texts/``, ``runs/``) are substituted, ``train.steps=2`` is appended to the training commands, and
torchrun gets a free rendezvous port. The model is a random tiny ``LlamaForCausalLM`` with a
byte-level BPE tokenizer (vocabulary 300) saved beside it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.harness import free_port
from tests.unit.test_hf_import import VOCAB, save_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
STDLIB = Path(json.__file__).parent
transformers = pytest.importorskip("transformers")


def readme_commands() -> list[str]:
    """The commands of the README section's bash block (continuations joined, comments
    dropped)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Start from a Hugging Face model", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    joined = block.replace("\\\n", "")
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.startswith("#")]


def _tokenizer(folder: Path) -> None:
    """A byte-level BPE of VOCAB ids (EOS ``<|endoftext|>``) as the model's tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([p.read_text() for p in sorted(STDLIB.glob("*.py"))], trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def _argv(command: str, tmp: Path) -> list[str]:
    paths = {
        "/models/my-llama": str(tmp / "my-llama"),
        "/data/my-shards": str(tmp / "my-shards"),
        "texts/": str(tmp / "texts"),
        "runs/": f"{tmp}/runs/",
    }
    for old, new in paths.items():
        command = command.replace(old, new)
    argv = shlex.split(command)
    if argv[0] == "python":
        argv[0] = sys.executable
    if argv[0] == "torchrun":
        argv = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--master_port={free_port()}",
            *argv[1:],
        ]
    if "train" in argv and argv[argv.index("train") - 1] == "-m":
        argv.append("train.steps=2")
    return argv


@pytest.mark.slow
@pytest.mark.distributed
def test_readme_hf_commands_run_as_written(tmp_path: Path) -> None:
    commands = readme_commands()
    kinds = [
        c.split()[0] + " " + c.split()[2] if c.startswith("python -m") else c.split()[0]
        for c in commands
    ]
    assert kinds == [
        "python train.prepare",
        "python train",
        "torchrun",
        "python checkpoint.export",
        "python train.generate",
        "python",
    ], commands
    save_tiny_llama(tmp_path / "my-llama", max_position_embeddings=128)
    _tokenizer(tmp_path / "my-llama")
    (tmp_path / "texts").mkdir()
    for p in sorted((STDLIB.parent / "email").glob("*.py")):
        (tmp_path / "texts" / p.name).write_text(p.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    outputs = []
    for command in commands:
        proc = subprocess.run(
            _argv(command, tmp_path),
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
        outputs.append(proc.stdout)
    assert (tmp_path / "runs/ft4/hf/tokenizer.json").is_file()  # copied along on export
    assert outputs[-1].startswith("def ") and len(outputs[-1]) > len("def \n")
