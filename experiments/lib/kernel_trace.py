"""GPU kernels of a jitted call: a per-kernel profile from a ``jax.profiler`` Perfetto trace, each
kernel put in a group by its name (GEMM, attention, other) and named with the HLO instruction it
runs (shape and JAX op, from the compiled module). Used by ``experiments.profile_plan`` (the
plan's kernels) and ``experiments.profile_layer`` (one model layer's).
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re
import tempfile

import jax


def kernel_profile(fn, *args, reps: int = 5) -> list[tuple[str, float, float]]:
    """(kernel name, launches per call, GPU µs per call), largest first, from a Perfetto trace of
    ``reps`` warm calls; empty off the GPU."""
    jax.block_until_ready(fn(*args))
    log_dir = tempfile.mkdtemp()
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(reps):
            jax.block_until_ready(fn(*args))
    trace_file = next(pathlib.Path(log_dir).rglob("perfetto_trace.json.gz"))
    events = json.load(gzip.open(trace_file))["traceEvents"]
    gpu_pids = {
        e["pid"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name" and "GPU" in e["args"]["name"]
    }
    totals = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu_pids:
            totals[e["name"]][0] += 1
            totals[e["name"]][1] += e.get("dur", 0.0)
    rows = [(name, n / reps, us / reps) for name, (n, us) in totals.items()]
    return sorted(rows, key=lambda r: -r[2])


def gpu_us(fn, *args) -> float:
    """GPU µs of one call's kernels (:func:`kernel_profile`'s sum; 0 off the GPU)."""
    return sum(us for _, _, us in kernel_profile(fn, *args))


# Kernel groups, by name (lower case), first match wins:
#   attention: cuDNN's fused attention ("cudnn_generated_fort_native_sdpa_…"), any flash / fmha;
#   GEMM: cuBLAS (sm90_xmma_gemm_…, nvjet_…), CUTLASS, XLA's Triton GEMM fusions (gemm_fusion_…,
#         triton_gemm_…) and any kernel with "dot" between separators;
#   attention again: any other cuDNN kernel (full attention is the layer's only cuDNN call);
#   everything else: XLA's elementwise / reduction / copy kernels (loop_…, input_…, copy_…).
ATTENTION_NAMES = ("sdpa", "flash", "fmha", "attention")
GEMM_NAMES = ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul")
GROUPS = ("gemm", "attention", "other")


def kernel_group(name: str) -> str:
    """A GPU kernel's group by its name, the rules above: "gemm", "attention" or "other"."""
    low = name.lower()
    if any(mark in low for mark in ATTENTION_NAMES):
        return "attention"
    if any(mark in low for mark in GEMM_NAMES) or re.search(r"(^|[_.])dot([_.]|$)", low):
        return "gemm"
    return "attention" if "cudnn" in low else "other"


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def kernel_key(name: str) -> str:
    """An XLA kernel's name as its HLO instruction's: XLA names a fusion's kernel after the
    instruction with '.' and '-' made '_'."""
    return re.sub(r"[.\-]", "_", name)


def hlo_instructions(hlo_text: str) -> dict[str, dict]:
    """kernel_key(instruction) -> {"shape", "op"} for every instruction of a compiled module's
    text; ``op``: the JAX op it came from (:func:`op_label`), else the instruction's stem."""
    found = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        op = _OP_NAME.search(line)
        op = op_label(op.group(1)) if op else stem(m.group(1))
        found[kernel_key(m.group(1))] = {"shape": m.group(2)[:80], "op": op}
    return found


def op_label(op_name: str) -> str:
    """A JAX ``op_name`` without its jit(…) and closed_call levels: "while/body/mul" (under the
    MLP's lax.map) or "mul"."""
    return "/".join(p for p in op_name.split("/") if "jit(" not in p and p != "closed_call")


def stem(name: str) -> str:
    """An instruction or kernel name without its numeric suffix: what XLA named it after."""
    return re.sub(r"[._]\d+$", "", name)


def grouped(kernels, hlo: dict) -> dict:
    """The profile's kernels with group and HLO, the GPU µs per group, and the "other" group's
    µs per JAX op (:func:`op_label`; a kernel with no op_name: its fusion's name)."""
    rows, groups = [], dict.fromkeys(GROUPS, 0.0)
    other_by_op = collections.defaultdict(float)
    for name, launches, us in kernels:
        group = kernel_group(name)
        where = hlo.get(kernel_key(name), {})
        rows.append({"kernel": name, "launches": launches, "us": us, "group": group, **where})
        groups[group] += us
        if group == "other":
            other_by_op[where.get("op", stem(name))] += us
    other = sorted(other_by_op.items(), key=lambda kv: -kv[1])
    return {"kernels": rows, "group_us": groups, "other_by_op": other}
