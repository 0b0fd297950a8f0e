"""pixify export: the export formulation of PiX proven equal to the reference, ONNX and torch.export graphs
checked in ONNX Runtime / torch.export.load (dynamic batch), and one-line errors."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import pixify
from pixify.cli import main
from pixify.ops import PiX, pick_or_mix_export, pick_or_mix_reference

ort = pytest.importorskip("onnxruntime", reason="pip install -e .[dev] (or pixify[deploy])")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape,cd,zeta", [((2, 12, 5, 6), 1, 4), ((2, 10, 5, 6), 1, 3), ((3, 16, 4, 4), 1, 1),
                                           ((2, 7, 12), -1, 4), ((2, 7, 13), -1, 3), ((1, 9, 16), 2, 8)],
                         ids=["nchw", "nchw-short-last", "zeta1", "tokens", "tokens-short-last", "batch1"])
def test_export_formulation_equals_the_reference(shape, cd, zeta, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    if len(shape) == 4 and zeta == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    groups = -(-shape[cd] // zeta)
    p = torch.rand(shape[0], groups, generator=g)
    p[0, 0], p[-1, -1] = 0.2, 0.8
    got = pick_or_mix_export(x, p, zeta, 0.5, cd)
    want = pick_or_mix_reference(x, p, zeta, 0.5, cd)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def _tiny(mode="squeeze"):
    model, source = pixify.create_model("resnet50", pretrained=False, kwargs={
        "layers": [1, 1, 1, 1], "stem_width": 8, "base_width": 8, "num_classes": 4})
    conv, _ = pixify.convert(model, mode=mode, source=source, example_input=torch.randn(1, 3, 32, 32))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in conv.modules():
            if isinstance(m, PiX):  # about half the groups pick, half mix
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    return conv


@pytest.mark.parametrize("mode", ["squeeze", "prune"])
def test_onnx_export_is_checked_in_onnx_runtime_with_a_dynamic_batch(tmp_path, mode):
    import onnx

    conv = _tiny(mode)
    out = tmp_path / "m.onnx"
    rep = pixify.export(conv, out, input_size=(3, 32, 32))
    assert out.is_file() and rep.batch == "dynamic" and [c["batch"] for c in rep.checked] == [1, 2, 3]
    assert all(c["max_abs_diff"] < 1e-5 and c["top1_agreement"] == 100.0 for c in rep.checked)
    ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert ops["Transpose"] == 0 and ops["Gather"] == 0  # no full-size transposes or gathers for PiX
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 32, 32)
    got = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, conv(x), rtol=1e-4, atol=1e-4)


def test_torch_export_round_trip(tmp_path):
    conv = _tiny()
    rep = pixify.export(conv, tmp_path / "m.pt2", input_size=(3, 32, 32))
    assert rep.format == "torch.export" and len(rep.checked) == 3
    prog = torch.export.load(str(tmp_path / "m.pt2"))
    names = {str(n.target) for n in prog.graph.nodes if n.op == "call_function"}
    assert not any("pixify" in n for n in names)  # runs without pixify's custom op
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(prog.module()(x), conv(x), rtol=1e-5, atol=1e-5)


def test_fixed_batch_and_the_cli(tmp_path, capsys):
    conv = _tiny()
    ckpt = tmp_path / "m.safetensors"
    pixify.save(conv, ckpt)
    assert main(["export", str(ckpt), "-o", str(tmp_path / "m.onnx"), "--batch", "2", "--json"]) == 0
    import json

    rep = json.loads(capsys.readouterr().out)
    assert rep["batch"] == "2" and rep["checked"][0]["batch"] == 2 and rep["input_shape"] == [3, 32, 32]


def test_a_successful_export_prints_nothing_on_stderr(tmp_path):
    """torch.export used to log two lines naming the temporary file (it lacks .pt2), and the ONNX exporter a
    note for opsets its own converter does not reach; a successful export says nothing on stderr."""
    import subprocess
    import sys

    ckpt = tmp_path / "m.safetensors"
    pixify.save(_tiny(), ckpt)
    for out, extra in (("m.pt2", []), ("m.onnx", ["--opset", "26"])):
        res = subprocess.run([sys.executable, "-m", "pixify", "export", str(ckpt), "-o", str(tmp_path / out), *extra],
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        assert res.stderr.strip() == "", res.stderr
        assert (tmp_path / out).is_file()
    import onnx

    assert [o.version for o in onnx.load(str(tmp_path / "m.onnx")).opset_import if o.domain in ("", "ai.onnx")] == [26]


def test_a_graph_that_does_not_match_is_not_kept(tmp_path, monkeypatch):
    import pixify.deploy as deploy

    conv = _tiny()
    real = deploy._Wrapped.forward
    monkeypatch.setattr(deploy._Wrapped, "forward", lambda self, x: real(self, x) + 1.0)  # the exported one only
    with pytest.raises(pixify.PixifyError, match="differs from the model"):
        pixify.export(conv, tmp_path / "m.onnx", input_size=(3, 32, 32))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,needle", [
    (["export", "{ckpt}", "-o", "{tmp}/m.txt"], "cannot tell the export format"),
    (["export", "{ckpt}", "-o", "{tmp}/m.onnx", "--batch", "0"], "--batch"),
    (["export", "{ckpt}", "-o", "{tmp}/m.onnx", "--batch", "many"], "--batch"),
    (["export", "{ckpt}", "-o", "{tmp}/m.onnx", "--opset", "99"], "--opset"),
    (["export", "{tmp}/nope.safetensors", "-o", "{tmp}/m.onnx"], "not found"),
    (["export", "{ckpt}", "-o", "/dev/null.onnx"], "/dev"),
    (["export", "{ckpt}", "-o", "{tmp}/nope/m.onnx"], "does not exist"),
])
def test_export_errors_are_one_line(tmp_path, capsys, argv, needle):
    ckpt = tmp_path / "m.safetensors"
    pixify.save(_tiny(), ckpt)
    before = sorted(tmp_path.iterdir())
    rc = main([a.format(ckpt=ckpt, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert sorted(tmp_path.iterdir()) == before


ZOO = [("resnet50", "squeeze", {}, (3, 224, 224)), ("resnet50", "prune", {}, (3, 224, 224)),
       ("efficientnet_b0", "squeeze", {}, (3, 224, 224)), ("convnext_tiny", "squeeze", {}, (3, 224, 224)),
       ("vit_small_patch16_224", "prune", {}, (3, 224, 224))]


@pytest.mark.slow
@pytest.mark.parametrize("name,mode,kwargs,size", ZOO, ids=[f"{z[0]}-{z[1]}" for z in ZOO])
def test_export_real_architectures(tmp_path, name, mode, kwargs, size):
    model, source = pixify.create_model(name, pretrained=False, kwargs=kwargs)
    conv, report = pixify.convert(model, mode=mode, source=source)
    assert report.count("skip") < len(report.sites)
    for out in ("m.onnx", "m.pt2"):  # export raises unless every check is within 1e-4 of the logits' scale
        rep = pixify.export(conv, tmp_path / out, input_size=size)
        assert [c["batch"] for c in rep.checked] == [1, 2, 3] and (tmp_path / out).is_file()


def test_bench_in_onnx_runtime_times_the_exported_graphs(tmp_path, capsys):
    """Structure only (timings are measured in benchmarks, never asserted): one row per batch size and
    measure, the PiX-free bound included."""
    import json

    ckpt = tmp_path / "m.safetensors"
    pixify.save(_tiny(), ckpt)
    assert main(["bench", str(ckpt), "--runtime", "onnxruntime", "--floor", "--batch-size", "1,2", "--rounds", "1",
                 "--threads", "1", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    rows = [(t["what"], t["batch_size"]) for t in rep["timings"]]
    assert rows == [("inference (onnxruntime)", 1), ("inference, PiX free (bound) (onnxruntime)", 1),
                    ("inference (onnxruntime)", 2), ("inference, PiX free (bound) (onnxruntime)", 2)]
    assert all(t["original_ms"] > 0 and t["converted_ms"] > 0 for t in rep["timings"])
    assert main(["bench", str(ckpt), "--runtime", "onnxruntime", "--compile"]) == 2
    assert main(["bench", str(ckpt), "--runtime", "torch.export", "--floor", "--batch-size", "1", "--rounds", "1",
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [t["what"] for t in rep["timings"]] == ["inference (torch.export)",
                                                   "inference, PiX free (bound) (torch.export)"]
