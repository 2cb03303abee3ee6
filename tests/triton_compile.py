"""Compiles the Triton kernel for every family and dtype for real GPUs (no GPU needed: Triton's compiler and ptxas run on
the host), with the options launch.py launches it with, and prints, per variant, how many 16-byte global loads and
how many fused multiply-adds its PTX has. Run by test_triton.py in a fresh process, as the tests' own process uses
Triton's interpreter."""

from __future__ import annotations

import inspect
import json
import os
import re
import sys

assert os.environ.get("TRITON_INTERPRET") != "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fused_opt.triton import kernels, launch  # noqa: E402

POINTERS = {"table": "*i64", "numels": "*i64", "block_tensor": "*i32", "block_start": "*i64", "found_inf": "*fp32",
            "n": "i32"}
DTYPES = {"fp32": (tl.float32, tl.float32), "bf16": (tl.bfloat16, tl.float32), "fp16": (tl.float16, tl.float32),
          "fp64": (tl.float64, tl.float64)}


def compile_variant(family: str, dtype: str, arch: int, flags_on: bool, master: bool = False,
                    options: dict | None = None) -> dict:
    fn = kernels.step_kernel
    names = list(inspect.signature(fn.fn).parameters)
    storage, opmath = DTYPES[dtype]
    math_ptr = "*fp64" if opmath == tl.float64 else "*fp32"
    consts = {"BLOCK_FN": kernels.BLOCKS[family], "DTYPE": storage, "STATE": tl.float32 if master else storage,
              "OPMATH": opmath, "MASTER": master, "BLOCK": 2048, "ALIGNED": True}
    consts.update({k: flags_on for k in names[names.index("HAS_FOUND_INF"):]})
    signature = {k: POINTERS.get(k, math_ptr) for k in names if k not in consts}
    signature.update({k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()})
    options = {"num_warps": launch.NUM_WARPS, **launch.COMPILE_OPTIONS} if options is None else options
    ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm["ptx"]
    return {"loads16": len(re.findall(r"ld\.global(?:\.\w+)*\.(?:v4\.\w32|v2\.\w64)\b", ptx)),
            "fma": len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f(?:32|64)\b", ptx))}


def compile_counters(counter: str, arch: int, has_found_inf: bool) -> dict:
    """counters_kernel, as launch.py launches it: its global stores (the counters' and the values')."""
    fn = kernels.counters_kernel
    names = list(inspect.signature(fn.fn).parameters)
    consts = {"COUNTER": DTYPES[counter][0], "BLOCK": launch.COUNTER_BLOCK, "HAS_FOUND_INF": has_found_inf,
              "UNDO": False}
    signature = {"addresses": "*i64", "n": "i32", "found_inf": "*fp32", "values": "*fp64"}
    signature.update({k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": launch.NUM_WARPS}).asm["ptx"]
    return {"stores": len(re.findall(r"\bst\.global", ptx))}


if __name__ == "__main__":
    out = {}
    for family in kernels.BLOCKS:
        for dtype in DTYPES:
            for arch in (80, 90):
                out[f"{family}-{dtype}-sm{arch}"] = compile_variant(family, dtype, arch, True)
        out[f"{family}-fp32-sm90-plain"] = compile_variant(family, "fp32", 90, False)
        out[f"{family}-bf16-sm90-master"] = compile_variant(family, "bf16", 90, True, master=True)
    for counter in ("fp32", "fp64"):
        for arch in (80, 90):
            out[f"counters-{counter}-sm{arch}"] = compile_counters(counter, arch, arch == 90)
    # Triton's default options, to show that the count would see contracted multiply-adds.
    out["adam-fp32-sm90-tritons-default"] = compile_variant("adam", "fp32", 90, True, options={})
    json.dump(out, sys.stdout)
