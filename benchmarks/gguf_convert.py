"""Host memory and time of converting a GGUF: ra's tensor-by-tensor conversion vs transformers' own.

    python benchmarks/gguf_convert.py [--gguf FILE] [--blocks-times K] [--shards 2048,64] [--dtype float32]

Each way runs in a fresh process (its peak resident memory, VmHWM, is its own), one after the
other, in one run, on the same file (default: the embedded SmolLM2-135M-Instruct Q4_1 GGUF):
  transformers  from_pretrained(gguf_file=...) then save_pretrained: what ra did before (every
                tensor dequantized into one dict, then the model built from it)
  ra shard=N    core/gguf_convert.convert with N MiB shards (2048: the default)
--blocks-times K first writes a bigger GGUF of the same kind into a temporary directory: the
file's transformer blocks repeated K times (the same quantized bytes, block_count set to K times
the file's), so how memory grows with the model shows without a hub download. It prints, for each, the wall time, the peak RSS, and that peak less the process's peak before
converting (torch and transformers imported), and checks that every way wrote the same tensors.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
import torch, transformers, safetensors.torch  # imported before the baseline, as both ways need them
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024
base = hwm()
t = time.perf_counter()
src, out, way, shard, dtype = {src!r}, {out!r}, {way!r}, {shard!r}, {dtype!r}
if way == "transformers":
    from pathlib import Path
    from transformers import AutoModelForCausalLM
    p = Path(src)
    m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=getattr(torch, dtype))
    m.hf_quantizer = None
    if hasattr(m.config, "quantization_config"):
        del m.config.quantization_config
    m.save_pretrained(out)
else:
    from core.gguf_convert import convert
    convert(src, out, dtype, shard_bytes=shard << 20)
print(json.dumps({{"s": time.perf_counter() - t, "peak": hwm(), "base": base}}))
"""


def repeated_blocks(src: str, dst: str, times: int) -> None:
    """A GGUF like src with its transformer blocks (blk.N.*) repeated `times` times (gguf-py)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    n = int(r.fields[f"{arch}.block_count"].contents())
    w = GGUFWriter(dst, arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # written by the writer itself
        val = n * times if key == f"{arch}.block_count" else f.contents()
        w.add_key_value(key, val, f.types[0], f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None)
    for t in r.tensors:
        parts = t.name.split(".")
        names = [t.name] if parts[0] != "blk" else \
            [".".join(["blk", str(int(parts[1]) + i * n)] + parts[2:]) for i in range(times)]
        for name in names:
            w.add_tensor(name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tensors_digest(d: Path) -> str:
    import hashlib

    from safetensors import safe_open

    h = hashlib.sha256()
    rows = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                rows[k] = st.get_tensor(k)
    for k in sorted(rows):
        if k == "lm_head.weight":
            continue  # tied to the embedding: transformers may or may not write it
        h.update(k.encode())
        h.update(rows[k].contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=None, help="a .gguf file (default: the embedded model's)")
    ap.add_argument("--blocks-times", type=int, default=1, help="repeat the file's blocks K times first")
    ap.add_argument("--shards", default="2048,64", help="ra's shard sizes to run, MiB")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    from benchmarks.bench_ask import machine
    from core import model as models
    from core.gguf_convert import needs

    src = args.gguf or models.resolve(None).path
    work = tempfile.TemporaryDirectory()
    if args.blocks_times > 1:
        big = str(Path(work.name) / f"{Path(src).stem}-x{args.blocks_times}.gguf")
        repeated_blocks(src, big, args.blocks_times)
        src = big
    ways = [("transformers", 0)] + [("ra", int(s)) for s in args.shards.split(",")]
    need = needs(src, args.dtype)
    print(f"machine: {machine()}")
    print(f"file: {Path(src).name} ({Path(src).stat().st_size / 2**20:,.0f} MiB, {need.params / 1e6:,.0f}M parameters), to {args.dtype}; "
          f"ra's own estimate for 2 GiB shards: host {need.host_bytes / 2**20:,.0f} MiB, disk {need.disk_bytes / 2**20:,.0f} MiB\n")
    print("| way | wall s | peak RSS MiB | peak less baseline MiB | tensors |")
    print("|---|---:|---:|---:|---|")
    first = None
    for way, shard in ways:
        with tempfile.TemporaryDirectory(dir=work.name) as tmp:
            out = str(Path(tmp) / "out")
            code = CHILD.format(root=str(ROOT), src=str(src), out=out, way=way, shard=shard, dtype=args.dtype)
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"{way} failed:\n{r.stderr[-2000:]}")
            row = json.loads(r.stdout.strip().splitlines()[-1])
            digest = tensors_digest(Path(out))
            first = first or digest
            name = "transformers (before)" if way == "transformers" else f"ra, {shard} MiB shards"
            print(f"| {name} | {row['s']:.1f} | {row['peak'] / 2**20:,.0f} | {(row['peak'] - row['base']) / 2**20:,.0f} | "
                  f"{'same' if digest == first else 'DIFFERENT'} ({digest}) |", flush=True)


if __name__ == "__main__":
    main()
