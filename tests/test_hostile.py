"""Hostile and careless input, table-driven: the CLI, the Python API and tampered checkpoints.

Every case asserts the outcome (exit code 2 or 130, or the PixifyError subclass), that the message is one
line without a traceback, and that the set of files in the workspace is exactly what it was before (plus,
for special files such as /dev/null, that they are still what they were)."""

from __future__ import annotations

import json
import shutil
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pixify
from pixify.cli import main
from pixify.errors import CheckpointError, PixifyError

# a tiny timm ResNet, fast to build: the registered resnet50 with one block per stage and narrow widths
TINY = ["resnet50", "--no-pretrained", "--model-arg", "layers=[1,1,1,1]", "--model-arg", "stem_width=8",
        "--model-arg", "base_width=8", "--model-arg", "num_classes=4", "--input-size", "3,32,32"]
TINY_KWARGS = {"layers": [1, 1, 1, 1], "stem_width": 8, "base_width": 8, "num_classes": 4}


def _snapshot(root: Path) -> set[str]:
    out = set()
    for dirpath, dirs, files in os.walk(root):  # links are listed, not followed
        for name in dirs + files:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


def _write_images(folder: Path, classes: int | None, n: int = 4, size: int = 32) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(len(str(folder)))
    for c in range(classes or 1):
        d = folder / f"c{c}" if classes else folder
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(d / f"{i}.png")
    return folder


def _tamper(src: Path, dst: Path, edit=None, tensors=None) -> Path:
    """A copy of checkpoint ``src`` whose recipe JSON went through ``edit`` (a function on the dict, or a raw
    string replacing it) and whose tensors went through ``tensors`` (a function on the dict)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys()}
    if isinstance(edit, str):
        meta["pixify"] = edit
    elif edit is not None:
        recipe = json.loads(meta["pixify"])
        edit(recipe)
        meta["pixify"] = json.dumps(recipe)
    if tensors is not None:
        tensors(state)
    save_file(state, str(dst), metadata=meta)
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shared read-only material: a converted tiny model and its tampered copies, image folders."""
    root = tmp_path_factory.mktemp("world")
    ckpt = root / "tiny.safetensors"
    assert main(["convert", *TINY, "-o", str(ckpt)]) == 0
    w = {"root": root, "ckpt": ckpt}
    w["imgs"] = _write_images(root / "imgs", classes=4)
    w["imgs5"] = _write_images(root / "imgs5", classes=5, n=2)
    w["flat"] = _write_images(root / "flat", classes=None, n=8)
    w["empty"] = root / "empty"
    w["empty"].mkdir()
    from PIL import Image

    w["bomb"] = _write_images(root / "bomb", classes=None, n=2)
    Image.new("1", (20000, 20000)).save(w["bomb"] / "big.png")  # 400 Mpixels: more than PIL decodes
    bad = _write_images(root / "badimg", classes=None)
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    w["badimg"] = bad
    mixed = _write_images(root / "mixed", classes=2)
    _write_images(mixed, classes=None, n=1)
    w["mixed"] = mixed
    loop = _write_images(root / "loop", classes=None)
    (loop / "again").symlink_to(loop, target_is_directory=True)
    w["loop"] = loop
    w["deep_rules"] = root / "deep.toml"
    w["deep_rules"].write_text("include = " + "[" * 3000 + "]" * 3000 + "\n")
    w["int_rules"] = root / "ints.toml"
    w["int_rules"].write_text("rule = [1, 2]\n")
    w["textfile"] = root / "notes.txt"
    w["textfile"].write_text("hello\n")
    w["syntax"] = root / "syntax.toml"
    w["syntax"].write_text('[[rule]]\nname = "x\n')
    w["key"] = root / "key.toml"
    w["key"].write_text('[[rule]]\nname = "x"\ndescription = "d"\nmode = "squeeze"\npattern = ["conv2d"]\n'
                        'colour = "red"\n')
    w["trunc"] = root / "trunc.safetensors"
    w["trunc"].write_bytes(ckpt.read_bytes()[:200])
    from safetensors.torch import save_file

    w["foreign"] = root / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(w["foreign"]))
    w["evil_pth"] = root / "evil.pth"
    w["evil_pth"].write_bytes(_evil_pickle())
    w["imgs_bad"] = _write_images(root / "imgs_bad", classes=4, n=2)
    (w["imgs_bad"] / "c1" / "text.png").write_text("not an image\n")
    w["weights_int"] = root / "weights_int.safetensors"
    tiny = pixify.create_model("resnet50", pretrained=False, kwargs=TINY_KWARGS)[0]
    save_file({k: v.to(torch.int32) if v.is_floating_point() else v for k, v in tiny.state_dict().items()},
              str(w["weights_int"]))
    for name, edit in TAMPERED.items():
        w["t_" + name] = _tamper(ckpt, root / f"t_{name}.safetensors", *edit)
    return w


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/pixify-pwned",))


def _evil_pickle() -> bytes:
    import io
    import pickle

    buf = io.BytesIO()
    pickle.dump({"conv.weight": _Evil()}, buf)
    return buf.getvalue()


def _set(path: str, value):
    def edit(r):
        keys = path.split(".")
        cur = r
        for k in keys[:-1]:
            cur = cur[int(k)] if isinstance(cur, list) else cur[k]
        last = keys[-1]
        if isinstance(cur, list):
            cur[int(last)] = value
        else:
            cur[last] = value
    return (edit,)


def _drop(path: str):
    def edit(r):
        keys = path.split(".")
        cur = r
        for k in keys[:-1]:
            cur = cur[k]
        del cur[keys[-1]]
    return (edit,)


def _first_float(fn):
    def tensors(state):
        k = next(k for k, v in state.items() if v.is_floating_point())
        state[k] = fn(state[k])
    return (None, tensors)


def _drop_tensor(state):
    state.pop(next(iter(state)))


