"""`pixify bench` and the benchmark helpers: structure and plumbing only.

Speed claims are never asserted here (they live in `pixify bench` output and the closing notes); these tests
check that the benchmark measures what it says, on tiny inputs with one round.
"""

import json
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

import pixify
from pixify.bench import bench_models, bench_op, pix_free_copy, time_pair
from pixify.cli import main
from pixify.ops import PiX


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),  # a 4× squeeze
        nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()


def test_time_pair_alternates_and_reports_medians():
    calls = []
    a, b, ratio, n = time_pair(lambda: calls.append("a"), lambda: calls.append("b"), torch.device("cpu"),
                               rounds=4, warmup=1)
    assert n == 4 and a > 0 and b > 0 and ratio > 0
    assert calls[:2] == ["a", "b"]  # warm-up
    assert calls[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # who goes first alternates


def test_pix_free_copy_keeps_shapes_and_leaves_the_original_alone():
    conv, _ = pixify.convert(_net(), example_input=torch.randn(1, 3, 16, 16))
    assert any(isinstance(m, PiX) for m in conv.modules())
    free = pix_free_copy(conv)
    assert not any(isinstance(m, PiX) for m in free.modules())
    assert any(isinstance(m, PiX) for m in conv.modules())
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        assert free(x).shape == conv(x).shape


def test_bench_models_rows():
    conv, _ = pixify.convert(_net(), example_input=torch.randn(1, 3, 16, 16))
    rows = bench_models(_net(), conv, (3, 16, 16), batch_sizes=(1, 2), rounds=2, warmup=1, floor=True)
    assert [(r.what, r.batch_size) for r in rows] == [
        ("inference", 1), ("inference, PiX free (bound)", 1),
        ("inference", 2), ("inference, PiX free (bound)", 2),
        ("train step (fwd+bwd)", 2),
    ]
    for r in rows:
        assert r.rounds >= 2 and r.original_ms > 0 and r.converted_ms > 0 and r.ratio > 0


def test_bench_models_compile_mode_labels_the_rows(monkeypatch):
    modes = []
    monkeypatch.setattr(torch, "compile", lambda m, mode=None: modes.append(mode) or m)  # no compile here
    conv, _ = pixify.convert(_net(), example_input=torch.randn(1, 3, 16, 16))
    rows = bench_models(_net(), conv, (3, 16, 16), batch_sizes=(1,), rounds=1, warmup=1, train=False,
                        compile_mode="reduce-overhead")
    assert modes == ["reduce-overhead", "reduce-overhead"]
    assert [r.what for r in rows] == ["inference (compiled, reduce-overhead)"]


def test_bench_op_keys():
    r = bench_op(channels=32, size=8, zeta=4, batch_size=2, rounds=2, warmup=1)
    for k in ("one_pass_ms", "fusion_ms", "naive_ms", "conv1x1_ms", "pix_ms", "fusion_vs_one_pass"):
        assert r[k] > 0, k
    assert r["shape"] == [2, 32, 8, 8]


def test_cli_bench_json(capsys):
    # --malloc system: tuning is process-wide, so it is tested in a subprocess below instead
    rc = main(["bench", "resnet26", "--input-size", "3,32,32", "--batch-size", "1",
               "--rounds", "1", "--no-train", "--floor", "--threads", "1", "--malloc", "system", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["malloc"] == "system"
    assert rep["macs"]["converted"] < rep["macs"]["original"]
    assert [t["what"] for t in rep["timings"]] == ["inference", "inference, PiX free (bound)"]


@pytest.mark.parametrize("args,needle", [
    (["bench", "resnet26", "--batch-size", "0"], "--batch-size"),
    (["bench", "resnet26", "--rounds", "0"], "--rounds"),
    (["bench", "resnet26", "--device", "tpu"], "--device"),
    (["bench"], "needs a MODEL"),
    (["bench", "resnet26", "--malloc", "jemalloc"], "--malloc"),
    (["bench", "resnet26", "--compile-mode", "fast"], "--compile-mode"),
])
def test_cli_bench_bad_inputs(capsys, args, needle):
    rc = main(args)
    out, err = capsys.readouterr()
    assert rc == 2
    assert needle in err and len(err.strip().splitlines()) == 1


_REUSE_CHECK = """
import ctypes, resource, torch
from pixify.bench import tune_malloc
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def mmapped():
    block = libc.malloc(30 << 20)
    flag = ctypes.c_size_t.from_address(block - 8).value & 2  # glibc's IS_MMAPPED chunk bit
    libc.free(block)
    return int(bool(flag))
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):  # a forward's activations of 6 to 24 MiB, held together, then freed
        live = [torch.ones(n << 18) for n in (24, 24, 24, 24, 12, 6)]
        del live
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
before = mmapped()
assert tune_malloc() == "tuned" and tune_malloc() == "tuned"
after = mmapped()
faults()
print(before, after, faults())
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tune_malloc_keeps_activations_on_the_heap():
    """What --malloc tuned is for: blocks up to 32 MiB come from the heap and are reused after being freed,
    instead of being mapped (and faulted in page by page) afresh.  (Whether glibc's defaults fault on the
    loop below varies from run to run with the address-space layout, so only the mapping is compared.)
    In a subprocess: the setting is process-wide and cannot be undone."""
    run = subprocess.run([sys.executable, "-c", _REUSE_CHECK], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    before, after, faults = (int(v) for v in run.stdout.split()[-3:])
    assert before == 1  # glibc's default: a 30 MiB block is a mapping of its own
    assert after == 0  # tuned: it comes from the heap
    assert faults < 500, faults  # and a forward's worth of activations no longer faults in
