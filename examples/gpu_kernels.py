"""GPU-side time of PiX's Triton kernels against one pass over the same input and the 1×1 convolution.

Times with ``triton.testing.do_bench`` (CUDA events, many launches back to back, median), so the numbers
are device time without the host's per-call overhead.  Prints one line per case with the achieved
bandwidth of the fused step (input read once + output written, over its time).

    python examples/gpu_kernels.py [--json FILE]
"""

import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from pixify.ops import triton_kernels
from pixify.ops import _canon, _empty_canon, pix


def case(n, c, h, zeta, dtype, channels_last):
    x = torch.randn(n, c, h, h, device="cuda", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = -(-c // zeta)
    p = torch.rand(n, g, device="cuda")
    w = torch.randn(g, c, 1, 1, device="cuda", dtype=dtype)
    if channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    phi = torch.randn(g, c, device="cuda", dtype=dtype) * 0.1
    t, layout = _canon(x, 1)
    out = _empty_canon(x, n, g, t.shape[2], layout)
    grad = torch.randn_like(out)
    gt = _empty_canon(x, n, c, t.shape[2], layout)
    res = {
        "shape": [n, c, h, h], "zeta": zeta, "dtype": str(dtype).replace("torch.", ""),
        "channels_last": channels_last,
        "fusion_ms": do_bench(lambda: triton_kernels.forward(t, p, zeta, 0.5, out), return_mode="median"),
        "fusion_bwd_ms": do_bench(lambda: triton_kernels.backward(grad, t, p, zeta, 0.5, gt), return_mode="median"),
        "one_pass_ms": do_bench(lambda: x.sum(dim=(2, 3)), return_mode="median"),
        "copy_ms": do_bench(lambda: x.clone(), return_mode="median"),
        "pix_ms": do_bench(lambda: pix(x, phi, zeta), return_mode="median"),
        "conv1x1_ms": do_bench(lambda: F.conv2d(x, w), return_mode="median"),
    }
    if channels_last:  # the other channels-innermost kernel (triton_kernels.CHANNELS_INNER)
        default = triton_kernels.CHANNELS_INNER
        triton_kernels.CHANNELS_INNER = "tile" if default == "loop" else "loop"
        res["other_kernel"] = triton_kernels.CHANNELS_INNER
        res["other_fusion_ms"] = do_bench(lambda: triton_kernels.forward(t, p, zeta, 0.5, out), return_mode="median")
        res["other_fusion_bwd_ms"] = do_bench(lambda: triton_kernels.backward(grad, t, p, zeta, 0.5, gt),
                                              return_mode="median")
        triton_kernels.CHANNELS_INNER = default
    nbytes = x.numel() * x.element_size() * (1 + 1 / zeta)
    res["fusion_GBps"] = nbytes / res["fusion_ms"] / 1e6
    res["copy_GBps"] = 2 * x.numel() * x.element_size() / res["copy_ms"] / 1e6
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for cl in (False, True):
            for n, c, h in ((8, 256, 56), (64, 256, 56), (64, 1024, 14), (64, 2048, 7), (1, 256, 56)):
                r = case(n, c, h, 4, dtype, cl)
                rows.append(r)
                print(f"{r['dtype']:8s} {'CL  ' if cl else 'NCHW'} {n:3d}x{c:4d}x{h:2d}x{h:2d}  fusion {r['fusion_ms']*1e3:7.1f} us"
                      f" ({r['fusion_GBps']:5.0f} GB/s)  bwd {r['fusion_bwd_ms']*1e3:7.1f}  one pass {r['one_pass_ms']*1e3:7.1f}"
                      f"  copy {r['copy_ms']*1e3:7.1f} ({r['copy_GBps']:5.0f} GB/s)  whole PiX {r['pix_ms']*1e3:7.1f}"
                      f"  conv1x1 {r['conv1x1_ms']*1e3:7.1f} us"
                      + (f"  | {r['other_kernel']}: fusion {r['other_fusion_ms']*1e3:7.1f} bwd {r['other_fusion_bwd_ms']*1e3:7.1f}"
                         if cl else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