TAMPERED = {
    "not_json": ("{not json",),
    "a_list": ("[1, 2, 3]",),
    "version_str": _set("format_version", "1"),
    "version_0": _set("format_version", 0),
    "version_99": _set("format_version", 99),
    "no_source": _drop("source"),
    "library": _set("source.library", "evil"),
    "name_path": _set("source.name", "../../etc/passwd"),
    "weights_path": _set("source.weights", "file:/etc/passwd"),
    "kwarg_checkpoint": _set("source.kwargs.checkpoint_path", "/etc/passwd"),
    "kwarg_overlay": _set("source.kwargs.pretrained_cfg_overlay", {"file": "/etc/passwd"}),
    "weights_no_digest": _set("source.weights", "file:original.pth"),
    "kwarg_cfg_url": _set("source.kwargs.pretrained_cfg", {"url": "https://example.com/w.pth", "num_classes": 4}),
    "kwarg_huge": _set("source.kwargs.num_classes", 10 ** 9),
    "kwarg_bad": _set("source.kwargs.no_such_arg", 1),
    "kwarg_float_nan": ("{\"format\": \"pixify\", \"format_version\": 1, \"source\": {\"library\": \"timm\", "
                        "\"name\": \"resnet50\", \"kwargs\": {\"drop_rate\": NaN}}, \"sites\": []}",),
    "sha_bad": _set("source.sha256", "xyz"),
    "sites_dict": _set("sites", {"a": 1}),
    "zeta_str": _set("sites.0.zeta", "x"),
    "zeta_0": _set("sites.0.zeta", 0),
    "zeta_bool": _set("sites.0.zeta", True),
    "site_missing_module": _set("sites.0.name", "layer9.0.conv3"),
    "site_action": _set("sites.0.action", "explode"),
    "site_c_in": _set("sites.0.c_in", -3),
    "site_tau": _set("sites.0.tau", 1.5),
    "site_removed": _set("sites.0.removed", [1, 2]),
    "site_dup": (lambda r: r["sites"].append(dict(r["sites"][0])),),
    "data_std": _set("data_config", {"std": [0, 0, 0]}),
    "input_shape": _set("input_shape", [3, -1, 32]),
    "dtype_f64": _first_float(lambda t: t.double()),
    "shape": _first_float(lambda t: t.flatten()[:1].clone()),
    "missing_tensor": (None, _drop_tensor),
    "deep_list": ("[" * 5000 + "]" * 5000,),
    "deep_object": ('{"a":' * 5000 + "1" + "}" * 5000,),
    "data_mean_inf": _set("data_config", {"mean": [1e309, 0, 0]}),
    "crop_tiny": _set("data_config", {"crop_pct": 1e-9}),
    "removed_parameter": (lambda r: r["sites"][0].update(removed=[r["sites"][0]["name"] + ".weight"]),),
    "int_5000_digits": ('{"format": "pixify", "format_version": 1' + "0" * 5000 + '}',),
    "version_float": _set("format_version", 1.0),
    "cfg_input_size_0": _set("source.pretrained_cfg", {"input_size": [3, 0, 0]}),
    "cfg_input_size_huge": _set("source.pretrained_cfg", {"input_size": [3, 60000, 60000]}),
}

E = "error"  # CLI: exit 2 and one line starting with "error: "

