"""Print pixify's model-zoo coverage table.

Every torchvision classification model and one small model per timm module, converted in squeeze and in
prune mode; each conversion is checked end to end (forward + backward with the right output shape, then a
``pixify.save``/``pixify.load`` round trip with identical outputs). Columns: model, sites found, MACs
ratio and status per mode; then the counts, and every outcome other than "converted" / "no candidate site"
with its reason.

    python examples/coverage.py                      # everything (about 15-20 minutes on 2 CPU cores)
    python examples/coverage.py --only timm          # or torchvision
    python examples/coverage.py resnet50 torchvision:vgg16 --modes prune
    python examples/coverage.py --json coverage.json # also write the raw results
    python examples/coverage.py --from-json coverage.json   # print a saved run again
    python examples/coverage.py --smallest           # recompute the smallest model of every timm module

Random weights (no downloads); see ``tests/zoo.py`` for the input sizes, kwargs and exclusions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import zoo  # noqa: E402 - the sweep's model lists live with the tests


def _fmt_ratio(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _rows_from_results(results: list[zoo.ZooResult]) -> list[dict]:
    return [{"model": r.entry.label, "module": r.entry.module, "mode": r.mode, "status": r.status,
             "sites": r.sites, "skipped": r.skipped, "macs_ratio": r.macs_ratio, "untraced": r.untraced,
             "seconds": round(r.seconds, 1), "reason": r.reason} for r in results]


def print_table(rows: list[dict], modes: tuple[str, ...], console: Console) -> None:
    by_model: dict[tuple[str, str], dict[str, dict]] = {}
    for row in rows:
        by_model.setdefault((row["module"], row["model"]), {})[row["mode"]] = row
    t = Table(title="pixify coverage (random weights, small inputs)", title_justify="left")
    t.add_column("library/module", no_wrap=True)
    t.add_column("model", no_wrap=True)
    for mode in modes:
        t.add_column(f"{mode}: sites", justify="right")
        t.add_column("MACs", justify="right")
        t.add_column("status")
    t.add_column("not analysed", justify="right")
    t.add_column("s", justify="right")
    for (module, model), per_mode in by_model.items():
        cells = []
        seconds = 0.0
        untraced = max((r["untraced"] for r in per_mode.values()), default=0)
        for mode in modes:
            r = per_mode.get(mode)
            if r is None:
                cells += ["", "", ""]
                continue
            seconds += r["seconds"]
            sites = str(r["sites"]) + (f" (+{r['skipped']} skipped)" if r["skipped"] else "")
            cells += [sites, _fmt_ratio(r["macs_ratio"]), r["status"]]
        t.add_row(module, model, *cells, str(untraced or ""), f"{seconds:.0f}")
    console.print(t)


def print_counts(rows: list[dict], modes: tuple[str, ...], console: Console) -> bool:
    ok_all = True
    for lib in ("torchvision", "timm"):
        lib_rows = [r for r in rows if (r["module"] == "torchvision") == (lib == "torchvision")]
        if not lib_rows:
            continue
        models = sorted({r["model"] for r in lib_rows})
        good = [m for m in models
                if all(r["status"] in zoo.OK_STATUSES for r in lib_rows if r["model"] == m)]
        what = "classification models" if lib == "torchvision" else "modules (one model each)"
        console.print(f"[bold]{lib}[/bold]: {len(good)}/{len(models)} {what} converted or with no candidate "
                      f"site in every mode ({len(good) / len(models):.1%})")
        for mode in modes:
            mrows = [r for r in lib_rows if r["mode"] == mode]
            counts: dict[str, int] = {}
            for r in mrows:
                counts[r["status"]] = counts.get(r["status"], 0) + 1
            ratios = [r["macs_ratio"] for r in mrows if r["status"] == zoo.CONVERTED]
            mean = sum(ratios) / len(ratios) if ratios else float("nan")
            console.print(f"  {mode:8s} " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
                          + f"; mean MACs ratio where converted: {_fmt_ratio(mean)}")
        other = [r for r in lib_rows if r["status"] not in zoo.OK_STATUSES]
        for r in other:
            console.print(f"  - {r['model']} [{r['mode']}] {r['status']}: {r['reason']}")
        ok_all &= len(good) == len(models)
    return ok_all


def smallest_per_module(console: Console) -> None:
    """Count every timm model's parameters on the meta device and print the smallest of each module."""
    import timm
    import torch
    from timm.models._registry import _model_to_module  # noqa: PLC2701 - the registry's own map

    best: dict[str, tuple[int, str]] = {}
    for name in timm.list_models():
        module = _model_to_module.get(name, "?")
        try:
            with torch.device("meta"):
                m = timm.create_model(name, pretrained=False)
        except Exception:
            continue
        n = sum(p.numel() for p in m.parameters())
        if module not in best or n < best[module][0]:
            best[module] = (n, name)
    for module in timm.list_modules():
        n, name = best.get(module, (0, "-"))
        console.print(f"{module:28s} {name:45s} {n / 1e6:8.2f} M")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="zoo specs, timm names or torchvision:NAME (default: the whole zoo)")
    ap.add_argument("--only", choices=("torchvision", "timm"), help="one library only")
    ap.add_argument("--modes", nargs="+", default=list(zoo.MODES), choices=zoo.MODES)
    ap.add_argument("--timeout", type=float, default=zoo.DEFAULT_TIMEOUT_S, help="seconds per model")
    ap.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    ap.add_argument("--from-json", help="print the table of a saved run instead of running")
    ap.add_argument("--smallest", action="store_true", help="list the smallest model of every timm module")
    ap.add_argument("--quiet", action="store_true", help="no per-model progress lines")
    args = ap.parse_args(argv)
    console = Console(width=max(190, Console().width))
    modes = tuple(args.modes)
    if args.smallest:
        smallest_per_module(console)
        return 0
    if args.from_json:
        with open(args.from_json) as f:
            rows = json.load(f)["results"]
        modes = tuple(m for m in zoo.MODES if any(r["mode"] == m for r in rows))
    else:
        entries = zoo.all_entries() if not args.only else (
            zoo.torchvision_entries() if args.only == "torchvision" else zoo.timm_entries())
        if args.models:
            known = {e.spec: e for e in zoo.all_entries()}
            entries = [known.get(m) or zoo.ZooEntry(m, "torchvision" if m.startswith("torchvision:") else "custom")
                       for m in args.models]
        results: list[zoo.ZooResult] = []
        t0 = time.perf_counter()
        for i, entry in enumerate(entries, 1):
            res = zoo.run_entry(entry, modes, timeout=args.timeout)
            results += res
            if not args.quiet:
                line = "; ".join(f"{r.mode} {r.status} ({r.sites} sites, MACs {_fmt_ratio(r.macs_ratio)})"
                                 + (f" {r.reason}" if r.reason else "") for r in res)
                print(f"[{i}/{len(entries)} {time.perf_counter() - t0:5.0f}s] {entry.label}: {line}",
                      file=sys.stderr, flush=True)
        rows = _rows_from_results(results)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump({"results": rows, "seconds": round(time.perf_counter() - t0, 1)}, f, indent=1)
    print_table(rows, modes, console)
    ok = print_counts(rows, modes, console)
    return 0 if ok else 1


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sys.exit(main())
