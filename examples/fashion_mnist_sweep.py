"""The experiments behind ``pixify finetune``'s defaults (README, "Fine-tuning").

One run = convert the trained Fashion-MNIST original (written by ``fashion_mnist_recovery.py`` to
WORK/original.safetensors) → optional least-squares refit → batch-norm re-estimation on the first 2,048
training images → one epoch (468 steps of 128) of distillation on in-memory tensors → top-1 on the test set.
Each run appends one JSON line to WORK/sweep.jsonl.

    python examples/fashion_mnist_sweep.py NAME [zeta=auto] [init=lsq|zero] [lr=0.05] [T=4] [alpha=0.5]
        [opt=sgd|adamw] [wd=5e-5] [feat=0] [ridge=1e-3] [calib=2048] [frac=1.0] [seed=0] [--work DIR]

``feat=W`` adds W × MSE between the outputs of the blocks that hold PiX sites (feature distillation);
``frac=0`` measures the initialisation alone.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist_recovery import build_original, load_split, to_tensor  # noqa: E402

import pixify  # noqa: E402
from pixify.training import distillation_loss, refit_from_teacher  # noqa: E402


@torch.no_grad()
def top1(model, x, y, ref=None, batch=1000):
    model.eval()
    out = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    r = {"top1": 100 * (out.argmax(1) == y).float().mean().item()}
    if ref is not None:
        r["agree"] = 100 * (out.argmax(1) == ref.argmax(1)).float().mean().item()
    return r, out


def main() -> None:
    argv = sys.argv[1:]
    work = Path("fashion-mnist-recovery")
    if "--work" in argv:
        i = argv.index("--work")
        work = Path(argv[i + 1])
        del argv[i:i + 2]
    name, args = argv[0], dict(a.split("=", 1) for a in argv[1:])
    zeta = args.get("zeta", "auto")
    zeta = zeta if zeta == "auto" else int(zeta)
    lr, T, alpha = float(args.get("lr", 0.05)), float(args.get("T", 4)), float(args.get("alpha", 0.5))
    init, frac, feat = args.get("init", "lsq"), float(args.get("frac", 1.0)), float(args.get("feat", 0))
    wd, bs, seed = float(args.get("wd", 5e-5)), 128, int(args.get("seed", 0))
    torch.manual_seed(seed)
    from safetensors.torch import load_file

    (xtr, ytr), (xte, yte) = load_split("train"), load_split("test")
    xtr, xte = to_tensor(xtr), to_tensor(xte)
    ytr, yte = torch.from_numpy(ytr.astype("int64")), torch.from_numpy(yte.astype("int64"))
    teacher = build_original()
    teacher.load_state_dict(load_file(str(work / "original.safetensors")))
    teacher.eval()
    res: dict = {"name": name, **args}
    r, tlog = top1(teacher, xte, yte)
    res["orig"] = r["top1"]
    calib = [xtr[i:i + 256] for i in range(0, int(args.get("calib", 2048)), 256)]
    student, rep = pixify.convert(teacher, zeta=zeta, example_input=xtr[:2])
    res["macs_ratio"] = rep.macs_ratio
    res["conv"] = top1(student, xte, yte, tlog)[0]
    if init == "lsq":
        refit_from_teacher(student, teacher, calib, ridge=float(args.get("ridge", 1e-3)))
        res["init"] = top1(student, xte, yte, tlog)[0]
    pixify.recalibrate_batchnorm(student, calib)
    res["bn"] = top1(student, xte, yte, tlog)[0]
    steps = int(frac * (len(xtr) // bs))
    params = [p for p in student.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
           if args.get("opt", "sgd") == "sgd" else torch.optim.AdamW(params, lr=lr, weight_decay=wd))
    warm = int(0.1 * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    hs, ht = {}, {}
    if feat:
        for pn in sorted({s.name.rsplit(".", 1)[0] for s in rep.sites if s.action != "skip"}):
            student.get_submodule(pn).register_forward_hook(lambda m, i, o, pn=pn: hs.__setitem__(pn, o))
            teacher.get_submodule(pn).register_forward_hook(lambda m, i, o, pn=pn: ht.__setitem__(pn, o))
    perm = torch.randperm(len(xtr))
    student.train()
    t0 = time.time()
    for s in range(steps):
        idx = perm[s * bs:(s + 1) * bs]
        xb, yb = xtr[idx], ytr[idx]
        with torch.no_grad():
            tl = teacher(xb)
        sl = student(xb)
        loss = alpha * distillation_loss(sl, tl, T) + (1 - alpha) * F.cross_entropy(sl, yb)
        if feat:
            loss = loss + feat * sum(F.mse_loss(hs[k], ht[k]) for k in hs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    res["train_s"] = round(time.time() - t0, 1)
    res["final"] = top1(student, xte, yte, tlog)[0]
    print(json.dumps(res), flush=True)
    with open(work / "sweep.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