# (id, argv with {placeholders}, needle in the error line)
CLI_CASES = [
    ("unknown-model", ["convert", "resnet5000"], "unknown model"),
    ("unknown-tv-model", ["convert", "torchvision:resnet5000"], "unknown torchvision model"),
    ("zeta-0", ["convert", *TINY, "--zeta", "0"], "zeta must be"),
    ("zeta-neg", ["convert", *TINY, "--zeta", "-1"], "zeta must be"),
    ("zeta-frac", ["convert", *TINY, "--zeta", "1.5"], "zeta must be"),
    ("zeta-word", ["convert", *TINY, "--zeta", "x"], "zeta must be"),
    ("tau-big", ["convert", *TINY, "--tau", "1.2"], "tau must be"),
    ("tau-0", ["convert", *TINY, "--tau", "0"], "tau must be"),
    ("tau-nan", ["convert", *TINY, "--tau", "nan"], "tau must be"),
    ("rules-syntax", ["convert", *TINY, "--rules", "{syntax}"], "syntax.toml:2"),
    ("rules-key", ["convert", *TINY, "--rules", "{key}"], "unknown key 'colour'"),
    ("rules-missing", ["convert", *TINY, "--rules", "{root}/nope.toml"], "nope.toml"),
    ("rules-dir", ["convert", *TINY, "--rules", "{root}"], ""),
    ("inspect-trunc", ["inspect", "{trunc}"], "not a readable safetensors"),
    ("inspect-foreign", ["inspect", "{foreign}"], "not a pixify checkpoint"),
    ("convert-a-file", ["convert", "{foreign}"], "is a file"),
    ("mode", ["convert", *TINY, "--mode", "sideways"], "unknown mode"),
    ("preset", ["convert", *TINY, "--preset", "nonsense"], "unknown preset"),
    ("preset-zeta", ["convert", *TINY, "--preset", "paper", "--zeta", "2"], "fixes ζ"),
    ("input-size-word", ["convert", "resnet50", "--no-pretrained", "--input-size", "3,a"], "--input-size"),
    ("input-size-0", ["convert", "resnet50", "--no-pretrained", "--input-size", "0,32,32"], "--input-size"),
    ("input-size-huge", ["convert", "resnet50", "--no-pretrained", "--input-size", "3,100000,100000"],
     "more than pixify allocates"),
    ("model-arg-form", ["convert", *TINY, "--model-arg", "oops"], "KEY=VALUE"),
    ("model-arg-unknown", ["convert", *TINY, "--model-arg", "no_such_arg=1"], "cannot build"),
    ("model-arg-type", ["convert", "resnet50", "--no-pretrained", "--model-arg", "layers=\"x\""], "cannot build"),
    ("model-arg-zero", ["convert", "resnet50", "--no-pretrained", "--model-arg", "cardinality=0"],
     "cannot build"),
    ("model-arg-assert", ["convert", "resnet50", "--no-pretrained", "--model-arg", "output_stride=7"],
     "cannot build"),
    ("model-arg-in-chans", ["convert", "resnet50", "--no-pretrained", "--model-arg", "in_chans=0",
                            "--input-size", "3,32,32"], "does not run on the example input"),
    ("tv-model-arg", ["convert", "torchvision:resnet18", "--no-pretrained", "--model-arg", "no_such_arg=1"],
     "cannot build"),
    ("tv-model-arg-negative", ["convert", "torchvision:resnet18", "--no-pretrained", "--model-arg",
                               "num_classes=-1"], "cannot build"),
    ("out-missing-parent", ["convert", *TINY, "-o", "{work}/nope/x.safetensors"], "does not exist"),
    ("out-dev-null", ["convert", *TINY, "-o", "/dev/null"], "/dev"),
    ("out-directory", ["convert", *TINY, "-o", "{work}/adir"], "a folder"),
    ("out-fifo", ["convert", *TINY, "-o", "{work}/fifo"], "a FIFO"),
    ("out-socket", ["convert", *TINY, "-o", "{work}/sock"], "a socket"),
    ("out-proc", ["convert", *TINY, "-o", "/proc/self/comm"], "/proc"),
    ("out-sys", ["convert", *TINY, "-o", "/sys/kernel/pixify.safetensors"], "/sys"),
    ("out-symlink", ["convert", *TINY, "-o", "{work}/link.safetensors"], "symbolic link"),
    ("out-parent-is-file", ["convert", *TINY, "-o", "{work}/afile/x.safetensors"], "is a file"),
    ("data-missing", ["convert", *TINY, "--data", "{root}/nope"], "does not exist"),
    ("data-empty", ["convert", *TINY, "--data", "{empty}"], "holds no images"),
    ("data-file", ["convert", *TINY, "--data", "{textfile}"], "is a file"),
    ("data-corrupt", ["convert", *TINY, "--data", "{badimg}"], "broken.png"),
    ("data-loop", ["convert", *TINY, "--data", "{loop}"], "symbolic link"),
    ("data-mixed", ["convert", *TINY, "--data", "{mixed}"], "mixes images"),
    ("calib-images-1", ["convert", *TINY, "--data", "{flat}", "--calib-images", "1"], "at least 2"),
    ("budget-word", ["convert", *TINY, "--data", "{flat}", "--budget", "fast"], "budget"),
    ("budget-no-data", ["convert", *TINY, "--budget", "agreement=90"], "needs --data"),
    ("std-0", ["convert", *TINY, "--data", "{flat}", "--std", "0"], "std"),
    ("std-neg", ["convert", *TINY, "--data", "{flat}", "--std", "-1,1,1"], "std"),
    ("interpolation", ["convert", *TINY, "--data", "{flat}", "--interpolation", "wobble"], "interpolation"),
    ("crop-pct-0", ["convert", *TINY, "--data", "{flat}", "--crop-pct", "0"], "crop"),
    ("crop-pct-big", ["convert", *TINY, "--data", "{flat}", "--crop-pct", "1.5"], "crop"),
    ("crop-pct-tiny", ["convert", *TINY, "--data", "{flat}", "--crop-pct", "1e-9"], "--crop-pct"),
    ("std-denormal", ["convert", *TINY, "--data", "{flat}", "--std", "1e-320"], "--std"),
    ("std-inf-no-data", ["convert", *TINY, "--std", "inf"], "--std"),
    ("mean-nan-no-data", ["convert", *TINY, "--mean", "nan"], "--mean"),
    ("mean-huge-data", ["convert", *TINY, "--data", "{flat}", "--mean", "2e6"], "--mean"),
    ("zeta-huge", ["convert", *TINY, "--zeta", "1048577"], "zeta"),
    ("zeta-40-digits", ["convert", *TINY, "--zeta", "9" * 40], "zeta"),
    ("mean-words", ["convert", *TINY, "--data", "{flat}", "--mean", "a,b"], "mean"),
    ("key-map", ["convert", *TINY, "--key-map", "alphabetical"], "unknown key map"),
    ("key-map-no-weights", ["convert", *TINY, "--key-map", "positional"], "applies to a weights file"),
    ("weights-missing", ["convert", *TINY, "--weights", "{root}/nope.pth"], "not found"),
    ("weights-foreign", ["convert", *TINY, "--weights", "{foreign}"], "missing"),
    ("weights-pickle", ["convert", *TINY, "--weights", "{evil_pth}"], "weights"),
    ("inspect-missing", ["inspect", "{root}/nope.safetensors"], "not found"),
    ("ft-missing-ckpt", ["finetune", "{root}/nope.safetensors", "--data", "{imgs}"], "not found"),
    ("ft-data-missing", ["finetune", "{ckpt}", "--data", "{root}/nope", "-o", "{work}/run"], "not found"),
    ("ft-out-file", ["finetune", "{ckpt}", "--data", "{imgs}", "-o", "{work}/afile"], "is a file"),
    ("ft-out-parent", ["finetune", "{ckpt}", "--data", "{imgs}", "-o", "{work}/nope/run"], "does not exist"),
    ("ft-out-proc", ["finetune", "{ckpt}", "--data", "{imgs}", "-o", "/proc/pixify-run"], "/proc"),
    ("ft-epochs-0", ["finetune", "{ckpt}", "--data", "{imgs}", "--epochs", "0", "-o", "{work}/run"], "--epochs"),
    ("ft-lr-neg", ["finetune", "{ckpt}", "--data", "{imgs}", "--lr", "-1", "-o", "{work}/run"], "--lr"),
    ("ft-lr-nan", ["finetune", "{ckpt}", "--data", "{imgs}", "--lr", "nan", "-o", "{work}/run"], "--lr"),
    ("ft-batch-0", ["finetune", "{ckpt}", "--data", "{imgs}", "-b", "0", "-o", "{work}/run"], "--batch-size"),
    ("ft-workers-neg", ["finetune", "{ckpt}", "--data", "{imgs}", "-j", "-1", "-o", "{work}/run"], "--workers"),
    ("ft-workers-huge", ["finetune", "{ckpt}", "--data", "{imgs}", "-j", "100000", "-o", "{work}/run"], "at most"),
    ("ft-device-absent", ["finetune", "{ckpt}", "--data", "{imgs}", "--device", "cuda:7", "-o", "{work}/run"],
     "cuda:7"),
    ("ft-device-word", ["finetune", "{ckpt}", "--data", "{imgs}", "--device", "banana", "-o", "{work}/run"],
     "not a device"),
    ("ft-resume-nothing", ["finetune", "{ckpt}", "--data", "{imgs}", "--resume", "-o", "{work}/adir"],
     "nothing to resume"),
    ("ft-existing-run", ["finetune", "{ckpt}", "--data", "{imgs}", "-o", "{work}/oldrun"], "already holds"),
    ("ft-teacher-missing", ["finetune", "{ckpt}", "--data", "{imgs}", "--teacher", "{root}/nope.pth",
                            "-o", "{work}/run"], "nope.pth"),
    ("ft-kd-weight", ["finetune", "{ckpt}", "--data", "{imgs}", "--kd-weight", "2", "-o", "{work}/run"],
     "--kd-weight"),
    ("ft-temperature", ["finetune", "{ckpt}", "--data", "{imgs}", "-T", "0", "-o", "{work}/run"],
     "--temperature"),
    ("ft-classes", ["finetune", "{ckpt}", "--data", "{imgs5}", "-o", "{work}/run"], "class"),
    ("ft-optimizer", ["finetune", "{ckpt}", "--data", "{imgs}", "--optimizer", "magic", "-o", "{work}/run"],
     "optimizer"),
    ("eval-device", ["eval", "{ckpt}", "--data", "{imgs}", "--device", "banana"], "not a device"),
    ("eval-batch-0", ["eval", "{ckpt}", "--data", "{imgs}", "-b", "0"], "batch"),
    ("eval-workers-huge", ["eval", "{ckpt}", "--data", "{imgs}", "-j", "100000"], "at most"),
    ("eval-batch-huge", ["eval", "{ckpt}", "--data", "{imgs}", "-b", "9" * 30], "--batch-size"),
    ("eval-bomb-unchecked", ["eval", "{ckpt}", "--data", "{bomb}", "--no-check-images", "--no-teacher", "-j", "0"],
     "cannot read the data"),
    ("export-opset-old", ["export", "{ckpt}", "-o", "{work}/m.onnx", "--opset", "8"], "--opset"),
    ("export-batch-huge", ["export", "{ckpt}", "-o", "{work}/m.pt2", "--batch", "99999999999"], "--batch"),
    ("rules-nested", ["rules", "--rules", "{deep_rules}"], "nested"),
    ("rules-not-tables", ["rules", "--rules", "{int_rules}"], "tables"),
    ("eval-teacher-and-none", ["eval", "{ckpt}", "--data", "{imgs}", "--teacher", "{ckpt}", "--no-teacher"],
     "contradict"),
    ("eval-std-denormal", ["eval", "{ckpt}", "--data", "{imgs}", "--std", "1e-320"], "--std"),
    ("eval-deep-json", ["eval", "{t_deep_list}", "--data", "{imgs}"], "nested"),
    ("inspect-deep-json", ["inspect", "{t_deep_object}"], "nested"),
    ("inspect-tampered-mean", ["inspect", "{t_data_mean_inf}"], "data_config.mean"),
    ("inspect-tampered-crop", ["inspect", "{t_crop_tiny}"], "data_config.crop_pct"),
    ("eval-ckpt-is-dir", ["eval", "{work}/adir", "--data", "{imgs}"], "is a folder"),
    ("bench-batch-huge", ["bench", "{ckpt}", "-b", "9" * 30, "--rounds", "1", "--no-train"], "--batch-size"),
    ("bench-threads-huge", ["bench", "{ckpt}", "--threads", "9" * 30, "--rounds", "1"], "--threads"),
    ("ft-out-cwd-with-files", ["finetune", "{ckpt}", "--data", "{imgs}", "-o", ""], "other files"),
    ("eval-data-missing", ["eval", "{ckpt}", "--data", "{root}/nope"], "not found"),
    ("bench-cuda", ["bench", "{ckpt}", "--device", "cuda:3"], "cuda"),
    ("bench-dtype", ["bench", "{ckpt}", "--dtype", "float8"], "--dtype"),
    ("bench-threads", ["bench", "{ckpt}", "--threads", "0"], "--threads"),
    ("bench-batch", ["bench", "{ckpt}", "--batch-size", "x"], "batch"),
] + [(f"tampered-{name}", ["inspect", "{t_" + name + "}"], "") for name in TAMPERED] + [
    ("eval-tampered-std", ["eval", "{t_data_std}", "--data", "{imgs}"], "data_config.std"),
    ("inspect-removed-parameter", ["inspect", "{t_removed_parameter}"], "is not a module"),
    ("inspect-int-5000-digits", ["inspect", "{t_int_5000_digits}"], "not valid JSON"),
    ("inspect-version-float", ["inspect", "{t_version_float}"], "format_version"),
    ("bench-cfg-input-size-0", ["bench", "{t_cfg_input_size_0}", "--rounds", "1", "--no-train"], "input_size"),
    ("export-cfg-input-size-huge", ["export", "{t_cfg_input_size_huge}", "-o", "{work}/m.pt2"], "input_size"),
    ("bench-ckpt-wrong-channels", ["bench", "{ckpt}", "--input-size", "1,32,32", "-b", "1", "--rounds", "1",
                                   "--no-train"], "does not run on the example input"),
    ("export-onnx-wrong-channels", ["export", "{ckpt}", "-o", "{work}/m.onnx", "--input-size", "1,32,32"],
     "does not run on the example input"),
    ("export-onnx-wrong-rank", ["export", "{ckpt}", "-o", "{work}/m.onnx", "--input-size", "3,8,8,8"],
     "does not run on the example input"),
    ("convert-cfg-overlay-input-size-0", ["convert", *TINY[:-2], "--model-arg",
                                          'pretrained_cfg_overlay={{"input_size":[3,0,0]}}'], "input_size"),
    ("eval-undecodable-unchecked", ["eval", "{ckpt}", "--data", "{imgs_bad}", "--no-check-images", "--no-teacher",
                                    "-j", "0", "-b", "2"], "cannot identify image"),
    ("eval-undecodable-unchecked-workers", ["eval", "{ckpt}", "--data", "{imgs_bad}", "--no-check-images",
                                            "--no-teacher", "-j", "2", "-b", "2"], "cannot identify image"),
    ("convert-weights-int", ["convert", *TINY, "--weights", "{weights_int}"], "int32 in the file"),
    ("inspect-empty-path", ["inspect", ""], ""),
    ("ft-teacher-a-folder", ["finetune", "{ckpt}", "--data", "{imgs}", "--teacher", "{imgs}", "-o", "{work}/run"],
     "is a folder"),
    ("inspect-data-progress-error", ["inspect", *TINY, "--data", "{flat}", "--calib-images", "1"], "at least 2"),
]


