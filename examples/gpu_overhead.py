"""Host-side cost of one PiX call, piece by piece, where the host is the bottleneck (small inputs on a GPU).

Each line is the wall time per call of a loop of back-to-back calls (synchronised once at the end), so on
a GPU with small inputs it is the host's cost of issuing the call: the Python around it, the dispatcher,
autocast and the kernel launch.  The pieces are those ``ops.pix`` runs for eager inference, next to the
1×1 convolution that PiX replaces and one plain elementwise op.

    python examples/gpu_overhead.py [--device cuda] [--dtype float16] [--shape 1,256,56,56]
"""

import argparse
import time

import torch
import torch.nn.functional as F

from pixify import ops
from pixify.ops import dispatch, module, triton_kernels
from pixify.ops import layout as layouts


def per_call_us(fn, device, calls=300):
    for _ in range(20):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--shape", default="1,256,56,56")
    ap.add_argument("--zeta", type=int, default=4)
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n, c, h, w = (int(v) for v in args.shape.split(","))
    zeta = args.zeta
    g = -(-c // zeta)
    x = torch.randn(n, c, h, w, device=dev, dtype=dtype)
    phi = torch.randn(g, c, device=dev, dtype=dtype) * 0.1
    wconv = torch.randn(g, c, 1, 1, device=dev, dtype=dtype)
    z = x.mean((2, 3))
    q = F.linear(z, phi)
    p = torch.sigmoid(q)
    mod = ops.PiX(c, zeta).to(dev, dtype)
    t, layout = layouts._canon(x, 1)
    out3 = layouts._empty_canon(x, n, g, t.shape[2], layout)
    cases = {
        "relu (one elementwise op)": lambda: torch.relu(x),
        "conv1x1 (what PiX replaces)": lambda: F.conv2d(x, wconv),
        "mean over H,W": lambda: x.mean((2, 3)),
        "linear (phi)": lambda: F.linear(z, phi),
        "sigmoid": lambda: torch.sigmoid(q),
    }
    if triton_kernels.available(x, zeta):
        cases["triton_kernels.forward"] = lambda: triton_kernels.forward(t, p, zeta, 0.5, out3)
    cases.update({
        "dispatch._forward_impl": lambda: dispatch._forward_impl(x, p, zeta, 0.5, 1),
        "ops.pick_or_mix": lambda: ops.pick_or_mix(x, p, zeta),
        "ops.pix": lambda: ops.pix(x, phi, zeta),
        "PiX module": lambda: mod(x),
    })
    if triton_kernels.available(x, zeta):  # Triton's own launch path against its compiled kernel's runner
        kernel, meta, grid = triton_kernels._config(t, zeta, g)
        meta = {**meta, "BLOCK_C": 16, "C_STEPS": 1, "PHI": False, "BACKWARD": False}
        kargs = [t, p, t, t, t, out3, out3, c, g, t.shape[2], *t.stride(), 0, 0, 0, *out3.stride(), 0.5]
        cases["triton JIT launch (kernel[grid])"] = lambda: kernel[grid](*kargs, **meta)
        try:
            run = kernel[grid](*kargs, **meta)[grid]
            allargs = kargs + [meta[name] for name in kernel.arg_names[len(kargs):]]
            cases["triton compiled runner"] = lambda: run(*allargs)
        except Exception as e:  # noqa: BLE001 - a probe
            print("compiled runner not usable:", type(e).__name__, str(e).splitlines()[0][:200])
        zf = z.float()
        cases["triton_kernels.forward_phi"] = lambda: triton_kernels.forward_phi(t, zf, phi, zeta, 0.5, out3)
        cases["module._pix_triton"] = lambda: module._pix_triton(x, phi, zeta, 0.5, 1)
    print(f"{args.device} {args.dtype} {tuple(x.shape)} zeta {zeta}: host microseconds per call")
    for ctx_name in ("inference_mode", "inference_mode + autocast"):
        print(f"-- {ctx_name}")
        for name, fn in cases.items():
            with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled="autocast" in ctx_name):
                us = per_call_us(fn, dev)
            print(f"  {name:30s} {us:8.1f}")


if __name__ == "__main__":
    main()
