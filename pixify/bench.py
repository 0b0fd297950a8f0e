"""Benchmarks: converted vs original in one process, as ratios.

Timed runs of the two models alternate round by round (after a warm-up), so that drift in the machine's
load hits both alike; each latency is the median over rounds and the ratio is the median of the per-round
ratios. Speed claims live here and in ``examples/``, never as timed assertions in tests.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PixifyError

__all__ = ["Timing", "bench_models", "bench_op", "pix_free_copy", "time_pair", "tune_malloc"]


@dataclass
class Timing:
    what: str
    batch_size: int
    original_ms: float
    converted_ms: float
    ratio: float  # median of per-round converted/original
    rounds: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit systems
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20


@functools.cache  # once per process: the setting cannot be undone, and a second call has nothing to do
def tune_malloc() -> str:
    """Make glibc keep freed memory for reuse (process-wide, cannot be undone): blocks up to 32 MiB come
    from the heap instead of fresh ``mmap`` pages, and the heap is never trimmed.

    With glibc's defaults, every activation of a few MiB or more is a fresh mapping whose pages fault in
    (and are zeroed by the kernel) on every forward: on this project's VM, ResNet-50 at batch 8 takes about
    60 000 page faults and 150 ms of system time per forward, in both models alike, which dilutes the
    converted/original ratio with a cost that neither model's arithmetic causes.  This is the effect that
    the PyTorch performance guide's advice to use jemalloc or tcmalloc for CPU inference removes.

    Returns what the benchmark runs with: ``"tuned"``, or ``"system"`` with the reason where this is not
    glibc on Linux (the setting is then left alone).
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        state = "system (tuning needs glibc on Linux)"
    else:
        try:
            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
        except (OSError, AttributeError):
            ok = False
        state = "tuned" if ok else "system (glibc refused mallopt)"
    return state


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(fa: Callable[[], Any], fb: Callable[[], Any], device: torch.device, rounds: int = 15,
              warmup: int = 3, min_time: float = 0.0) -> tuple[float, float, float, int]:
    """Alternate ``fa`` and ``fb``; returns (median a ms, median b ms, median of b/a, rounds)."""
    for _ in range(warmup):
        fa(), fb()
    _sync(device)
    ta, tb, ratios = [], [], []
    start = time.perf_counter()
    r = 0
    while r < rounds or (time.perf_counter() - start) < min_time:
        order = (fa, fb) if r % 2 == 0 else (fb, fa)  # alternate which goes first, too
        times = {}
        for f in order:
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            times[f] = time.perf_counter() - t0
        ta.append(times[fa])
        tb.append(times[fb])
        ratios.append(times[fb] / times[fa])
        r += 1
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3, statistics.median(ratios), r


