"""The offloaded zone searched on the compute device (issue 17): a CUDA decode step with no CPU
work and no host round trip on its path.

On the CPU a layer's retriever scores, ranks and gathers on the host (core/layer.Retriever over
core/index.py). On a GPU that meant, per layer and step, the queries copied to the host, the
search there, the rows gathered and copied back: a synchronisation per layer and the CPU's speed
on the critical path (181 ms per token on an H100 at 32K, BENCHMARKS.md). `DeviceRetriever` keeps
what a step needs where the step runs:

  scoring keys  every offloaded key of the layer on the device in fp8 (e4m3, one scale per KV
                head): a quarter of bf16's bytes, 4.0 GiB for Llama-3.1-8B at 128K tokens, where
                bf16 keys (8.0 GiB) would not fit beside the 15 GiB of weights in 24 GiB
  K/V as stored in pinned host memory; the device reads only the rows a step selects, through a
                UVA view (a CUDA tensor over the pinned pages: the gather kernel reads them over
                the bus, no host copy, no synchronisation). Where no such view can be made (no
                UVA), the rows are gathered on the host and copied: correct, slower (`uva`)
  a step        per block of query rows: scores = q . K8 (one batched product), the `widen * k`
                best by that score, their keys as stored gathered, exact logits, the best k of
                those kept and their values gathered. That is the flat index's zone (the exact
                top-k) wherever fp8's rounding leaves each top-k key among the widen * k
                candidates; tests check it on random keys, where widen = 1 would miss some

Equal to the flat retriever where the candidates hold every key (tests/test_device.py, on the
CPU: the same code with the device being the CPU; a GPU run is benchmarks/gpu_check.py's).
"""
from __future__ import annotations

import torch

from .cluster import Zones
from .layer import Retriever
from .plan import DEVICE_ROWS as ROWS  # query rows scored at once (the [KVH, ROWS, N] scores bounded)
from .plan import DEVICE_WIDEN as WIDEN  # candidates per query row: WIDEN x k by fp8 score, the best k by exact logit
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0        # e4m3's largest finite value


def scoring_keys(keys: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [KVH, N, D] (any float, host) -> (fp8 [KVH, N, D] on `device`, fp32 scale [KVH, 1, 1]):
    keys ~= fp8 * scale, each KV head scaled so its largest |key| is e4m3's largest value. One
    head at a time: the transient is one head's keys in fp32."""
    KVH, N, D = keys.shape
    out = torch.empty(KVH, N, D, dtype=FP8, device=device)
    scale = torch.empty(KVH, 1, 1, dtype=torch.float32, device=device)
    for h in range(KVH):
        k = keys[h].to(device).float()
        s = (k.abs().amax() if N else k.new_zeros(())).clamp_min(1e-12) / FP8_MAX
        out[h] = (k / s).to(FP8)
        scale[h] = s
    return out, scale


def uva_view(t: torch.Tensor, device) -> torch.Tensor | None:
    """A CUDA tensor over the pinned host tensor `t` (no copy: kernels read its pages over the
    bus), or None where it cannot be made. With unified virtual addressing, pinned host memory has
    the same address on the device; the view is made through the CUDA array interface, as
    integers of the element's size (the interface has no bf16), writable as torch requires (ra
    never writes through it), and must not outlive `t`."""
    if torch.device(device).type != "cuda" or not t.is_pinned() or t.element_size() not in (2, 4):
        return None

    class _Pages:
        __cuda_array_interface__ = {"shape": tuple(t.shape), "typestr": f"<i{t.element_size()}",
                                    "data": (t.data_ptr(), False), "version": 2, "strides": None}

    try:
        return torch.as_tensor(_Pages(), device=device).view(t.dtype)
    except Exception:  # no UVA, or a torch that will not wrap host pages: the host gather serves
        return None


class DeviceRetriever(Retriever):
    """A Retriever whose search and gathers run on `device` (see the module docstring). Made from
    the same memory maps as Retriever; reads every offloaded key once (the fp8 copy) and, on a
    GPU, copies the offloaded K/V into pinned host memory."""

    def __init__(self, keys, values, index, span: tuple[int, int] | None = None, device="cpu", widen: int = WIDEN):
        super().__init__(keys, values, index, span)
        self.device, self.widen = torch.device(device), widen
        self.k8, _ = scoring_keys(self.k, self.device)  # [KVH, N, D] fp8 (the per-head scale orders nothing)
        if self.device.type == "cuda":
            self.host_k = torch.empty(self.k.shape, dtype=self.k.dtype, pin_memory=True).copy_(self.k)
            self.host_v = torch.empty(self.v.shape, dtype=self.v.dtype, pin_memory=True).copy_(self.v)
        else:
            self.host_k, self.host_v = self.k, self.v
        self.rows_k, self.rows_v = uva_view(self.host_k, self.device), uva_view(self.host_v, self.device)
        self.uva = self.rows_k is not None and self.rows_v is not None

    def _gather(self, rows, host, ids):
        """rows[h, ids[h]] -> [KVH, M, K, D] on the device, as stored. ids [KVH, M, K] (device;
        -1: a pad)."""
        from .index import gather_rows

        KVH, M, K = ids.shape
        ids = ids.clamp_min(0)  # -1 pads read row 0, as Retriever's do
        if self.device.type == "cpu":  # the memory maps themselves (tests; the CPU's own path is Retriever)
            return gather_rows(host, ids, host.dtype)
        N, D = host.shape[1], host.shape[2]
        flat = (ids + torch.arange(KVH, device=ids.device)[:, None, None] * N).reshape(-1)
        if rows is not None:  # one device kernel reads the chosen rows of the pinned pages
            return torch.index_select(rows.reshape(KVH * N, D), 0, flat).reshape(KVH, M, K, D)
        out = torch.index_select(host.reshape(KVH * N, D), 0, flat.cpu())  # no UVA: a host gather and a copy
        return out.pin_memory().to(self.device, non_blocking=True).reshape(KVH, M, K, D)

    def zones(self, q, k: int, scale: float, q_estimate=None) -> Zones:
        """q [KVH, M, D] -> the exact top-k of the candidates' zone, found on the device: ids
        [KVH, M, k] and their exact unscaled logits. Per block of ROWS query rows: bf16 scores of
        every key (fp8 x its head's scale: one order per head), the min(N, widen * k) best, their
        keys as stored gathered, exact logits, the best k kept; only ids and logits outlive a block."""
        q = q.to(self.device, torch.float32)                            # [KVH, M, D]
        c = min(self.n, self.widen * k)
        kt = self.k8.to(torch.bfloat16).transpose(1, 2)                 # [KVH, D, N]: one layer widened
        ids, logits = [], []
        for i in range(0, q.shape[1], ROWS):
            qb = q[:, i:i + ROWS]                                       # [KVH, R, D]
            cand = torch.bmm(qb.to(torch.bfloat16), kt).topk(c, dim=-1, sorted=False).indices  # [KVH, R, c]
            keys = self._gather(self.rows_k, self.host_k, cand).float()  # [KVH, R, c, D]
            exact, best = torch.matmul(keys, qb[..., None])[..., 0].topk(min(k, c), dim=-1)  # [KVH, R, k]
            ids.append(cand.gather(-1, best))
            logits.append(exact)
        return Zones(torch.cat(ids, 1), torch.cat(logits, 1), None)

    def gather_values(self, ids):
        return self._gather(self.rows_v, self.host_v, ids.to(self.device)).float()

    def gather_keys(self, ids):
        return self._gather(self.rows_k, self.host_k, ids.to(self.device)).float()
