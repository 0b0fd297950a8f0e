"""Recovery fine-tuning on real data: Fashion-MNIST.

1. Writes Debian's Fashion-MNIST (``apt-get install dataset-fashion-mnist``; IDX files under
   /usr/share/datasets/fashion-mnist) as ImageFolder trees of PNGs: WORK/train (60,000) and WORK/test (10,000).
2. Trains the "pretrained" model for 5 epochs: timm's ``ResNet(Bottleneck, [1, 1, 1, 1])`` with stem and base
   width 16, 1 input channel, 10 classes — the registered ``resnet50`` with model kwargs, so that the pixify
   checkpoint can rebuild it (and the fine-tune its teacher) from the recipe.
3. ``pixify convert`` (4 squeeze sites → pure PiX at ζ 4, 8, 8, 8 with ``--zeta auto``).
4. ``pixify finetune`` for 1 epoch (20 % of the original's training) with the default settings (the test
   set as ``--val-data`` only to draw the curves; nothing is selected on it):
   least-squares refit of the layers fed by PiX and batch-norm re-estimation on 2,048 training images, then
   distillation (T = 4, 0.5 KD + 0.5 CE) on a cosine schedule with warm-up.
5. ``pixify eval`` on the 10,000 test images, and a table next to the original's accuracy.

Run:  python examples/fashion_mnist_recovery.py [--work DIR] [--zeta auto] [--threads N]
(about 15 minutes on 2 idle CPU cores; the trained original is cached in WORK and reused with --reuse).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set statistics
MODEL = "resnet50"
MODEL_KWARGS = {
    "layers": [1, 1, 1, 1], "stem_width": 16, "base_width": 16, "in_chans": 1, "num_classes": 10,
    # the preprocessing pixify finetune/eval read from the model's pretrained_cfg
    "pretrained_cfg_overlay": {"input_size": [1, 28, 28], "mean": [MEAN], "std": [STD], "crop_pct": 1.0,
                               "interpolation": "bilinear"},
}


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images = IDX_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if not images.exists():
        sys.exit(f"error: {images} not found (apt-get install dataset-fashion-mnist)")
    return read_idx(images), read_idx(IDX_DIR / f"{prefix}-labels-idx1-ubyte.gz")


def write_image_folder(images: np.ndarray, labels: np.ndarray, root: Path) -> None:
    """ROOT/<nn-class>/<index>.png; skipped when a complete tree is already there."""
    from PIL import Image

    done = root / ".complete"
    if done.exists():
        return
    for c, name in enumerate(CLASSES):
        (root / f"{c}-{name}").mkdir(parents=True, exist_ok=True)
    for i, (img, y) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(root / f"{int(y)}-{CLASSES[int(y)]}" / f"{i:05d}.png", compress_level=1)
    done.write_text(str(len(images)))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """Exactly timm's evaluation transform for these 28×28 PNGs: ToTensor, then Normalize(MEAN, STD)."""
    return ((torch.from_numpy(images.copy()).float() / 255 - MEAN) / STD).unsqueeze(1)


def build_original() -> torch.nn.Module:
    import timm

    return timm.create_model(MODEL, pretrained=False, **MODEL_KWARGS)


