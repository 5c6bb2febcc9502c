"""The tensor-by-tensor GGUF conversion (core/gguf_convert.py) against transformers' own loading
of the same file, and what `load` does before and after converting."""
import os

import pytest


@pytest.fixture(scope="module")
def reference_state(smol):
    """transformers' own conversion of the embedded GGUF (every tensor dequantized at once)."""
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    from core import model as models

    path = Path(models.resolve(None).path)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return ref.state_dict()


def test_fp32_conversion_equals_transformers_own_bit_for_bit(smol, reference_state, models_dir):
    import json

    import torch

    from core import model as models

    got = smol[0].state_dict()  # the session's model: converted tensor by tensor, loaded from its shards
    assert set(got) == set(reference_state)
    for name, t in reference_state.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], t), name
    d = models.converted_dir(models.resolve(None), models_dir)
    assert json.loads((d / "ra-model.json").read_text())["dtype"] == "float32"
    from transformers import AutoConfig  # the config as transformers reads it from the GGUF itself

    src = models.resolve(None).path
    own = AutoConfig.from_pretrained(os.path.dirname(src), gguf_file=os.path.basename(src)).to_dict()
    saved = AutoConfig.from_pretrained(d).to_dict()
    ours = ("dtype", "architectures", "transformers_version", "_name_or_path")  # set by the save, not the GGUF
    assert {k: v for k, v in own.items() if k not in ours} == {k: v for k, v in saved.items() if k not in ours}
    assert saved["dtype"] == "float32" and saved["architectures"] == ["LlamaForCausalLM"]
    assert not [p for p in d.parent.iterdir() if ".tmp-" in p.name]


def test_bf16_conversion_is_the_reference_cast_and_sharded(tmp_path, reference_state):
    import json

    import torch
    from safetensors.torch import load_file

    from core import model as models
    from core.gguf_convert import convert

    out = tmp_path / "bf16"
    seen = []
    convert(models.resolve(None).path, out, "bfloat16", shard_bytes=64 << 20, progress=lambda d, t: seen.append((d, t)))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    got = {}
    for s in shards:
        got.update(load_file(out / s))
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in got.values())
    for name, t in got.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, reference_state[name].to(torch.bfloat16)), name
    assert set(reference_state) - set(got) <= {"lm_head.weight"}  # tied to the embedding
    assert seen[-1][0] == seen[-1][1] and all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_conversion_that_will_not_fit_is_refused_up_front(tmp_path):
    from core import model as models
    from core.errors import ModelError
    from core.gguf_convert import needs

    ref = models.resolve(None)
    need = needs(ref.path)
    # the embedded model: 272 tensors, the largest the 49,152 x 576 embedding
    assert need.largest_tensor == 49152 * 576
    assert need.disk_bytes > 134_000_000 * 4
    assert need.largest_tensor * 8 < need.host_bytes < 2 * need.disk_bytes  # one shard (all of it here) + the largest
    root = tmp_path / "models"
    with pytest.raises(ModelError, match=r"needs .* of disk in .*, 100\.0 MiB free"):
        models._convert_gguf(ref, root, room=(100 << 20, None))
    with pytest.raises(ModelError, match=r"needs .* of host memory .*, 200\.0 MiB available"):
        models._convert_gguf(ref, root, room=(1 << 40, 200 << 20))
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.parametrize("content", [b"not a gguf at all" * 100, "truncated"], ids=["junk", "truncated"])
def test_a_damaged_gguf_is_one_line_and_leaves_nothing(tmp_path, content):
    from core import model as models
    from core.errors import ModelError

    bad = tmp_path / "bad.gguf"
    if content == "truncated":
        with open(models.resolve(None).path, "rb") as f:
            content = f.read(2 << 20)
    bad.write_bytes(content)
    root = tmp_path / "models"
    with pytest.raises(ModelError) as e:
        models.load(models.resolve(str(bad)), root)
    assert "\n" not in str(e.value) and "bad.gguf" in str(e.value)
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []
    assert bad.read_bytes() == content  # the source is never touched


def test_the_benchmarks_bigger_gguf_repeats_the_blocks(tmp_path):
    """benchmarks/gguf_convert.py --blocks-times K: K times the blocks, the rest as it was."""
    import sys

    from gguf import GGUFReader

    from conftest import ROOT
    from core import model as models
    from core.gguf_convert import needs

    sys.path.insert(0, str(ROOT))
    from benchmarks.gguf_convert import repeated_blocks

    src = models.resolve(None).path
    out = tmp_path / "x2.gguf"
    repeated_blocks(src, str(out), 2)
    a, b = GGUFReader(src), GGUFReader(str(out))
    assert int(b.fields["llama.block_count"].contents()) == 2 * int(a.fields["llama.block_count"].contents())
    blocks = sum(int(t.n_elements) for t in a.tensors if t.name.startswith("blk."))
    assert needs(out).params == needs(src).params + blocks
    assert b.fields["tokenizer.ggml.tokens"].contents() == a.fields["tokenizer.ggml.tokens"].contents()
    last = {t.name: t for t in b.tensors}["blk.59.attn_q.weight"]
    assert (last.data == {t.name: t for t in a.tensors}["blk.29.attn_q.weight"].data).all()
