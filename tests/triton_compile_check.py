"""Compiles every Triton kernel variant of the loss for a GPU architecture, without a GPU.

Triton's interpreter (how the CPU tests run the kernels) accepts code the GPU compiler
rejects, so CI also lowers each variant to PTX with Triton's bundled ptxas tool chain, and
checks that the streaming kernels read their inputs with 128-bit vector loads when the
launch sees aligned pointers and 16-divisible lengths (as at SD/SDXL latent sizes), and that
no fp32 division is approximate.

    python tests/triton_compile_check.py [--arch 90]      # a CI tool, not part of the package

Must run without ``TRITON_INTERPRET=1`` (the kernels must be ``JITFunction`` objects);
exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Dict, Iterable, Tuple

_VECTOR_LOAD = re.compile(r"ld\.global[\w:.]*\.v4")
# fp32 divisions other than IEEE round-to-nearest (Triton's "/" lowers to div.full.f32, up to
# 2 ulp off): the kernels divide with tl.div_rn, as the reference's torch division does.
_INEXACT_DIVISION = re.compile(r"\bdiv\.(full|approx)\.[\w.]*f32")


# Sizes whose launch choices (block sizes) the check covers: every power of two a launch
# rounds to, up to M = 4096 pairs and 2^20 chunks a sample.
_SIZES = [2**p for p in range(0, 21)]


def _variants(kernels) -> Iterable[Tuple[object, Dict[str, str], Dict[str, object], int, Tuple[str, ...], int]]:
    """(kernel, signature, constexprs, num_warps, 16-divisible args, min vector loads), as the
    launches in triton_loss.py specialize them: integer arguments (strides too) below 2^31
    arrive as i32, and the block sizes are those the launch helpers pick for any size."""
    k = kernels
    stream_ints = dict(chunks="i32", chunk_len="i32")
    for dtype in ("fp32", "bf16", "fp16"):
        # 8 elements a thread: one v4 load per 16-bit input, two per fp32 input.
        loads_per_input = 2 if dtype == "fp32" else 1
        for has_ref in (True, False):
            sig = dict(
                pred_ptr=f"*{dtype}", target_ptr=f"*{dtype}", ref_ptr=f"*{dtype}",
                model_part_ptr="*fp32", ref_part_ptr="*fp32", D="i32",
                pred_row_stride="i32", target_row_stride="i32", ref_row_stride="i32",
                divisor="fp32", **stream_ints,
            )
            aligned = tuple(n for n in sig if n.endswith(("_ptr", "_stride")) or n in ("D", "chunk_len"))
            yield (k._partial_sq_err_kernel, sig, dict(HAS_REF=has_ref, BLOCK=k.STREAM_BLOCK), k.STREAM_WARPS,
                   aligned, loads_per_input * (3 if has_ref else 2))
        sig = dict(
            coef_ptr="*fp32", pred_ptr=f"*{dtype}", target_ptr=f"*{dtype}", out_ptr=f"*{dtype}", D="i32",
            pred_row_stride="i32", target_row_stride="i32", out_row_stride="i32", two_over_d="fp32", **stream_ints,
        )
        aligned = tuple(n for n in sig if n.endswith(("_ptr", "_stride")) or n in ("D", "chunk_len"))
        yield k._error_grad_kernel, sig, dict(BLOCK=k.STREAM_BLOCK), k.STREAM_WARPS, aligned, loads_per_input * 2
    # A mixed-dtype launch: bf16 prediction, fp32 target, fp16 reference.
    yield (k._partial_sq_err_kernel,
           dict(pred_ptr="*bf16", target_ptr="*fp32", ref_ptr="*fp16", model_part_ptr="*fp32", ref_part_ptr="*fp32",
                D="i32", pred_row_stride="i64", target_row_stride="i64", ref_row_stride="i64", divisor="fp32",
                **stream_ints),  # i64 strides: a sample of 2^31 elements or more
           dict(HAS_REF=True, BLOCK=k.STREAM_BLOCK), k.STREAM_WARPS, (), 0)
    for has_ref in (True, False):
        for block in sorted({k._partials_block(c) for c in _SIZES if c > 1}):  # one chunk: not launched
            yield (k._sum_partials_kernel,
                   dict(model_part_ptr="*fp32", ref_part_ptr="*fp32", model_err_ptr="*fp32", ref_err_ptr="*fp32",
                        chunks="i32", divisor="fp32"),
                   dict(HAS_REF=has_ref, BLOCK=block), 1, (), 0)
    pair_ptrs = dict(model_err_ptr="*fp32", ref_err_ptr="*fp32", weights_ptr="*fp32", row_loss_ptr="*fp32",
                     coef_ptr="*fp32")
    for loss_type in range(3):
        for has_weights in (True, False):
            for block in sorted({k._tile_block(m) for m in _SIZES}):
                yield (k._rpo_tile_kernel,
                       dict(pair_ptrs, M="i32", beta="fp32", uniform_weight="fp32", weight_scale="fp32",
                            coef_scale="fp32", nan="fp32"),
                       dict(LOSS_TYPE=loss_type, HAS_WEIGHTS=has_weights, BLOCK=block), 4, (), 0)
        for method in range(3):
            for block in sorted({k._finish_block(2 * m) for m in _SIZES}):
                yield (k._pair_finish_kernel,
                       dict(pair_ptrs, loss_ptr="*fp32", metrics_ptr="*fp32", M="i32", beta="fp32",
                            uniform_weight="fp32", weight_scale="fp32", nan="fp32"),
                       dict(METHOD=method, LOSS_TYPE=loss_type, HAS_WEIGHTS=method == 2, BLOCK=block), 4, (), 0)


def _with_ones(variants, kernels):
    """Each variant, plus one per integer argument that a launch commonly passes as 1 (Triton
    then specializes it into a constant: M = 1 pair, one chunk a sample). Only launches
    that happen: M = 1 picks the blocks of one pair; the partial sums are skipped for one chunk."""
    one_pair_block = {"_rpo_tile_kernel": kernels._tile_block(1), "_pair_finish_kernel": kernels._finish_block(2)}
    for kernel, sig, constexprs, num_warps, aligned, min_vector_loads in variants:
        yield kernel, sig, constexprs, num_warps, aligned, min_vector_loads
        if kernel.__name__ == "_sum_partials_kernel":  # not launched for one chunk
            continue
        if constexprs.get("BLOCK") != one_pair_block.get(kernel.__name__, constexprs.get("BLOCK")):
            continue
        for name in ("M", "chunks"):
            if name in sig:
                rest = {k: v for k, v in sig.items() if k != name}
                yield kernel, rest, {**constexprs, name: 1}, num_warps, aligned, min_vector_loads


def compile_all(arch: int = 90, verbose: bool = True) -> int:
    """Compiles every variant for ``sm_{arch}``; returns how many. Raises on a failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rpo_fast.kernels import triton_loss

    if not isinstance(triton_loss._partial_sq_err_kernel, triton.runtime.JITFunction):
        raise RuntimeError("compile_check: run it without TRITON_INTERPRET=1 (the kernels are interpreted)")
    target = GPUTarget("cuda", arch, 32)
    count = 0
    for kernel, sig, constexprs, num_warps, aligned, min_vector_loads in _with_ones(_variants(triton_loss), triton_loss):
        names = kernel.arg_names
        src = ASTSource(
            kernel,
            # in the kernel's argument order, constants included
            signature={name: sig.get(name, "constexpr") for name in names},
            constexprs={(names.index(name),): value for name, value in constexprs.items()},
            attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned},
        )
        compiled = triton.compile(src, target=target, options={"num_warps": num_warps})
        vector_loads = len(_VECTOR_LOAD.findall(compiled.asm["ptx"]))
        if vector_loads < min_vector_loads:
            raise AssertionError(
                f"{kernel.__name__} {constexprs} {sig.get('pred_ptr', '')}: {vector_loads} 128-bit loads in the "
                f"PTX, expected at least {min_vector_loads}"
            )
        inexact = _INEXACT_DIVISION.findall(compiled.asm["ptx"])
        if inexact:
            raise AssertionError(f"{kernel.__name__} {constexprs}: {len(inexact)} approximate fp32 division(s) in the "
                                 "PTX; divide with tl.div_rn")
        if verbose:
            print(f"sm_{arch} {kernel.__name__} {constexprs} {sig.get('pred_ptr', '')}: ok, {vector_loads} v4 loads")
        count += 1
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer: 80, 90, ...")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the check compiles, it does not interpret")
    count = compile_all(args.arch, verbose=not args.quiet)
    print(f"compile_check: {count} kernel variants compiled for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
