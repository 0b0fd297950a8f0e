"""Recovery fine-tuning and evaluation: tiny models on generated 32×32 ImageFolders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pixify
from pixify.cli import main as cli_main
from pixify.errors import PixifyError
from pixify.training import finetune as run_finetune

ft = sys.modules["pixify.training.loss"]  # where the run looks the loss up

# A tiny timm bottleneck ResNet: 4 squeeze sites (64→8 at ζ 8, three more at ζ 2), ~140 k parameters.
KWARGS = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "num_classes": 3}
FAST = ["--batch-size", "8", "--workers", "0", "--calib-images", "16", "--no-check-images", "--quiet"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("PIXIFY_DEBUG", None)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _write_images(folder: Path, n_per_class: int, classes: int | None, seed: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes or 1):
        d = folder / f"class{c}" if classes else folder
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = rng.integers(0, 100, (32, 32, 3))
            img[..., c % 3] += 120 if classes else rng.integers(0, 150)
            Image.fromarray(img.clip(0, 255).astype("uint8")).save(d / f"{i:03d}.png")


def _train_briefly(model, folder: Path, steps: int = 12) -> None:
    """Give the random original a real function of its input (a random ResNet's logits are almost constant)."""
    from pixify.data import create_loader, prepare_data, resolve_data_config

    loader = create_loader(prepare_data(folder, check_images=False), resolve_data_config(model, (3, 32, 32)), 16,
                           training=True, workers=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    done = 0
    while done < steps:
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    model.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A labelled tree (3 classes × 16), a held-out tree, an unlabelled folder and a converted checkpoint."""
    root = tmp_path_factory.mktemp("ft")
    _write_images(root / "train", 16, 3, seed=0)
    _write_images(root / "val", 4, 3, seed=1)
    _write_images(root / "unlabelled", 40, None, seed=2)
    model, _ = pixify.create_model("resnet50", pretrained=False, kwargs=KWARGS, seed=0)
    _train_briefly(model, root / "train")
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(root / "original.safetensors"))
    model, source = pixify.create_model("resnet50", weights=root / "original.safetensors", kwargs=KWARGS)
    converted, report = pixify.convert(model, example_input=torch.randn(1, 3, 32, 32), source=source)
    assert report.count("pure") >= 3
    ckpt = root / "tiny_pix.safetensors"
    pixify.save(converted, ckpt)
    return root, ckpt


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on 2 shared cores a second thread mostly waits on the first (and runs 3-5× slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _kd_on(model, teacher, folder: Path) -> float:
    """Mean distillation loss of ``model`` against ``teacher`` over every image of ``folder``."""
    from pixify.data import create_loader, prepare_data, resolve_data_config
    from pixify.training import distillation_loss

    src = prepare_data(folder, check_images=False)
    loader = create_loader(src, resolve_data_config(model), 64, training=False, workers=0)
    model.eval()
    total = n = 0.0
    with torch.no_grad():
        for x, _ in loader:
            total += float(distillation_loss(model(x), teacher(x), 4.0)) * len(x)
            n += len(x)
    return total / n


def _same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


# ------------------------------------------------------------------------------------------- training

def test_learning_rate_default_follows_the_optimizer():
    """AdamW at 1e-3, KD weight 0.25, batch 64 by default (docs/finetune-evidence.md); SGD keeps its own 0.05; an explicit lr is kept,
    and a resumed run's saved value is used as saved."""
    from pixify.training.config import DEFAULT_LR, FinetuneConfig, resolve_config

    cfg, _ = resolve_config(None, {})
    assert (cfg.optimizer, cfg.lr, cfg.kd_weight, cfg.batch_size) == ("adamw", DEFAULT_LR["adamw"], 0.25, 64)
    assert resolve_config(None, {"optimizer": "sgd"})[0].lr == DEFAULT_LR["sgd"] == 0.05
    assert resolve_config(None, {"optimizer": "sgd", "lr": 0.01})[0].lr == 0.01
    assert FinetuneConfig.from_json(cfg.to_json()).validate().lr == cfg.lr
    with pytest.raises(PixifyError, match="unknown optimizer"):
        resolve_config(None, {"optimizer": "lion"})


def test_labelled_run_lowers_distillation_loss(world, tmp_path):
    root, ckpt = world
    from pixify.training import load_teacher

    teacher = load_teacher(pixify.read_recipe(ckpt), near=[ckpt.parent])
    before = _kd_on(pixify.load(ckpt), teacher, root / "train")
    res = run_finetune(str(ckpt), root / "train", val_data=root / "val", out=tmp_path / "run", epochs=3,
                          batch_size=8, optimizer="sgd", lr=0.05, workers=0, calib_images=16, log_every=1, progress=False)
    after = _kd_on(pixify.load(res.checkpoint), teacher, root / "train")
    assert after < 0.7 * before, (before, after)
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"checkpoint.safetensors", "state.safetensors",
                                                              "log.jsonl", "curves.png"}
    recs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    events = [r["event"] for r in recs]
    assert events[0] == "start" and events[1] == "init" and events.count("epoch") == 3
    init = recs[1]
    assert init["kept"] in init["candidates"] and len(init["sites"]) >= 3
    assert {s["fit"] for s in init["sites"]} <= {"layer", "consumer", "affine", "none"}
    assert init["calib_agreement"] >= init["calib_agreement_converted"]  # never worse
    assert all(r["ce"] is not None for r in recs if r["event"] == "train")  # labels → CE is in the loss
    assert [h["epoch"] for h in res.history] == [1, 2, 3] and "val_agreement" in res.history[-1]
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recipe = pixify.read_recipe(res.checkpoint)
    assert recipe["finetune"]["epoch"] == 3 and recipe["sites"] == pixify.read_recipe(ckpt)["sites"]


def test_unlabelled_folder_distils_alone(world, tmp_path):
    root, ckpt = world
    from pixify.training import load_teacher

    teacher = load_teacher(pixify.read_recipe(ckpt), near=[ckpt.parent])
    before = _kd_on(pixify.load(ckpt), teacher, root / "unlabelled")
    res = run_finetune(pixify.load(ckpt), root / "unlabelled", out=tmp_path / "run", epochs=3, batch_size=8,
                          optimizer="sgd", lr=0.05, workers=0, calib_images=16, progress=False)
    assert _kd_on(res.model, teacher, root / "unlabelled") < 0.7 * before
    assert all(h["ce"] is None for h in res.history)
    start = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert start["labelled"] is False


def test_in_memory_model_and_teacher(tmp_path, world):
    """The Python API takes a converted module and the original module (e.g. a user's own model)."""
    root, _ = world
    model, _ = pixify.create_model("resnet50", pretrained=False, kwargs=KWARGS, seed=3)
    converted, _ = pixify.convert(model, example_input=torch.randn(1, 3, 32, 32))  # recipe source: custom
    res = run_finetune(converted, root / "train", teacher=model, out=tmp_path / "run", steps=2, batch_size=8,
                          workers=0, calib_images=8, progress=False)
    assert res.model is converted and res.steps == 2
    rebuilt = pixify.load(res.checkpoint, model=type(model)(**_resnet_args()))
    assert torch.equal(rebuilt.state_dict()["fc.weight"], converted.state_dict()["fc.weight"])


def _resnet_args():
    from timm.models.resnet import Bottleneck

    return dict(block=Bottleneck, **KWARGS)


def test_refit_reduces_layer_error(world):
    root, ckpt = world
    from pixify.training import load_teacher, refit_from_teacher

    student, teacher = pixify.load(ckpt), load_teacher(pixify.read_recipe(ckpt), near=[ckpt.parent])
    batches = [torch.randn(16, 3, 32, 32).abs() for _ in range(2)]
    recs = [r for r in refit_from_teacher(student, teacher, batches) if r["refit"]]
    assert len(recs) >= 3
    assert all(r["rel_error_after"] < r["rel_error_before"] for r in recs)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(world, tmp_path, monkeypatch):
    root, ckpt = world
    calls = {"n": 0}
    real = ft.distillation_loss

    def poisoned(s, t, temperature):
        calls["n"] += 1
        loss = real(s, t, temperature)
        return loss * float("nan") if calls["n"] > 6 else loss  # 6 steps per epoch: NaN in epoch 2

    monkeypatch.setattr(ft, "distillation_loss", poisoned)
    with pytest.raises(PixifyError, match="non-finite") as err:
        run_finetune(str(ckpt), root / "train", out=tmp_path / "run", epochs=3, batch_size=8, workers=0,
                    calib_images=8, progress=False)
    assert "checkpoint.safetensors" in str(err.value) and "\n" not in str(err.value)
    assert pixify.read_recipe(tmp_path / "run" / "checkpoint.safetensors")["finetune"]["epoch"] == 1
    pixify.load(tmp_path / "run" / "checkpoint.safetensors")


# ------------------------------------------------------------------------------------- resume, torchrun

def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pixify.cli", *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_resume_after_kill_matches_uninterrupted_run(world, tmp_path):
    root, ckpt = world
    common = ["finetune", str(ckpt), "--data", str(root / "train"), "--epochs", "2", "--seed", "7",
              "--log-every", "1", *FAST]
    full = _cli(*common, "--out", str(tmp_path / "full"))
    part = _cli(*common, "--out", str(tmp_path / "part"))
    log = tmp_path / "part" / "log.jsonl"
    deadline = time.time() + 240
    killed = False
    while time.time() < deadline and part.poll() is None:
        if log.exists() and any(json.loads(line).get("event") == "train" and json.loads(line)["epoch"] == 2
                                for line in log.read_text().splitlines() if line.strip()):
            part.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    part.wait()
    assert killed, f"the run ended before it could be killed in epoch 2: {part.stderr.read()}"
    assert pixify.read_recipe(tmp_path / "part" / "checkpoint.safetensors")["finetune"]["epoch"] == 1
    resumed = _cli(*common, "--out", str(tmp_path / "part"), "--resume")
    assert resumed.wait(timeout=240) == 0, resumed.stderr.read()
    assert full.wait(timeout=240) == 0, full.stderr.read()
    _same_weights(tmp_path / "full" / "checkpoint.safetensors", tmp_path / "part" / "checkpoint.safetensors")
    _same_weights(tmp_path / "full" / "state.safetensors", tmp_path / "part" / "state.safetensors")
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert "resume" in events and events.count("epoch") == 2


def test_torchrun_two_processes_gloo(world, tmp_path):
    root, ckpt = world
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pixify.cli",
         "finetune", str(ckpt), "--data", str(root / "train"), "--epochs", "1", "--out", str(out), "--json", *FAST],
        env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.safetensors", "curves.png", "log.jsonl",
                                                     "state.safetensors"]
    start = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2
    result = json.loads(proc.stdout)
    assert result["steps"] == 3  # 48 images / (2 processes × 8)
    pixify.load(out / "checkpoint.safetensors")


