"""Where a converted model's time goes on a GPU: host-device syncs and a torch.profiler breakdown.

Builds the model the way ``pixify bench`` does (random φ), then for the converted model:
1. one forward under ``torch.cuda.set_sync_debug_mode("warn")``: every host-device sync prints a warning;
2. ``torch.profiler`` over a few forwards of the original and of the converted model (the bench's
   autocast and inference mode), printing the top operators by self CPU time and by device time.

    python examples/gpu_profile.py [resnet50] [--batch-size 1] [--dtype float16]
"""

import argparse
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from pixify.cli import _bench_models


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="resnet50")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    original, converted, *_ = _bench_models(args.model, "auto", None)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    original = original.to(dev, dtype).eval()
    converted = converted.to(dev, dtype).eval()
    x = torch.randn(args.batch_size, 3, 224, 224, device=dev, dtype=dtype)

    def run(m):
        with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=cuda):
            return m(x)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(3):
        run(original), run(converted)
    sync()

    if cuda:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            run(converted)
            torch.cuda.set_sync_debug_mode(0)
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
        print(f"host-device syncs in one converted forward: {len(syncs)}")
        for s in syncs[:5]:
            print("  ", s)

    for name, m in (("original", original), ("converted", converted)):
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(5):
                run(m)
            sync()
        ka = prof.key_averages()
        print(f"\n== {name}, batch {args.batch_size}, {args.dtype}, 5 forwards: by self CPU time")
        print(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40))
        if cuda:
            print(f"== {name}: by device time")
            print(ka.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=40))


if __name__ == "__main__":
    main()