def train_original(model, x, y, epochs: int, batch: int = 128, lr: float = 0.1, seed: int = 0) -> None:
    """Plain supervised training: SGD + Nesterov, one-cycle, weight decay 5e-4, random horizontal flips."""
    g = torch.Generator().manual_seed(seed)
    steps = epochs * (len(x) // batch)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        t0 = time.perf_counter()
        for i in range(len(x) // batch):
            idx = perm[i * batch:(i + 1) * batch]
            xb = x[idx]
            flip = torch.rand(len(xb), generator=g) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"  original, epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    model.eval()


@torch.no_grad()
def accuracy(model, x, y, reference: torch.Tensor | None = None, batch: int = 1000) -> tuple[float, float | None, torch.Tensor]:
    model.eval()
    out = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    top1 = 100.0 * (out.argmax(1) == y).float().mean().item()
    agree = None if reference is None else 100.0 * (out.argmax(1) == reference.argmax(1)).float().mean().item()
    return top1, agree, out


def pixify_cli(*args: str, env: dict[str, str], show: bool = True) -> str:
    """Run the pixify command line (as the `pixify` console script would) and return its stdout."""
    import shlex

    print("$ pixify " + shlex.join(args), flush=True)
    proc = subprocess.run([sys.executable, "-m", "pixify.cli", *args], env=env, stdout=subprocess.PIPE, text=True)
    if show and "--json" not in args:
        print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        sys.exit(f"pixify {args[0]} failed with exit code {proc.returncode}")
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("fashion-mnist-recovery"), help="working folder")
    ap.add_argument("--zeta", default="auto", help="pixify convert --zeta")
    ap.add_argument("--original-epochs", type=int, default=5)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--reuse", action="store_true", help="reuse a trained original and converted model in --work")
    ap.add_argument("--finetune-args", default="", help="extra options for pixify finetune (for experiments)")
    args = ap.parse_args()
    if args.finetune_epochs > 0.2 * args.original_epochs:
        print("note: the fine-tune budget exceeds 20% of the original training", flush=True)
    env = dict(os.environ)
    if args.threads:
        torch.set_num_threads(args.threads)
        env["OMP_NUM_THREADS"] = str(args.threads)
    import pixify

    t_all = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    (xtr_u8, ytr_np), (xte_u8, yte_np) = load_split("train"), load_split("test")
    write_image_folder(xtr_u8, ytr_np, work / "train")
    write_image_folder(xte_u8, yte_np, work / "test")
    xtr, ytr, xte, yte = to_tensor(xtr_u8), torch.from_numpy(ytr_np.astype(np.int64)), to_tensor(xte_u8), \
        torch.from_numpy(yte_np.astype(np.int64))
    timings["data"] = time.perf_counter() - t
    print(f"data: {len(xtr)} training and {len(xte)} test images as PNG folders in {work} "
          f"({timings['data']:.0f} s)", flush=True)

    weights = work / "original.safetensors"
    original = build_original()
    t = time.perf_counter()
    if args.reuse and weights.exists():
        from safetensors.torch import load_file

        original.load_state_dict(load_file(str(weights)))
        print(f"original: reusing {weights}", flush=True)
    else:
        from safetensors.torch import save_file

        torch.manual_seed(0)
        original = build_original()
        print(f"original: training {args.original_epochs} epochs", flush=True)
        train_original(original, xtr, ytr, args.original_epochs)
        save_file(original.state_dict(), str(weights))
    timings["original"] = time.perf_counter() - t
    orig_top1, _, orig_logits = accuracy(original, xte, yte)
    print(f"original: top-1 {orig_top1:.2f}% ({timings['original']:.0f} s)", flush=True)

    # ---- convert (the CLI, as a user would)
    ckpt = work / f"fmnist_pix_z{args.zeta}.safetensors"
    model_args = [a for k, v in MODEL_KWARGS.items()
                  for a in ("--model-arg", f"{k}={json.dumps(v, separators=(',', ':'))}")]
    t = time.perf_counter()
    if not (args.reuse and ckpt.exists()):
        report = json.loads(pixify_cli("convert", MODEL, "--weights", str(weights), *model_args, "--input-size",
                                       "1,28,28", "--zeta", args.zeta, "-o", str(ckpt), "--json", env=env))
        (work / f"convert_z{args.zeta}.json").write_text(json.dumps(report, indent=2))
    report = json.loads((work / f"convert_z{args.zeta}.json").read_text())
    timings["convert"] = time.perf_counter() - t
    converted = pixify.load(ckpt)
    conv_top1, conv_agree, _ = accuracy(converted, xte, yte, orig_logits)
    sites = ", ".join(f"{s['name']} {s['c_in']}→{s['c_out']} {s['action']} ζ{s['zeta']}"
                      for s in report["sites"] if s["action"] != "skip")
    print(f"converted: {sites}; MACs ×{report['macs_ratio']:.3f}, params ×{report['params_ratio']:.3f}", flush=True)

    # ---- what the fine-tune's initialisation does, measured step by step on the test set
    from pixify.training import refit_from_teacher

    g = torch.Generator().manual_seed(0)
    calib = [xtr[i] for i in torch.randperm(len(xtr), generator=g)[:2048].split(128)]
    bn_only = pixify.load(ckpt)
    pixify.recalibrate_batchnorm(bn_only, calib)
    bn_top1, bn_agree, _ = accuracy(bn_only, xte, yte, orig_logits)
    refit = pixify.load(ckpt)
    refit_from_teacher(refit, original, calib)
    pixify.recalibrate_batchnorm(refit, calib)
    init_top1, init_agree, _ = accuracy(refit, xte, yte, orig_logits)

    # ---- fine-tune and evaluate (the CLI)
    out = work / f"finetune_z{args.zeta}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    t = time.perf_counter()
    pixify_cli("finetune", str(ckpt), "--data", str(work / "train"), "--val-data", str(work / "test"),
               "--epochs", str(args.finetune_epochs), "--out", str(out), *args.finetune_args.split(), env=env)
    timings["finetune"] = time.perf_counter() - t
    ev = json.loads(pixify_cli("eval", str(out / "checkpoint.safetensors"), "--data", str(work / "test"), "--json",
                               env=env))
    total = time.perf_counter() - t_all

    from rich.console import Console
    from rich.table import Table

    tab = Table(title=f"Fashion-MNIST test set (10,000 images), pixify convert --zeta {args.zeta}",
                title_justify="left")
    for col in ("model", "training", "top-1 %", "Δ vs original", "agreement with original %"):
        tab.add_column(col, justify="left" if col in ("model", "training") else "right")
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    rows = [
        ("original (timm ResNet(Bottleneck,[1,1,1,1]))", f"{args.original_epochs} epochs", orig_top1, None),
        ("converted (φ = 0)", "-", conv_top1, conv_agree),
        ("+ batch-norm re-estimation", "2,048 images", bn_top1, bn_agree),
        ("+ least-squares refit, then BN re-estimation", "2,048 images", init_top1, init_agree),
        ("+ pixify finetune (defaults)", f"{args.finetune_epochs} epoch", ev["top1"], ev["agreement"]),
    ]
    for name, budget, top1, agree in rows:
        tab.add_row(name, budget, f(top1), "-" if top1 is orig_top1 else f"{top1 - orig_top1:+.2f}", f(agree))
    con = Console(width=120)
    con.print(tab)
    print(f"MACs ×{report['macs_ratio']:.3f} of the original; fine-tune budget {args.finetune_epochs}/"
          f"{args.original_epochs} = {100 * args.finetune_epochs / args.original_epochs:.0f}% of the original's "
          f"epochs; original top-1 through pixify eval's pipeline: {ev.get('teacher_top1', float('nan')):.2f}%")
    import resource

    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    print(f"wall time: total {total / 60:.1f} min (data {timings['data']:.0f} s, original {timings['original']:.0f} s, "
          f"convert {timings['convert']:.0f} s, fine-tune {timings['finetune']:.0f} s); CPU time {cpu / 60:.1f} min; "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    gap = orig_top1 - ev["top1"]
    summary = {"original_top1": orig_top1, "converted_top1": conv_top1, "bn_top1": bn_top1, "init_top1": init_top1,
               "finetuned_top1": ev["top1"], "finetuned_agreement": ev["agreement"], "gap": gap,
               "macs_ratio": report["macs_ratio"], "minutes": total / 60, "cpu_minutes": cpu / 60, "timings": timings}
    (work / f"summary_z{args.zeta}.json").write_text(json.dumps(summary, indent=2))
    print(("PASS" if gap <= 1.0 else "FAIL") + f": fine-tuned model is {gap:.2f} points below the original")


if __name__ == "__main__":
    main()
