"""What VAR's ten per-scale searches cost next to one search over the same rows (CPU or CUDA).

VAR's quantizer searches once per scale, sides (1, 2, 3, 4, 5, 6, 8, 10, 13, 16): at batch 16 that is
16, 64, ..., 4096 rows, 10880 in all, against K = 4096 codewords of D = 32. Measured, interleaved in
one run (one round of every variant, then the next round; medians):

    op N=16             the compiled op alone on the first scale's 16 rows (the kernel's time)
    public N=16         vqfast.nearest_codeword on the same rows (checks, value scan, backend choice)
    pass N=16           one pass of vqfast.multiscale's searches over ten 16-row inputs, per search
    one search          vqfast.nearest_codeword once on all 10880 rows
    ten public calls    vqfast.nearest_codeword once per scale
    ten in one pass     vqfast.multiscale's per-pass searches: checks and backend choice once, each
                        scale launches the op alone, the value scan read back once at the end

    python benchmarks/var_scale_searches.py [--batch 16] [--rounds 15] [--device cpu] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import vqfast
from vqfast.backends import resolve_backend
from vqfast.bench.timing import synchronize
from vqfast.multiscale import ScaleSearches
from vqfast.ops import _op_for

VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    codebook = torch.randn(args.vocab, args.dim, generator=gen).to(device)
    zs = [torch.randn(args.batch * p * p, args.dim, generator=gen).to(device) for p in VAR_PATCH_NUMS]
    z_all = torch.cat(zs)
    op = _op_for(resolve_backend("auto", device.type, (zs[0], codebook)))

    def one_pass(z_list):
        searches = ScaleSearches(codebook, "l2", "exact", "auto", z_all.shape[0])
        out = [searches(z) for z in z_list]
        searches.finish()
        return out

    variants = {
        "op N=16": lambda: op(zs[0], codebook, "l2", "exact"),
        "public N=16": lambda: vqfast.nearest_codeword(zs[0], codebook),
        "pass N=16 (per search)": lambda: one_pass([zs[0]] * 10),
        "one search": lambda: vqfast.nearest_codeword(z_all, codebook),
        "ten public calls": lambda: [vqfast.nearest_codeword(z, codebook) for z in zs],
        "ten in one pass": lambda: one_pass(zs),
    }
    # The per-call variants are fast: repeat them inside a round so that each round's time is not noise.
    inner = {"op N=16": 50, "public N=16": 50, "pass N=16 (per search)": 5}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(args.rounds):
        for name, fn in variants.items():
            n = inner.get(name, 1)
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            synchronize(device)
            per = 10 if name.startswith("pass N=16") else 1  # ten searches per pass
            times[name].append((time.perf_counter() - t0) / n / per * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} rows={z_all.shape[0]} "
          f"K={args.vocab} D={args.dim} rounds={args.rounds} (medians)")
    for name, ms in med.items():
        print(f"  {name:<18} {ms:10.3f} ms")
    for name in ("public N=16", "pass N=16 (per search)"):
        print(f"  overhead per search at N=16, {name.split()[0]}: {med[name] - med['op N=16']:.3f} ms "
              f"({med[name] / med['op N=16']:.2f}x the op)")
    for name in ("ten public calls", "ten in one pass"):
        print(f"  {name} / one search: {med[name] / med['one search']:.2f}x")


if __name__ == "__main__":
    main()
