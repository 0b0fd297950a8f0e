"""Is each fast path that rests on private torch internals worth its fragility? A/B in one process.

For the converted ResNet-50 (``--zeta auto``, φ random so that about half the groups pick), each feature is
timed against the same model with that feature off, alternating the two (``pixify.bench.time_pair``), in
inference at batch 1 and 8 and for a training step at batch 8. A ratio above 1 is the time the feature
saves: ``off / on``.

- generated + hand C++ kernels: ``torch._inductor.standalone_compile`` and inductor's C++ code cache
  (off: ``pixify.config.override(compiled_kernels=False)``, the eager kernels run);
- direct kernel call: the dispatch-stack probe ``torch._C._len_torch_dispatch_stack`` lets inference call
  the kernels without the custom-op dispatch, and the whole-operator kernel needs it too;
- planar eager kernels: ``aten._sparse_mm_reduce_impl`` (measured with the compiled kernels off, where they
  run; off: the generic kernels).

Run: python examples/private_apis_ab.py [--threads 2] [--rounds 11]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json

import torch

from pixify import convert, create_model
from pixify.bench import time_pair, tune_malloc
from pixify.config import override
from pixify.ops import PiX, op, planar


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


FEATURES = {
    "generated + hand C++ kernels": (lambda: contextlib.nullcontext(), lambda: override(compiled_kernels=False)),
    "direct kernel call (+ whole-operator kernel)": (lambda: contextlib.nullcontext(),
                                                     lambda: _patched(op, "PRIVATE_TORCH_OK", False)),
    "planar eager kernels (compiled off)": (lambda: override(compiled_kernels=False),
                                            lambda: _stack(override(compiled_kernels=False),
                                                           _patched(planar, "PRIVATE_TORCH_OK", False))),
}


@contextlib.contextmanager
def _stack(*cms):
    with contextlib.ExitStack() as st:
        for cm in cms:
            st.enter_context(cm)
        yield


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_malloc()
    original, source = create_model("resnet50", pretrained=False)
    model, _ = convert(copy.deepcopy(original), source=source, inplace=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PiX):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    model.eval()
    cpu = torch.device("cpu")
    rows = []
    for feature, (on, off) in FEATURES.items():
        for what, batch in (("inference", 1), ("inference", 8), ("train step", 8)):
            if what == "train step" and feature.startswith("direct"):
                continue  # inference only
            x = torch.randn(batch, 3, 224, 224)

            def run(ctx, train=what == "train step"):
                def f():
                    with ctx():
                        if train:
                            model.train()
                            model(x).sum().backward()
                            model.zero_grad(set_to_none=True)
                        else:
                            model.eval()
                            with torch.no_grad():
                                model(x)
                return f

            on_ms, off_ms, ratio, n = time_pair(run(on), run(off), cpu, rounds=args.rounds)
            rows.append({"feature": feature, "what": what, "batch": batch, "on_ms": round(on_ms, 1),
                         "off_ms": round(off_ms, 1), "off/on": round(ratio, 3), "rounds": n})
            print(f"{feature:45s} {what:10s} b{batch}: on {on_ms:8.1f} ms, off {off_ms:8.1f} ms, "
                  f"off/on {ratio:.3f}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
