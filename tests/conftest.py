"""Shared fixtures. Every test gets its own RA_HOME; the embedded model is converted once per
session (set RA_TEST_MODELS to a directory to keep the converted copy between runs)."""
import os
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core (-n auto): one thread each, for its ra processes too
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(name, "1")

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_docs"
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    d = os.environ.get("RA_TEST_MODELS")
    path = Path(d) if d else tmp_path_factory.mktemp("models")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def ra_home(tmp_path, models_dir, monkeypatch):
    home = tmp_path / "ra_home"
    home.mkdir()
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    monkeypatch.setenv("RA_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def smol(models_dir):
    """(model, tokenizer, identity) of the embedded SmolLM2, loaded once, fp32 on the CPU."""
    from core import model as models

    ref = models.resolve(None)
    model, tok = models.load(ref, models_dir, "cpu")
    return model, tok, ref.identity


def book_text(n_chars: int, start_marker: str = "CHAPTER I.") -> str:
    text = (SAMPLES / "alice.txt").read_text(encoding="utf-8")
    i = text.index(start_marker)
    return text[i:i + n_chars]


def tiny_model_dir(path: Path, smol, arch: str = "llama", window: int = 256) -> Path:
    """A tiny randomly initialised model saved as a transformers directory with the embedded
    model's tokenizer: real loading through `--model DIR`, a short window, fast."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = smol[1]
    if arch == "gpt2":  # learned absolute positions: no RoPE to remap
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=window))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=window))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
