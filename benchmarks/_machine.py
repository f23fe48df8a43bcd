"""The machine's own limits, measured in the run that uses them: fp32 (and native bf16) matmul rates at the
model's shapes, memory bandwidth, and what the CPU is (model name, flags, cores)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")


def cpu_info(text: str) -> dict:
    """Model name, flags and logical CPU count from the text of /proc/cpuinfo (first processor's entries)."""
    fields: dict[str, str] = {}
    count = 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            count += 1
        if key and key not in fields:
            fields[key] = value.strip()
    flags = fields.get("flags", "").split()
    return {"model": fields.get("model name", platform.processor() or "unknown"), "logical_cpus": count,
            "flags": flags, "vector_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4")))}


def native_bf16(flags: list[str]) -> bool:
    """bf16 matmuls run natively only with AVX512-BF16 or AMX (elsewhere torch emulates them, far slower)."""
    return any(flag in flags for flag in BF16_FLAGS)


def matmul_shapes(hidden: int, intermediate: int, vocab: int, rows: int) -> dict[str, tuple[int, int, int]]:
    """(M, K, N) of the model's weight matmuls for `rows` token rows: attention in/out, MLP up/down, LM head."""
    return {"attn": (rows, hidden, hidden), "mlp_up": (rows, hidden, intermediate),
            "mlp_down": (rows, intermediate, hidden), "lm_head": (rows, hidden, vocab)}


def packed_product(w):
    """x -> x @ w^T through oneDNN with `w` (n x k) packed ahead of time, as rto's sampler and scoring pass run
    their products on CPUs where rto.decoding.onednn_packs allows it; None elsewhere."""
    from rto.decoding import onednn_packs, pack_weight, packed_linear

    if not onednn_packs(w.dtype):
        return None
    packed = pack_weight(w)
    return lambda x: packed_linear(x, packed)


def matmul_gflops(m: int, k: int, n: int, dtype, seconds: float = 0.5, threads: int | None = None) -> float:
    """Best-of-5 rate of `(m x k) @ (k x n)` in GFLOP/s (2*m*k*n FLOPs a product), each sample `seconds` long,
    the better of torch's default product and oneDNN's with a packed weight (packed_product) where rto uses it."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    ways = [lambda: a @ b]
    packed = packed_product(b.t().contiguous())
    if packed is not None:
        ways.append(lambda: packed(a))
    best = 0.0
    for product in ways:
        for _ in range(3):
            product()
        start = time.perf_counter()
        product()
        reps = max(1, int(seconds / max(time.perf_counter() - start, 1e-6)))
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(reps):
                product()
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9)
    return best


def copy_bandwidth_gbs(mbytes: int = 512, repeats: int = 5) -> float:
    """Best memory bandwidth of `dst.copy_(src)` over a `mbytes` MB fp32 tensor, counting read + write (GB/s)."""
    import torch

    src = torch.randn(mbytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = max(best, 2 * src.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return best


def decode_step_floor(weights: list[tuple[int, int]], rows: int, repeats: int = 5) -> dict:
    """The weight matmuls of one decode step, timed alone: `rows` token rows through every weight matrix of the
    model in turn, each its own tensor of shape (out, in) as nn.Linear holds it (so each step streams all of
    them from memory, as a real step does; a rate measured on one matrix reused in cache is far higher).
    Each matrix runs every way its product can be computed, x @ W^T (nn.Linear), (W @ x^T)^T (what rto's decode
    loop does without oneDNN's packed products) and, where rto uses them, oneDNN's with a packed weight, and
    counts the fastest. Returns the step time (the sum of each matrix's
    best time over `repeats`), the weights' size, and the ceiling rows / time: no decode loop at this batch size
    can sample more tokens/s in fp32 on this machine, whatever it does besides."""
    import torch
    import torch.nn.functional as F

    mats = [torch.randn(out, inp) for out, inp in weights]
    xs = {inp: torch.randn(rows, inp) for _, inp in weights}
    ways = [lambda x, w: F.linear(x, w), lambda x, w: torch.mm(w, x.t())]
    packed = {id(w): packed_product(w) for w in mats}
    if all(packed.values()):
        ways.append(lambda x, w: packed[id(w)](x))
    best = [[float("inf")] * len(ways) for _ in mats]
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first step warms up
            for way, product in enumerate(ways):
                for i, w in enumerate(mats):
                    start = time.perf_counter()
                    product(xs[w.shape[1]], w)
                    best[i][way] = min(best[i][way], time.perf_counter() - start)
    step = sum(map(min, best))
    return {"rows": rows, "weights_mb": sum(w.numel() for w in mats) * 4 / 2**20, "step_s": step,
            "ceiling_tokens_per_s": rows / step}


def measure_limits(hidden: int, intermediate: int, vocab: int, row_counts: dict[str, int], quick: bool,
                   decode_weights: list[tuple[int, int]] | None = None) -> dict:
    """fp32 matmul GFLOP/s at every model shape for each row count (e.g. decode 32x1, score 32x80), bf16 ones
    only on CPUs with native bf16, the copy bandwidth; `peak_fp32_gflops` is the best fp32 rate seen; with
    `decode_weights` (every weight matrix's (out, in)), the decode step's floor (decode_step_floor)."""
    import torch

    info = cpu_info(Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else "")
    bf16 = native_bf16(info["flags"])
    seconds = 0.1 if quick else 0.4
    rates: dict[str, dict[str, float]] = {}
    for label, rows in row_counts.items():
        for name, (m, k, n) in matmul_shapes(hidden, intermediate, vocab, rows).items():
            rates.setdefault("fp32", {})[f"{label}/{name} {m}x{k}x{n}"] = matmul_gflops(m, k, n, torch.float32, seconds)
            if bf16:
                rates.setdefault("bf16", {})[f"{label}/{name} {m}x{k}x{n}"] = matmul_gflops(m, k, n, torch.bfloat16,
                                                                                             seconds)
    by_rows = {dtype: {label: max(v for key, v in table.items() if key.startswith(label + "/")) for label in row_counts}
               for dtype, table in rates.items()}
    return {
        "cpu": {"model": info["model"], "logical_cpus": info["logical_cpus"], "os_cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(), "vector_flags": info["vector_flags"],
                "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": bf16,
                "machine": platform.machine()},
        "matmul_gflops": rates,
        "best_fp32_gflops_by_rows": by_rows["fp32"],
        "peak_fp32_gflops": max(rates["fp32"].values()),
        **({"best_bf16_gflops_by_rows": by_rows["bf16"], "peak_bf16_gflops": max(rates["bf16"].values())} if bf16 else {}),
        "bf16_note": None if bf16 else "bf16 not measured: this CPU has no native bf16 (no avx512_bf16 / amx flags)",
        "copy_bandwidth_gbs": copy_bandwidth_gbs(128 if quick else 512),
        **({"decode_step_floor": decode_step_floor(decode_weights, row_counts["decode"], 2 if quick else 5)}
           if decode_weights and "decode" in row_counts else {}),
    }