def _workspace(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (work / "adir").mkdir()
    (work / "afile").write_text("x")
    os.mkfifo(work / "fifo")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(work / "sock"))
    s.close()
    (work / "target.safetensors").write_bytes(b"keep me")
    (work / "link.safetensors").symlink_to(work / "target.safetensors")
    (work / "oldrun").mkdir()
    (work / "oldrun" / "checkpoint.safetensors").write_bytes(b"an earlier run")
    return work


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_hostile_input(case, world, tmp_path, capsys, monkeypatch):
    _, argv, needle = case
    work = _workspace(tmp_path)
    monkeypatch.chdir(work)
    subst = {k: str(v) for k, v in world.items()}
    subst["work"] = str(work)
    argv = [a.format(**subst) if "{" in a else a for a in argv]
    before = _snapshot(work)
    dev_null = os.stat("/dev/null").st_mode
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.splitlines()  # exactly one line: not even a blank one before it
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]
    assert _snapshot(work) == before
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and os.stat("/dev/null").st_mode == dev_null
    assert (work / "target.safetensors").read_bytes() == b"keep me"
    assert not Path("/tmp/pixify-pwned").exists()


# ------------------------------------------------------------------------------------------------ API

class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.b = torch.nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).mean((2, 3))


def _api_cases():
    x = torch.randn(1, 3, 16, 16)

    def meta():
        with torch.device("meta"):
            return _Net()

    return [
        ("script", lambda w: pixify.convert(torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1))),
                                            example_input=x), PixifyError, "TorchScript"),
        ("traced", lambda w: pixify.convert(torch.jit.trace(_Net(), x), example_input=x), PixifyError, "TorchScript"),
        ("graph-module", lambda w: pixify.convert(torch.fx.symbolic_trace(_Net()), example_input=x), PixifyError,
         "GraphModule"),
        ("meta", lambda w: pixify.convert(meta(), example_input=x), PixifyError, "meta device"),
        ("not-a-module", lambda w: pixify.convert("resnet50"), PixifyError, "nn.Module"),
        ("zeta-0", lambda w: pixify.convert(_Net(), zeta=0, example_input=x), PixifyError, "zeta"),
        ("tau-1", lambda w: pixify.convert(_Net(), tau=1.0, example_input=x), PixifyError, "tau"),
        ("calib-shape", lambda w: pixify.convert(_Net(), example_input=x, calibration=[torch.randn(4, 3, 8, 8)]),
         PixifyError, "shape"),
        ("calib-ints", lambda w: pixify.convert(_Net(), example_input=x, calibration=[torch.ones(4, 3, 16, 16,
                                                                                                 dtype=torch.long)]),
         PixifyError, "floating-point"),
        ("calib-not-tensor", lambda w: pixify.convert(_Net(), example_input=x, calibration=["img.png"]),
         PixifyError, "tensor"),
        ("calib-empty", lambda w: pixify.convert(_Net(), example_input=x, calibration=[]), PixifyError, "empty"),
        ("calib-not-iterable", lambda w: pixify.convert(_Net(), example_input=x, calibration=5), PixifyError,
         "iterable"),
        ("inspect-calib-shape", lambda w: pixify.inspect(_Net(), example_input=x,
                                                         calibration=[torch.randn(4, 3, 8, 8)]),
         PixifyError, "shape"),
        ("rules-int", lambda w: pixify.convert(_Net(), rules=5, example_input=x), PixifyError, "rules"),
        ("rules-list-int", lambda w: pixify.convert(_Net(), rules=[5], example_input=x), PixifyError, "rules"),
        ("rules-missing-file", lambda w: pixify.convert(_Net(), rules="nope.toml", example_input=x), PixifyError,
         "nope.toml"),
        ("budget-no-calib", lambda w: pixify.convert(_Net(), budget="agreement=90", example_input=x), PixifyError,
         "calibration"),
        ("load-map-location-cuda", lambda w: pixify.load(w["ckpt"], map_location="cuda:9"), PixifyError,
         "map_location"),
        ("load-map-location-word", lambda w: pixify.load(w["ckpt"], map_location="banana"), PixifyError,
         "map_location"),
        ("load-missing", lambda w: pixify.load(w["root"] / "nope.safetensors"), CheckpointError, "not found"),
        ("load-empty-path", lambda w: pixify.load(""), CheckpointError, "empty path"),
        ("load-removed-parameter", lambda w: pixify.load(w["t_removed_parameter"]), CheckpointError,
         "is not a module"),
        ("load-missing-tensor-summary", lambda w: pixify.load(w["t_missing_tensor"]), CheckpointError,
         "1 missing ("),
        ("export-wrong-channels", lambda w: pixify.export(w["ckpt"], w["root"] / "x.onnx", input_size=(1, 32, 32)),
         PixifyError, "does not run on the example input"),
        ("load-trunc", lambda w: pixify.load(w["trunc"]), CheckpointError, "safetensors"),
        ("load-kwarg-checkpoint", lambda w: pixify.load(w["t_kwarg_checkpoint"]), CheckpointError,
         "source.kwargs.checkpoint_path"),
        ("load-kwarg-overlay", lambda w: pixify.load(w["t_kwarg_overlay"]), CheckpointError,
         "pretrained_cfg_overlay.file"),
        ("load-weights-no-digest", lambda w: pixify.load(w["t_weights_no_digest"]), CheckpointError,
         "source.sha256"),
        ("load-kwarg-cfg-url", lambda w: pixify.load(w["t_kwarg_cfg_url"]), CheckpointError,
         "pretrained_cfg.url"),
        ("load-huge", lambda w: pixify.load(w["t_kwarg_huge"]), CheckpointError, "file holds"),
        ("load-dtype", lambda w: pixify.load(w["t_dtype_f64"]), CheckpointError, "torch.float64"),
        ("load-zeta", lambda w: pixify.load(w["t_zeta_str"]), CheckpointError, "sites[0].zeta"),
        ("save-no-recipe", lambda w: pixify.save(_Net(), w["work"] / "x.safetensors"), PixifyError, "recipe"),
        ("save-dev-null", lambda w: pixify.save(pixify.convert(_Net(), example_input=x)[0], "/dev/null"),
         PixifyError, "/dev"),
        ("save-directory", lambda w: pixify.save(pixify.convert(_Net(), example_input=x)[0], w["work"] / "adir"),
         PixifyError, "a folder"),
        ("finetune-out-file", lambda w: pixify.finetune(w["ckpt"], w["imgs"], out=w["work"] / "afile"),
         PixifyError, "is a file"),
        ("recalibrate-wrong-channels", lambda w: pixify.recalibrate_batchnorm(pixify.load(w["ckpt"]),
                                                                             [torch.randn(2, 1, 32, 32)]),
         PixifyError, "does not run through the model"),
        ("load-map-location-cpu1", lambda w: pixify.load(w["ckpt"], map_location="cpu:1"), PixifyError, "one CPU"),
        ("load-into-script", lambda w: pixify.load(w["ckpt"], model=torch.jit.script(_Net())), PixifyError,
         "TorchScript"),
        ("load-path-none", lambda w: pixify.load(None), CheckpointError, "path"),
        ("save-recipe-str", lambda w: pixify.save(_Net(), w["work"] / "x.safetensors", recipe="abc"), PixifyError,
         "recipe"),
        ("save-recipe-object", lambda w: pixify.save(pixify.convert(_Net(), example_input=x)[0],
                                                     w["work"] / "x.safetensors",
                                                     recipe={**pixify.convert(_Net(), example_input=x)[0].pixify_recipe,
                                                             "x": object()}), PixifyError, "JSON"),
        ("convert-example-empty", lambda w: pixify.convert(_Net(), example_input=torch.randn(0, 3, 16, 16)),
         PixifyError, "at least one"),
        ("convert-example-dict", lambda w: pixify.convert(_Net(), example_input={"x": x}), PixifyError,
         "example_input"),
        ("convert-calibration-half", lambda w: pixify.convert(_Net(), example_input=x,
                                                              calibration=[x.half()] * 2), PixifyError,
         "float16"),
        ("convert-progress-int", lambda w: pixify.convert(_Net(), example_input=x, progress=5), PixifyError,
         "progress"),
        ("convert-rule-empty-pattern", lambda w: pixify.convert(_Net(), example_input=x, rules=[
            pixify.Rule(name="r", description="d", pattern=())]), PixifyError, "pattern"),
        ("convert-rule-bad-priority", lambda w: pixify.convert(_Net(), example_input=x, rules=[
            pixify.Rule(name="r", description="d", priority="x")]), PixifyError, "priority"),
        ("register-rule-int", lambda w: pixify.register_rule(5), PixifyError, "Rule"),
        ("export-meta", lambda w: pixify.export(pixify.load(w["ckpt"]).to("meta"), w["work"] / "m.pt2"),
         PixifyError, "meta"),
        ("export-inputs-wrong-size", lambda w: pixify.export(w["ckpt"], w["work"] / "m.pt2",
                                                             inputs=torch.randn(2, 3, 16, 16)), PixifyError,
         "do not fit"),
        ("export-input-size-str", lambda w: pixify.export(w["ckpt"], w["work"] / "m.pt2", input_size="3,32,32"),
         PixifyError, "input_size"),
        ("export-atol-nan", lambda w: pixify.export(w["ckpt"], w["work"] / "m.pt2", atol=float("nan")),
         PixifyError, "atol"),
        ("export-batch-float", lambda w: pixify.export(w["ckpt"], w["work"] / "m.pt2", batch=1.7), PixifyError,
         "--batch"),
        ("finetune-warmup-str", lambda w: pixify.finetune(w["ckpt"], w["imgs"], out=w["work"] / "r", warmup="x"),
         PixifyError, "warmup"),
        ("finetune-seed-huge", lambda w: pixify.finetune(w["ckpt"], w["imgs"], out=w["work"] / "r", seed=2 ** 70),
         PixifyError, "seed"),
        ("finetune-config-str", lambda w: pixify.finetune(w["ckpt"], w["imgs"], out=w["work"] / "r",
                                                          config="fast"), PixifyError, "FinetuneConfig"),
        ("finetune-data-config-bad", lambda w: pixify.finetune(w["ckpt"], w["imgs"], out=w["work"] / "r", steps=1,
                                                               calib_images=0, data_config={"mean": "abc"}),
         PixifyError, "data_config"),
        ("evaluate-data-int", lambda w: pixify.evaluate(w["ckpt"], 5), PixifyError, "data must be"),
        ("evaluate-wrong-channels", lambda w: pixify.evaluate(w["ckpt"], [(torch.randn(2, 1, 32, 32),
                                                                          torch.zeros(2, dtype=torch.long))],
                                                              teacher=False), PixifyError, "does not run"),
        ("create-model-none", lambda w: pixify.create_model(None), PixifyError, "string"),
        ("create-model-kwargs-list", lambda w: pixify.create_model("resnet18", pretrained=False, kwargs=[1, 2]),
         PixifyError, "kwargs"),
    ]


