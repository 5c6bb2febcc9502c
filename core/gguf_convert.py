"""A .gguf model file -> a transformers model directory, one tensor at a time.

transformers loads a GGUF itself (`from_pretrained(..., gguf_file=...)`), but it first dequantizes
every tensor into one dict in memory and only then builds the model from it: the whole model in
fp32 at once, and the model beside it (an 8B model: about 64 GiB of host memory). `convert` runs
the same steps per tensor instead: read it from the memory-mapped file, dequantize it (gguf-py, the
llama.cpp project's own reader), let transformers' per-architecture processor fix it up (e.g.
Llama's q/k row order), map its name with transformers' own GGUF name map, cast it to the target
dtype and append it to the current safetensors shard, written out when it reaches `shard_bytes`.
Host memory stays near one shard plus the largest tensor in fp32, whatever the model's size.

The result is a plain model directory (config.json, generation_config.json, the tokenizer,
model-0000i-of-0000n.safetensors and model.safetensors.index.json) that `from_pretrained` loads
like any other; with dtype float32 its tensors equal transformers' own conversion's, bit for bit
(tests/test_gguf_convert.py). `needs` says beforehand what a conversion takes (disk and host
memory) so a caller can refuse one that will not fit.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SHARD_BYTES = 2 << 30   # a safetensors shard is written out once it holds this much
PIECE_BYTES = 64 << 20  # a big tensor is dequantized this many fp32 bytes of rows at a time
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Needs:
    """What converting one GGUF takes: disk for the directory written, host memory at peak."""

    disk_bytes: int       # the shards (every tensor in the target dtype) + small files
    host_bytes: int       # one shard in memory + the largest tensor in fp32 (dequantized) and cast
    largest_tensor: int   # elements of the largest tensor
    params: int           # elements of all tensors


def needs(path: str | Path, dtype: str = "float32", shard_bytes: int = SHARD_BYTES) -> Needs:
    """Disk and peak host memory `convert` needs for the GGUF at `path` (its tensor table only:
    fast). Host: one shard, plus the largest tensor dequantized (fp32) and cast, plus one piece's
    temporaries; the metadata, the tokenizer and the libraries (a few hundred MiB) come on top."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    sizes = [int(t.n_elements) for t in reader.tensors]
    item = DTYPES[dtype]
    largest = max(sizes, default=0)
    total = sum(sizes) * item
    shard = min(total, shard_bytes + largest * item)  # a shard is written once it passes shard_bytes
    return Needs(disk_bytes=total + (64 << 20), host_bytes=shard + largest * (4 + item) + 3 * PIECE_BYTES,
                 largest_tensor=largest, params=sum(sizes))


def dequantized(tensor, piece_bytes: int = PIECE_BYTES):
    """One GGUF tensor (a gguf-py ReaderTensor) as a numpy array, fp32 for quantized types. A big
    tensor is dequantized a slice of rows at a time into one preallocated array (quantized blocks
    never span rows, so the result is the same): gguf-py's dequantize holds a few temporaries the
    size of its output, which for an 8B model's embedding would be several GiB."""
    import numpy as np
    from gguf import dequantize

    data = tensor.data
    rows = data.shape[0] if data.ndim > 1 else 1
    per_row = max(1, int(tensor.n_elements) // rows) * 4
    step = max(1, piece_bytes // per_row)
    if data.ndim < 2 or rows <= step:
        return dequantize(data, tensor.tensor_type)
    out = None
    for a in range(0, rows, step):
        part = dequantize(data[a:a + step], tensor.tensor_type)
        if out is None:
            out = np.empty((rows,) + part.shape[1:], part.dtype)
        out[a:a + len(part)] = part
    return out


def convert(path: str | Path, out: Path, dtype: str = "float32", shard_bytes: int = SHARD_BYTES,
            progress=None) -> None:
    """Write the model directory of the GGUF at `path` into `out` (an empty or new directory).

    progress(done_bytes, total_bytes) is called after each tensor (bytes of the GGUF read)."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map, load_gguf_checkpoint,
                                                          read_field)

    path, out = Path(path), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src, name = str(path.parent), path.name
    target = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]

    # the config and tokenizer as transformers reads them from the GGUF's metadata (no tensors);
    # the config from the same parse AutoConfig.from_pretrained(gguf_file=) makes (one parse less)
    parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    fields = dict(parsed["config"])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config.dtype = target
    AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(out)
    reader = GGUFReader(str(path))
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    with torch.device("meta"):  # the model's parameter names, without its memory
        skeleton = AutoModelForCausalLM.from_config(config)
    names = get_gguf_hf_weights_map(skeleton, processor)
    expected = set(skeleton.state_dict())
    tied = getattr(config, "tie_word_embeddings", False)
    config.architectures = [type(skeleton).__name__]
    del skeleton

    shard: dict[str, torch.Tensor] = {}  # the shard being filled; written out past shard_bytes
    filled = stored = done = 0
    files: list[Path] = []
    weight_map: dict[str, int] = {}
    total = sum(int(t.n_bytes) for t in reader.tensors)

    def flush() -> None:
        nonlocal shard, filled
        if shard:
            f = out / f".shard-{len(files):05d}.safetensors"
            save_file(shard, str(f), metadata={"format": "pt"})
            files.append(f)
            shard, filled = {}, 0

    for t in reader.tensors:
        weights = dequantized(t)  # numpy, fp32 (or the file's own float type)
        result = processor.process(weights=weights, name=t.name, tensor_key_mapping=names, parsed_parameters=parsed)
        done += int(t.n_bytes)
        if result.name in names:
            hf = names[result.name]
            tensor = torch.from_numpy(np.array(result.weights)).to(target)  # a copy: the file's own tensors are read-only maps
            shard[hf] = tensor
            weight_map[hf] = len(files)
            filled += tensor.nbytes
            stored += tensor.nbytes
            if filled >= shard_bytes:
                flush()
        del weights, result
        if progress:
            progress(done, total)
    flush()

    missing = expected - set(weight_map) - ({"lm_head.weight"} if tied else set())
    if missing:
        from .errors import ModelError

        raise ModelError(f"{name}: the GGUF has no tensor for {len(missing)} of the model's parameters "
                         f"(e.g. {sorted(missing)[0]}); ra cannot convert it")
    n = len(files)
    final = {}
    for i, f in enumerate(files):
        final[i] = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        f.rename(out / final[i])
    index = {"metadata": {"total_size": stored},
             "weight_map": {k: final[i] for k, i in sorted(weight_map.items())}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