def _prep(model: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    model = model.to(device=device, dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


class _FreePiX(nn.Module):
    """Stand-in for a PiX module that costs nothing: returns a preallocated tensor of PiX's output shape
    and layout (see ``bench_models(floor=True)``)."""

    def __init__(self, pix: nn.Module):
        super().__init__()
        self.groups, self.zeta, self.channel_dim = pix.groups, pix.zeta, pix.channel_dim
        self._out: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device, x.stride())
        out = self._out.get(key)
        if out is None:
            from .ops import pick_or_mix

            p = x.new_full((x.shape[0], self.groups), 0.75)
            with torch.no_grad():
                out = self._out[key] = pick_or_mix(x, p, self.zeta, channel_dim=self.channel_dim)
        return out


def pix_free_copy(converted: nn.Module, stand_in: type[nn.Module] | None = None) -> nn.Module:
    """A copy of ``converted`` whose PiX modules cost nothing (inference only): timing it against the
    original gives the best ratio that any PiX kernel could reach on this machine.  ``stand_in``: the module
    that replaces each PiX (default :class:`_FreePiX`, a stored output)."""
    from .ops import PiX

    free = copy.deepcopy(converted)
    for name, mod in list(free.named_modules()):
        if isinstance(mod, PiX):
            free.set_submodule(name, (stand_in or _FreePiX)(mod))
    return free


def bench_models(original: nn.Module, converted: nn.Module, input_size: tuple[int, ...],
                 batch_sizes: tuple[int, ...] = (1, 8), device: str = "cpu", dtype: torch.dtype = torch.float32,
                 compile: bool = False, train: bool = True, rounds: int = 15, warmup: int = 3,
                 channels_last: bool = False, progress: Callable[[str], None] | None = None,
                 floor: bool = False, compile_mode: str | None = None) -> list[Timing]:
    """Latency of ``converted`` vs ``original``: inference per batch size, and a training step.

    ``floor``: also time (inference) a copy of the converted model whose PiX modules cost nothing
    (:func:`pix_free_copy`), i.e. the bound that the rest of the network sets on the ratio.
    ``compile_mode``: ``torch.compile``'s mode (e.g. ``"reduce-overhead"``: CUDA graphs); implies ``compile``.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PixifyError("--device cuda asked for, but torch sees no CUDA device", "use --device cpu")
    orig = _prep(copy.deepcopy(original), dev, dtype, channels_last).eval()
    conv = _prep(copy.deepcopy(converted), dev, dtype, channels_last).eval()
    run_o, run_c = orig, conv
    free = run_f = pix_free_copy(conv).eval() if floor else None
    compile = compile or compile_mode is not None
    tag = "" if not compile else f" (compiled, {compile_mode})" if compile_mode else " (compiled)"
    if compile:
        run_o, run_c = torch.compile(orig, mode=compile_mode), torch.compile(conv, mode=compile_mode)
        run_f = torch.compile(free, mode=compile_mode) if free is not None else None
    autocast = (torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 and dev.type == "cuda"
                else nullcontext())
    results: list[Timing] = []
    g = torch.Generator().manual_seed(0)
    for bs in batch_sizes:
        x = torch.randn((bs, *input_size), generator=g).to(device=dev, dtype=dtype)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if progress:
            progress(f"inference, batch {bs}")

        def fo(x=x):
            with torch.inference_mode(), autocast:
                return run_o(x)

        def fc(x=x):
            with torch.inference_mode(), autocast:
                return run_c(x)

        a, b, ratio, n = time_pair(fo, fc, dev, rounds, warmup)
        results.append(Timing("inference" + tag, bs, a, b, ratio, n))
        if run_f is not None:
            with torch.inference_mode(), autocast:
                free(x)  # eager: the stubs store their outputs now, so a compiled copy sees plain constants

            def ff(x=x):
                with torch.inference_mode(), autocast:
                    return run_f(x)

            a, b, ratio, n = time_pair(fo, ff, dev, rounds, warmup)
            results.append(Timing("inference, PiX free (bound)" + tag, bs, a, b,
                                  ratio, n))
    if train:
        bs = max(batch_sizes)
        x = torch.randn((bs, *input_size), generator=g).to(device=dev, dtype=dtype)
        orig.train(), conv.train()
        if progress:
            progress(f"training step, batch {bs}")

        def step(m):
            def f():
                for p in m.parameters():
                    p.grad = None
                with autocast:
                    out = m(x)
                out.float().mean().backward()
            return f

        a, b, ratio, n = time_pair(step(run_o), step(run_c), dev, rounds, max(1, warmup - 1))
        results.append(Timing("train step (fwd+bwd)" + tag, bs, a, b, ratio, n))
    return results


def bench_op(channels: int = 256, size: int = 56, zeta: int = 4, batch_size: int = 8, device: str = "cpu",
             dtype: torch.dtype = torch.float32, rounds: int = 20, warmup: int = 3,
             channels_last: bool = False) -> dict[str, Any]:
    """The PiX op against a single pass over its input and against the 1×1 conv it replaces.

    ``fusion``: the pick-or-mix step alone, given p (pooling and φ excluded); ``one_pass``: a grouped sum
    of the same tensor; ``naive``: amax + mean + broadcast where; ``conv1x1``: the C → C/ζ convolution;
    ``pix``: the whole op (pooling, φ, sigmoid, pick-or-mix).
    """
    from .ops import PiX, pick_or_mix, pix_groups

    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, channels, size, size, generator=g).to(device=dev, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    G = pix_groups(channels, zeta)
    p = torch.rand(batch_size, G, generator=g).to(device=dev, dtype=dtype)
    pad = G * zeta - channels
    w = torch.randn(G, channels, 1, 1, generator=g).to(device=dev, dtype=dtype)
    pixm = PiX(channels, zeta).to(device=dev, dtype=dtype)
    with torch.no_grad():
        pixm.weight.normal_()

    def one_pass():
        xx = F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x
        return xx.unflatten(1, (G, zeta)).sum(2)

    def naive():
        xx = F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x
        v = xx.unflatten(1, (G, zeta))
        pp = p[:, :, None, None]
        return torch.where(pp < 0.5, v.amax(2), v.mean(2)) * pp

    cases = {
        "fusion": lambda: pick_or_mix(x, p, zeta),
        "naive": naive,
        "conv1x1": lambda: F.conv2d(x, w),
        "pix": lambda: pixm(x),
    }
    out: dict[str, Any] = {"shape": [batch_size, channels, size, size], "zeta": zeta, "dtype": str(dtype),
                           "device": device, "channels_last": channels_last, "threads": torch.get_num_threads()}
    with torch.inference_mode():
        for name, f in cases.items():
            a, b, ratio, n = time_pair(one_pass, f, dev, rounds, warmup)
            out[f"{name}_ms"] = b
            out[f"{name}_vs_one_pass"] = ratio
            out["one_pass_ms"] = a if "one_pass_ms" not in out else min(out["one_pass_ms"], a)
    return out


@dataclass
class BenchReport:
    model: str
    zeta: Any
    device: str
    threads: int
    compile: bool
    macs: dict[str, int] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    timings: list[Timing] = field(default_factory=list)
    malloc: str = "system"  # what tune_malloc() returned, or "system" when it was not asked for
    compile_mode: str | None = None  # torch.compile's mode, when not its default

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["timings"] = [t.to_json() for t in self.timings]
        return d


class _SlicePiX(nn.Module):
    """Stand-in for PiX in an exported graph: every ζ-th channel (a strided slice, about free), so that the
    layers before it stay in the graph (a constant would let the runtime drop them)."""

    def __init__(self, pix: nn.Module):
        super().__init__()
        self.zeta, self.channel_dim = pix.zeta, pix.channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = [slice(None)] * x.dim()
        index[self.channel_dim] = slice(None, None, self.zeta)
        return x[tuple(index)]


def bench_onnxruntime(original: nn.Module, converted: nn.Module, input_size: tuple[int, ...],
                      batch_sizes: tuple[int, ...] = (1, 8), threads: int | None = None, rounds: int = 15,
                      warmup: int = 3, floor: bool = False,
                      progress: Callable[[str], None] | None = None) -> list[Timing]:
    """Inference latency of the exported graphs in ONNX Runtime (CPU): converted vs original, alternating in
    one process, per batch size; ``floor``: also a copy whose PiX modules are strided channel slices."""
    import tempfile

    try:
        import onnxruntime as ort
    except ImportError:
        raise PixifyError("--runtime onnxruntime needs onnxruntime", "pip install 'pixify[deploy]'") from None
    from .deploy import _to_onnx

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="pixify-bench-") as tmp:
        def prepare(key: str, model: nn.Module) -> Callable[[torch.Tensor], Any]:
            path = Path(tmp) / f"{key}.onnx"
            _to_onnx(model, torch.randn(2, *input_size), path, True, 18)
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            return lambda x: sess.run(None, {"x": x.numpy()})

        return _bench_exported("onnxruntime", prepare, original, converted, input_size, batch_sizes, rounds,
                               warmup, floor, progress)


def bench_torch_export(original: nn.Module, converted: nn.Module, input_size: tuple[int, ...],
                       batch_sizes: tuple[int, ...] = (1, 8), rounds: int = 15, warmup: int = 3,
                       floor: bool = False, progress: Callable[[str], None] | None = None) -> list[Timing]:
    """Inference latency of the ``torch.export`` programs (as ``pixify export -o m.pt2`` writes them, run by
    ``torch.export.load(...).module()``): converted vs original, alternating in one process."""
    from .deploy import _exported_program

    def prepare(key: str, model: nn.Module) -> Callable[[torch.Tensor], Any]:
        program = _exported_program(model, torch.randn(2, *input_size), True).module()

        def run(x: torch.Tensor) -> Any:
            with torch.inference_mode():
                return program(x)
        return run

    return _bench_exported("torch.export", prepare, original, converted, input_size, batch_sizes, rounds, warmup,
                           floor, progress)


def _bench_exported(runtime: str, prepare: Callable[[str, nn.Module], Callable[[torch.Tensor], Any]],
                    original: nn.Module, converted: nn.Module, input_size: tuple[int, ...],
                    batch_sizes: tuple[int, ...], rounds: int, warmup: int, floor: bool,
                    progress: Callable[[str], None] | None) -> list[Timing]:
    """Export the original, the converted model and (``floor``) its PiX-free copy with ``prepare(key, model)``,
    which returns the function that runs one exported program, and time them in pairs per batch size."""
    from .ops import export_mode

    models = {"original": original, "converted": converted}
    if floor:
        models["free"] = pix_free_copy(converted, _SlicePiX)
    runs = {}
    for key, m in models.items():
        if progress:
            progress(f"exporting the {key} model for {runtime}")
        with torch.no_grad(), export_mode():
            runs[key] = prepare(key, m.eval())
    cpu = torch.device("cpu")
    results: list[Timing] = []
    g = torch.Generator().manual_seed(0)
    for bs in batch_sizes:
        x = torch.randn((bs, *input_size), generator=g)
        if progress:
            progress(f"{runtime} inference, batch {bs}")
        timed = {k: (lambda run=run: run(x)) for k, run in runs.items()}
        a, b, ratio, n = time_pair(timed["original"], timed["converted"], cpu, rounds, warmup)
        results.append(Timing(f"inference ({runtime})", bs, a, b, ratio, n))
        if floor:
            a, b, ratio, n = time_pair(timed["original"], timed["free"], cpu, rounds, warmup)
            results.append(Timing(f"inference, PiX free (bound) ({runtime})", bs, a, b, ratio, n))
    return results