API_CASES = _api_cases()


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_hostile_input(case, world, tmp_path, monkeypatch):
    _, call, kind, needle = case
    work = _workspace(tmp_path)
    monkeypatch.chdir(work)
    before = _snapshot(work)
    with pytest.raises(kind) as info:
        call(dict(world, work=work))
    msg = str(info.value)
    assert "\n" not in msg and needle in msg, msg
    assert _snapshot(work) == before


def test_at_least_eighty_distinct_cases():
    ids = [c[0] for c in CLI_CASES] + [c[0] for c in API_CASES] + ["disk-full", "interrupt-convert",
                                                                   "interrupt-finetune", "lock", "sigint"]
    assert len(ids) >= 80


# ---------------------------------------------------------------------------- file-system behaviour

def test_disk_full_and_read_only_are_one_line_and_leave_nothing(world, tmp_path, capsys):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        rc = main(["convert", *TINY, "-o", str(mnt / "m.safetensors")])
        err = capsys.readouterr().err.splitlines()
        assert rc == 2 and len(err) == 1 and "No space left on device" in err[0], err
        assert list(mnt.iterdir()) == []
        # the same file system read-only: root's permission bits do not help, the write itself fails
        assert subprocess.run(["mount", "-o", "remount,ro", str(mnt)]).returncode == 0
        rc = main(["convert", *TINY, "-o", str(mnt / "m.safetensors")])
        err = capsys.readouterr().err.splitlines()
        assert rc == 2 and len(err) == 1 and "read-only file system" in err[0], err
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_new_files_get_the_umask_mode_and_replaced_files_keep_theirs(tmp_path, capsys):
    old = os.umask(0o027)
    try:
        out = tmp_path / "m.safetensors"
        assert main(["convert", *TINY, "-o", str(out)]) == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o640
        os.chmod(out, 0o604)
        assert main(["convert", *TINY, "-o", str(out)]) == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o604
    finally:
        os.umask(old)


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path, capsys):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    stale = tmp_path / f".m.safetensors.pixify-{dead}-abc.tmp"
    stale.write_bytes(b"half")
    mine = tmp_path / f".m.safetensors.pixify-{os.getpid()}-xyz.tmp"  # a live process's: left alone
    mine.write_bytes(b"busy")
    assert main(["convert", *TINY, "-o", str(tmp_path / "m.safetensors")]) == 0
    assert not stale.exists() and mine.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.safetensors", mine.name])