# ------------------------------------------------------------------------------------------ evaluation

def test_eval_reports_accuracy_and_agreement(world, tmp_path, capsys):
    root, ckpt = world
    from safetensors.torch import save_file

    for extra in ([], ["--teacher", str(root / "original.safetensors")]):
        assert cli_main(["eval", str(ckpt), "--data", str(root / "val"), "--workers", "0", "--json", *extra]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["images"] == 12 and 0 <= res["top1"] <= res["top5"] <= 100
        assert 0 <= res["agreement"] <= 100 and "teacher_top1" in res
    assert cli_main(["eval", str(ckpt), "--data", str(root / "unlabelled"), "--workers", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert "top1" not in res and "agreement" in res


# ------------------------------------------------------------------------------------------ bad inputs

def _bad_inputs(root: Path, ckpt: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    from safetensors.torch import save_file

    (tmp / "empty").mkdir()
    corrupt = tmp / "corrupt"
    _write_images(corrupt, 2, 2, seed=3)
    (corrupt / "class1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    save_file({"w": torch.zeros(2)}, str(tmp / "plain.safetensors"))
    (tmp / "junk.safetensors").write_bytes(os.urandom(64))
    data = ["--data", str(root / "train")]
    return {
        "missing data": (["finetune", str(ckpt), "--data", str(tmp / "nope")], "not found"),
        "empty data": (["finetune", str(ckpt), "--data", str(tmp / "empty")], "holds no images"),
        "corrupt image": (["finetune", str(ckpt), "--data", str(corrupt)], "broken.png"),
        "plain safetensors": (["finetune", str(tmp / "plain.safetensors"), *data], "not a pixify checkpoint"),
        "junk file": (["finetune", str(tmp / "junk.safetensors"), *data], "not a readable safetensors"),
        "epochs 0": (["finetune", str(ckpt), *data, "--epochs", "0"], "--epochs"),
        "eval plain": (["eval", str(tmp / "plain.safetensors"), *data], "not a pixify checkpoint"),
        "eval empty": (["eval", str(ckpt), "--data", str(tmp / "empty")], "holds no images"),
    }


def test_bad_inputs_one_line_exit_2_nothing_written(world, tmp_path, capsys, monkeypatch):
    root, ckpt = world
    cases = _bad_inputs(root, ckpt, tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for name, (args, needle) in cases.items():
        out = tmp_path / "out"
        extra = ["--out", str(out), "--workers", "0"] if args[0] == "finetune" else ["--workers", "0"]
        assert cli_main(args + extra) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and needle in err, (name, err)
        assert not out.exists(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_bad_input_through_the_console_entry(world, tmp_path, capsys, monkeypatch):
    """`pixify` (the console script, pixify.cli:entry) exits with status 2 and one line, no traceback."""
    root, ckpt = world
    from pixify.cli import entry

    monkeypatch.setattr(sys, "argv", ["pixify", "finetune", str(ckpt), "--data", str(tmp_path / "nope"),
                                      "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exc:
        entry()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_existing_run_is_not_overwritten(world, tmp_path):
    root, ckpt = world
    run_finetune(str(ckpt), root / "train", out=tmp_path / "run", steps=1, batch_size=8, workers=0,
                    calib_images=0, progress=False)
    with pytest.raises(PixifyError, match="--resume"):
        run_finetune(str(ckpt), root / "train", out=tmp_path / "run", steps=1, batch_size=8, workers=0,
                        progress=False)
    with pytest.raises(PixifyError, match="nothing to resume"):
        run_finetune(str(ckpt), root / "train", out=tmp_path / "other", resume=True, workers=0, progress=False)


def test_every_command_prints_one_json_document(world, tmp_path, capsys):
    """``--json`` is exactly one JSON document on stdout, on every command and code path (resume included);
    messages go to stderr."""
    root, ckpt = world
    common = ["--data", str(root / "train"), "--out", str(tmp_path / "run"), "--steps", "2", *FAST]
    runs = [
        ["convert", "resnet50", *[f"--model-arg={k}={json.dumps(v)}" for k, v in KWARGS.items()], "--no-pretrained",
         "--input-size", "3,32,32", "-o", str(tmp_path / "c.safetensors"), "--json"],
        ["inspect", "resnet50", "--zeta", "2", "--json"],
        ["inspect", str(ckpt), "--json"],
        ["rules", "--json"],
        ["finetune", str(ckpt), *common, "--json"],
        ["finetune", str(ckpt), *common, "--resume", "--json"],  # already complete
        ["finetune", str(ckpt), *common, "--resume", "--lr", "0.3", "--json"],  # settings ignored: a message
        ["eval", str(ckpt), "--data", str(root / "val"), "--workers", "0", "--no-check-images", "--json"],
    ]
    for args in runs:
        capsys.readouterr()
        assert cli_main(args) == 0, args
        out, err = capsys.readouterr()
        doc = json.loads(out)  # raises on a second document or any stray line
        assert isinstance(doc, (dict, list)), args
        if "--resume" in args and "--lr" in args:
            assert "ignoring lr" in err