def test_interrupted_convert_leaves_nothing(tmp_path, capsys, monkeypatch):
    import safetensors.torch as st

    def interrupt(*a, **k):
        Path(a[1]).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_model", interrupt)
    rc = main(["convert", *TINY, "-o", str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err.splitlines()
    assert rc == 130 and err == ["interrupted; nothing was written"]
    assert list(tmp_path.iterdir()) == []


def test_interrupted_finetune_before_its_first_checkpoint_leaves_nothing(world, tmp_path, capsys, monkeypatch):
    import pixify.training.loss as tr  # where the run looks the loss up

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tr, "distillation_loss", interrupt)
    rc = main(["finetune", str(world["ckpt"]), "--data", str(world["imgs"]), "-o", str(tmp_path / "run"),
               "--calib-images", "0", "-q"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 130 and err == ["interrupted: before the first checkpoint; nothing was kept"], err
    assert list(tmp_path.iterdir()) == []


def test_an_error_after_the_first_checkpoint_keeps_the_run(world, tmp_path, capsys, monkeypatch):
    import pixify.training.loss as tr  # where the run looks the loss up

    real = tr.distillation_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:  # 16 images, batch 8: two steps per epoch, so the third is in epoch 2
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tr, "distillation_loss", flaky)
    run = tmp_path / "run"
    rc = main(["finetune", str(world["ckpt"]), "--data", str(world["imgs"]), "-o", str(run), "--epochs", "2",
               "-b", "8", "--calib-images", "0", "-q", "--no-check-images"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 130 and len(err) == 1 and "continue with --resume" in err[0], err
    assert {"checkpoint.safetensors", "state.safetensors", "log.jsonl"} <= {p.name for p in run.iterdir()}


def test_one_run_per_output_folder(world, tmp_path, capsys):
    from pixify.outputs import RunLock

    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):
        rc = main(["finetune", str(world["ckpt"]), "--data", str(world["imgs"]), "-o", str(run), "-q"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and "another pixify run is writing to" in err[0], err
    assert list(run.iterdir()) == []
    # the lock of a killed process goes with it
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pixify.outputs import RunLock; "
                               f"RunLock({str(run)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(PixifyError, match="another pixify run"):
            RunLock(run).acquire()
        holder.kill()
        holder.wait()
        RunLock(run).acquire().release()
    finally:
        holder.kill()


def test_ctrl_c_in_a_real_process(world, tmp_path):
    """SIGINT to a running `pixify finetune`: one line, exit 130, and no run folder left."""
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "pixify", "finetune", str(world["ckpt"]), "--data",
                             str(world["imgs"]), "-o", str(run), "--steps", "100000", "-b", "2", "--calib-images", "0",
                             "-q", "--no-check-images"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "log.jsonl").exists():
        time.sleep(0.2)
    assert (run / "log.jsonl").exists(), "the run never started"
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert proc.returncode == 130, err
    assert len(lines) == 1 and lines[0].startswith("interrupted"), err
    assert "Traceback" not in err
    assert not run.exists() or (run / "checkpoint.safetensors").exists()


def test_ctrl_c_while_pixify_is_still_being_imported(world):
    """The first second or two of any command is spent importing torch and the model libraries; a Ctrl-C then
    used to end in the import's traceback. Now: one line, exit 130, whenever it lands."""
    import shutil

    commands = [[sys.executable, "-m", "pixify"]]
    if shutil.which("pixify"):
        commands.append([shutil.which("pixify")])
    for command in commands:
        for delay in (0.25, 0.5, 0.8, 1.2):
            proc = subprocess.Popen([*command, "inspect", str(world["ckpt"])], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=120)
            lines = [line for line in err.strip().splitlines() if line.strip()]
            if proc.returncode == 0:  # finished before the signal: nothing to check
                continue
            assert proc.returncode == 130, (command, delay, err)
            assert len(lines) == 1 and lines[0].startswith("interrupted"), (command, delay, err)


_LOADER_LOOP = """
import sys
import torch
import pixify.data as d
src = d.prepare_data(sys.argv[1], split="train", check_images=False, workers=2, what="--data")
cfg = dict(input_size=(3, 16, 16), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
loader = d.create_loader(src, cfg, 2, training=True, workers=2)
# the same dataset and worker set-up, with workers kept across epochs: a Ctrl-C that lands inside fork()
# is swallowed by Python itself ("Exception ignored in ... _releaseLock"), which is not what this tests
loader = torch.utils.data.DataLoader(loader.dataset, batch_size=2, num_workers=2, persistent_workers=True,
                                     worker_init_fn=loader.worker_init_fn)
print("go", flush=True)
try:
    while True:
        for _ in loader:
            pass
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
"""


_FORKING_LOOP = """
import sys
import pixify.data as d
src = d.prepare_data(sys.argv[1], split="train", check_images=False, workers=2, what="--data")
cfg = dict(input_size=(3, 16, 16), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
loader = d.create_loader(src, cfg, 2, training=True, workers=2)  # workers forked anew for every pass
print("go", flush=True)
try:
    while True:
        for _ in d.read_batches(loader):
            pass
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
"""


def test_ctrl_c_while_workers_are_forked_is_not_lost(world, tmp_path):
    """Every pass over the data forks the loader's workers; a Ctrl-C that lands inside fork() used to be
    swallowed by Python ("Exception ignored in ... _releaseLock") and the run went on. Interrupted at many
    moments, the loop always stops with its one line."""
    script = tmp_path / "fork.py"
    script.write_text(_FORKING_LOOP)
    for delay in (0.05, 0.15, 0.3, 0.45, 0.6, 0.8, 1.0, 1.3):
        proc = subprocess.Popen([sys.executable, str(script), str(world["imgs"])], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "go"
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"the Ctrl-C after {delay} s was lost: the loop went on") from None
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert proc.returncode == 130 and lines == ["interrupted"], (delay, err)


def test_ctrl_c_while_workers_hand_over_a_batch_prints_nothing_from_them(world, tmp_path):
    """Ctrl-C that lands while the main process fetches a batch's shared memory from a data-loading worker
    used to make the worker print a multiprocessing traceback. Interrupted at several moments, only the
    main process's line is printed."""
    script = tmp_path / "loop.py"
    script.write_text(_LOADER_LOOP)
    for delay in (0.3, 0.7, 1.1, 1.5):
        proc = subprocess.Popen([sys.executable, str(script), str(world["imgs"])], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "go"
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == 130 and err.strip() == "interrupted", err


def test_library_warnings_before_an_error_do_not_push_it_past_one_line(tmp_path, capsys, monkeypatch):
    import warnings

    import pixify.conversion as conv

    def warn_then_fail(*a, **k):
        warnings.warn("a torch warning\nover two lines", UserWarning)
        raise PixifyError("the real problem")

    monkeypatch.setattr(conv, "convert_named", warn_then_fail)
    monkeypatch.chdir(tmp_path)
    assert main(["convert", *TINY]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: the real problem"]

    def warn_then_interrupt(*a, **k):
        warnings.warn("a torch warning\nover two lines", UserWarning)
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "convert_named", warn_then_interrupt)
    assert main(["convert", *TINY]) == 130
    assert capsys.readouterr().err.splitlines() == ["interrupted; nothing was written"]
    assert list(tmp_path.iterdir()) == []


def test_descriptive_pretrained_cfg_entries_still_load(world, tmp_path):
    """Refusing file-reading constructor arguments must not refuse the descriptive ones users pass."""
    ok = _tamper(world["ckpt"], tmp_path / "ok.safetensors",
                 *_set("source.kwargs.pretrained_cfg_overlay", {"input_size": [3, 32, 32], "mean": [0.5] * 3}))
    model = pixify.load(ok)
    assert model.pixify_recipe["source"]["kwargs"]["pretrained_cfg_overlay"]["input_size"] == [3, 32, 32]


# ------------------------------------------------------------------------------------------------ resuming

def _state_edit(key, value):
    def edit(meta):
        meta[key] = value
    return edit


def _optim_tensor(fn):
    def tensors(state):
        k = next(k for k in state if k.startswith("optim/") and state[k].dim())
        state[k] = fn(state[k])
    return tensors


def _rewrite_state(path: Path, edit=None, tensors=None, raw: str | None = None) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys()}
    payload = json.loads(meta["pixify_train_state"])
    if edit is not None:
        edit(payload)
    meta["pixify_train_state"] = raw if raw is not None else json.dumps(payload)
    if tensors is not None:
        tensors(state)
    save_file(state, str(path), metadata=meta)


DAMAGED_RUNS = {
    "state-not-json": dict(raw="{not json"),
    "state-a-list": dict(raw="[1, 2]"),
    "state-version-str": dict(edit=_state_edit("version", "2")),
    "state-config-str": dict(edit=_state_edit("config", "x")),
    "state-config-bad-batch": dict(edit=lambda m: m["config"].update(batch_size=-5)),
    "state-epoch-str": dict(edit=_state_edit("epoch", "x")),
    "state-no-optimizer": dict(edit=lambda m: m.pop("optimizer")),
    "state-param-group-lr": dict(edit=lambda m: m["optimizer"]["param_groups"][0].update(lr="x")),
    "state-history-str": dict(edit=_state_edit("history", "abc")),
    "state-init-list": dict(edit=_state_edit("init", [1, 2])),
    "state-optim-tensor-missing": dict(tensors=lambda s: s.pop(next(k for k in s if k.startswith("optim/")))),
    "state-optim-tensor-shape": dict(tensors=_optim_tensor(lambda t: t.flatten()[:3].clone())),
}


@pytest.fixture(scope="module")
def finished_run(world, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["finetune", str(world["ckpt"]), "--data", str(world["imgs"]), "-o", str(run), "--steps", "2",
                 "-b", "8", "--calib-images", "0", "-q", "-j", "0"]) == 0
    return run


@pytest.mark.parametrize("damage", list(DAMAGED_RUNS) + ["log-int-line", "log-step-str", "log-bytes",
                                                         "log-a-folder", "no-state-but-checkpoint",
                                                         "state-a-symlink"])
def test_resuming_a_damaged_run_is_one_line(damage, world, finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    log = run / "log.jsonl"
    if damage in DAMAGED_RUNS:
        _rewrite_state(run / "state.safetensors", **DAMAGED_RUNS[damage])
    elif damage == "log-int-line":
        log.write_text(log.read_text() + "5\n")
    elif damage == "log-step-str":
        log.write_text(log.read_text() + '{"event": "train", "step": "x"}\n')
    elif damage == "log-bytes":
        log.write_bytes(log.read_bytes() + b"\xff\xfe\n")
    elif damage == "log-a-folder":
        log.unlink()
        log.mkdir()
    elif damage == "state-a-symlink":
        (run / "state.safetensors").rename(tmp_path / "elsewhere.safetensors")
        (run / "state.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    else:
        (run / "state.safetensors").unlink()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    rc = main(["finetune", str(world["ckpt"]), "--data", str(world["imgs"]), "-o", str(run), "--resume", "-q",
               "-j", "0", "-b", "4"])
    err = capsys.readouterr().err.splitlines()
    if damage.startswith("log-") and damage != "log-a-folder":
        assert rc == 0, err  # lines pixify did not write are dropped from the log; the run is already complete
        return
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0] and "ignoring" not in err[0]
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_bench_that_cannot_run_a_training_step_is_one_line(world, capsys):
    rc = main(["bench", str(world["ckpt"]), "-b", "1", "--input-size", "3,32,32", "--rounds", "1", "--json"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and "--no-train" in err[0], err


def test_json_output_is_strict_json(world, capsys):
    assert main(["inspect", str(world["ckpt"]), "--json"]) == 0
    out = capsys.readouterr().out

    def refuse(constant):
        raise ValueError(f"bare {constant} in --json output")

    data = json.loads(out, parse_constant=refuse)
    assert data["params_before"] > 0 and 0 < data["params_ratio"] <= 1.5


def test_numpy_numbers_are_numbers(world, tmp_path):
    import numpy as np

    x = torch.randn(1, 3, 16, 16)
    model, report = pixify.convert(_Net(), zeta=np.int64(2), example_input=x)
    assert report.zeta == 2
    cfg = pixify.FinetuneConfig(steps=np.int64(3), lr=np.float32(1e-3)).validate()
    assert type(cfg.steps) is int and cfg.steps == 3 and type(cfg.lr) is float


def test_a_rule_from_python_is_checked_even_with_a_digest():
    from pixify.errors import RuleError
    from pixify.rules import Rule

    with pytest.raises(RuleError, match="source must be a string"):
        pixify.register_rule(Rule(name="hostile-src", description="", source=5, digest="abc", kernel_size=1))
    with pytest.raises(RuleError, match="digest"):
        pixify.register_rule(Rule(name="hostile-digest", description="", source="x", digest=5, kernel_size=1))


def test_a_teacher_of_other_classes_is_refused_before_training(world, tmp_path):
    import timm

    with pytest.raises(PixifyError, match="teacher predicts 7 classes"):
        pixify.finetune(world["ckpt"], world["imgs"], out=tmp_path / "run", steps=1,
                        teacher=timm.create_model("resnet18", num_classes=7))
    assert not (tmp_path / "run").exists()


def test_a_switch_set_to_a_word_that_is_neither_keeps_its_default(monkeypatch):
    from pixify.config import _env_bool

    monkeypatch.setenv("PIXIFY_DEBUG", "maybe")
    assert _env_bool("PIXIFY_DEBUG", False) is False and _env_bool("PIXIFY_DEBUG", True) is True
    monkeypatch.setenv("PIXIFY_DEBUG", " On ")
    assert _env_bool("PIXIFY_DEBUG", False) is True
