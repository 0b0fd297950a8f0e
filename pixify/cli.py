"""The ``pixify`` command line: a thin typer layer over the Python API.

Errors a user can cause print as one line on stderr and exit with code 2 (a traceback only with
``--debug``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import PixifyError
from .training.config import DEFAULT_LR

_LR_DEFAULTS = ", ".join(f"{v:g} with {k}" for k, v in DEFAULT_LR.items())

try:  # typer >= 0.20 vendors its own click
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover
    from click import exceptions as _cx

app = typer.Typer(
    name="pixify",
    help="Rewrite channel-squeezing layers of vision models into Pick-or-Mix (PiX) modules.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_STATE = {"debug": False}  # --debug; PIXIFY_DEBUG is the setting debug (pixify.config)


def _console(stderr: bool = False) -> Console:
    width = None if sys.stdout.isatty() else max(120, shutil.get_terminal_size((120, 24)).columns)
    return Console(stderr=stderr, width=width, highlight=False)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"pixify {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
          version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print the version and exit.")) -> None:
    _STATE["debug"] = _STATE["debug"] or debug


# ------------------------------------------------------------------------------------------------ helpers

def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f}"


def _parse_input_size(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        dims = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        raise PixifyError(f"--input-size must look like 3,224,224, got '{text}'") from None
    from .validate import check_input_size

    return check_input_size(dims)


def _parse_kwargs(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise PixifyError(f"--model-arg must be KEY=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _sites_table(report, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for col, kw in (("site", {}), ("pattern", {}), ("C_in→C_out", {"justify": "right"}), ("ζ", {"justify": "right"}),
                    ("action", {}), ("MACs before→after", {"justify": "right"}), ("note", {"overflow": "fold"})):
        t.add_column(col, **kw)
    for s in report.sites:
        note = s.reason
        if s.removed:
            note = (note + "; " if note else "") + "absorbed " + ", ".join(r.rsplit(".", 1)[-1] for r in s.removed)
        if s.kept:
            note = (note + "; " if note else "") + "kept " + ", ".join(s.kept)
        t.add_row(s.name, s.pattern, f"{s.c_in}→{s.c_out}", str(s.zeta or "-"), s.action,
                  f"{_human(s.macs_before)}→{_human(s.macs_after)}", note)
    return t


def _summary(report) -> list[str]:
    a = report.agreement
    lines = [
        (f"sites: {report.count('prune')} prune points, {report.count('skip')} skipped" if report.mode == "prune" else
         f"sites: {report.count('pure')} pure, {report.count('hybrid')} hybrid, {report.count('skip')} skipped")
        + f" ({len(report.near_misses)} near-misses, {len(report.untraced)} parts not analysed)",
        f"MACs:   {_human(report.macs_before)} → {_human(report.macs_after)}  (×{report.macs_ratio:.3f})"
        f"  at input {tuple(report.input_shape)}",
        f"params: {_human(report.params_before)} → {_human(report.params_after)}  (×{report.params_ratio:.3f})"
        if report.params_before else f"params: {_human(report.params_after)}",
    ]
    sel = report.selection or {}
    if sel.get("budget"):
        b = ", ".join(f"{k}={v:g}" for k, v in sel["budget"].items())
        lines.append(f"budget {b}: {len(sel.get('chosen', []))} sites chosen, checked together: agreement "
                     f"{sel.get('agreement', float('nan')):.1f}%, MACs ×{sel.get('macs_ratio') or 1:.3f}")
    if report.init:
        i = report.init
        lines.append(f"initialisation: fitted to the original on {i['fit_images']} images in {i['seconds']:.1f} s; "
                     f"held-out agreement {i['agreement_before']:.1f}% as converted → {i['agreement_after']:.1f}% "
                     f"fitted; kept: {i['kept']}")
    if a:
        lines.append(f"output agreement on {report.agreement_on}: top-1 {a['top1_agreement']:.1f}%, "
                     f"relative logit error {a['rel_logit_error']:.3f} (before any fine-tuning)")
    return lines


def _print_report(report, verbose: bool) -> None:
    con = _console()
    title = f"{report.model}: mode {report.mode}, ζ {report.zeta}" + (f", preset {report.preset}" if report.preset else "")
    con.print(_sites_table(report, title))
    if verbose and report.near_misses:
        t = Table(title="near-misses", title_justify="left")
        for col in ("layer", "rule", "reason"):
            t.add_column(col, overflow="fold")
        for n in report.near_misses:
            t.add_row(n.name, n.rule, n.reason)
        con.print(t)
    costs = (report.selection or {}).get("costs")
    if costs:
        chosen = set((report.selection or {}).get("chosen", []))
        t = Table(title=f"per-site cost, each alone, fitted, on {report.selection.get('held_out_images', '?')} "
                        "held-out images" if not chosen and "budget" not in report.selection else
                        "per-site cost, each alone, fitted, on the held-out images", title_justify="left")
        for col, kw in (("site", {}), ("action", {}), ("ζ", {"justify": "right"}), ("MACs saved", {"justify": "right"}),
                        ("agreement %", {"justify": "right"}), ("logit error", {"justify": "right"}),
                        ("fit error", {"justify": "right"})):
            t.add_column(col, **kw)
        for c in costs:
            mark = " ✓" if any(s.name == c["name"] and s.action == c["action"] and s.zeta == c["zeta"]
                               for s in report.sites) and c["name"] in chosen else ""
            t.add_row(c["name"] + mark, c["action"], str(c["zeta"]), _human(c["macs_saved"]), f"{c['agreement']:.1f}",
                      f"{c['rel_logit_error']:.3f}", "-" if c.get("fit_error") is None else f"{c['fit_error']:.3f}")
        con.print(t)
    if report.untraced:
        t = Table(title="parts not analysed", title_justify="left")
        t.add_column("module")
        t.add_column("reason", overflow="fold")
        for u in report.untraced:
            t.add_row(u.name or "(whole model)", u.reason)
        con.print(t)
    for line in _summary(report):
        con.print(line)


def _checkpoint_report(path: str):
    """A report rebuilt from a checkpoint's recipe (validates the file by loading it strictly)."""
    from .checkpoint import load
    from .conversion import ConversionReport
    from .metrics import count_params
    from .rewrite import SiteRecord

    model = load(path)
    r = model.pixify_recipe
    return ConversionReport(
        model=f"{path} ({r['source'].get('library')}:{r['source'].get('name')})", mode=r.get("mode", "?"),
        zeta=r.get("zeta"), tau=r.get("tau"), preset=r.get("preset"),
        sites=[SiteRecord.from_json(s) for s in r["sites"]], macs_before=r.get("macs_before", 0),
        macs_after=r.get("macs_after", 0), params_before=_original_params(r["source"]), params_after=count_params(model),
        input_shape=tuple(r.get("input_shape", ())),
    )


def _original_params(source: dict) -> int:
    """The original's parameter count, from its architecture built on the meta device (0 when it cannot be)."""
    from .metrics import count_params
    from .sources import meta_architecture

    try:
        meta = meta_architecture(source.get("library"), source.get("name"), source.get("kwargs") or {},
                                 source.get("pretrained_cfg"))
    except PixifyError:
        return 0
    return count_params(meta) if meta is not None else 0


_MODEL_HELP = "timm name (resnet50), torchvision:NAME, hf-hub:ORG/NAME (inspect also takes a pixify checkpoint)"
_DATA_HELP = "a folder of real images (class folders or flat; labels are not needed)"
_BUDGET_HELP = ("with --data: choose the sites within agreement=PERCENT (least top-1 agreement with the original "
                "on held-out images) or macs=RATIO (largest MACs ratio)")


class _quiet_warnings:
    """Python warnings of pixify's own stay quiet in the CLI, which prints the report's warning itself."""

    def __enter__(self):
        import warnings

        from .errors import PixifyWarning

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", PixifyWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def _finite(data: Any) -> Any:
    """JSON data with NaN and infinities as null: strict parsers refuse bare NaN."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def _json_default(obj: Any) -> Any:
    try:
        value = float(obj)  # numpy and torch scalars
    except (TypeError, ValueError):
        return str(obj)
    return value if math.isfinite(value) else None


def _print_json(data: Any, indent: int | None = 2) -> None:
    print(json.dumps(_finite(data), indent=indent, allow_nan=False, default=_json_default))


class _progress:
    """A rich progress bar on stderr, called as ``bar(done, total)``; nothing when disabled."""

    def __init__(self, enabled: bool, what: str):
        self.enabled, self.what, self.bar, self.task = enabled, what, None, None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        if not console.is_terminal:  # a bar in a log or a pipe is noise, and its last frame a stray line
            return None
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=console, transient=True)
        self.bar.start()
        return self

    def __call__(self, done: int, total: int, what: str | None = None) -> None:
        if self.task is None:
            self.task = self.bar.add_task(what or self.what, total=total)
        self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


def _preprocessing(mean, std, crop_pct, interpolation) -> dict:
    return {"mean": _floats(mean, "--mean"), "std": _floats(std, "--std"), "crop_pct": crop_pct,
            "interpolation": interpolation}


_KEY_MAP_HELP = ("with --weights: 'positional' maps the file's tensors onto the model's by order, for weights "
                 "saved by another code base with other key names (every shape is checked)")
_ZETA_HELP = "sampling factor: 'auto' (ζ = C_in/C_out per site) or an integer >= 1"


# ----------------------------------------------------------------------------------------------- commands

@app.command(epilog="Example: pixify convert resnet50 --zeta 2 --no-pretrained -o r50_pix.safetensors")
def convert(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    zeta: str = typer.Option("auto", "--zeta", "-z", help=_ZETA_HELP),
    tau: str = typer.Option("0.5", "--tau", help="pick/mix threshold in (0, 1)"),
    preset: Optional[str] = typer.Option(None, "--preset", help="'paper': the paper's ResNet configuration"),
    mode: str = typer.Option("squeeze", "--mode", help="squeeze (replace channel-squeezing layers) or prune (PiX "
                             "in front of dense layers fed by an activation; there --zeta auto means 2)"),
    rules: list[Path] = typer.Option([], "--rules", help="extra rules file (TOML); repeatable"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="checkpoint path (default: MODEL_pix.safetensors)"),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", help="start from the published weights"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="original weights (.safetensors or .pth state dict)"),
    model_arg: list[str] = typer.Option([], "--model-arg", help="constructor argument KEY=VALUE; repeatable"),
    key_map: Optional[str] = typer.Option(None, "--key-map", help=_KEY_MAP_HELP),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="C,H,W of the example input"),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help=_DATA_HELP),
    calib_images: int = typer.Option(512, "--calib-images", help="images of --data to use"),
    budget: Optional[str] = typer.Option(None, "--budget", help=_BUDGET_HELP),
    mean: Optional[str] = typer.Option(None, "--mean", help="normalisation mean [default: pretrained_cfg]; remembered"),
    std: Optional[str] = typer.Option(None, "--std", help="normalisation std [default: pretrained_cfg]; remembered"),
    crop_pct: Optional[float] = typer.Option(None, "--crop-pct", help="centre-crop fraction; remembered"),
    interpolation: Optional[str] = typer.Option(None, "--interpolation", help="bilinear | bicubic ...; remembered"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also list near-misses"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Convert MODEL and write a pixify checkpoint (with --data: fitted to the original on real images)."""
    from .conversion import convert_named

    t0 = time.perf_counter()
    out_path = Path(output) if output is not None else Path(f"{model.replace(':', '_').replace('/', '_')}_pix.safetensors")
    from .checkpoint import check_output_file, save

    check_output_file(out_path, "-o")
    with _quiet_warnings(), _progress(not as_json and data is not None, "measuring sites" if budget else
                                      "fitting") as bar:
        converted, report = convert_named(
            model, zeta, tau, preset, mode, rules, pretrained, weights, _parse_kwargs(model_arg),
            _parse_input_size(input_size), key_map, data=data, calib_images=calib_images, budget=budget,
            preprocessing=_preprocessing(mean, std, crop_pct, interpolation), progress=bar)
    save(converted, out_path)
    elapsed = time.perf_counter() - t0
    if as_json:
        data = report.to_json()
        data.update(output=str(out_path), total_seconds=round(elapsed, 3))
        _print_json(data, indent=2)
        return
    _print_report(report, verbose)
    _console().print(f"wrote {out_path} in {elapsed:.2f} s")
    if report.warning:
        _console(stderr=True).print(f"[bold red]warning:[/bold red] {report.warning}")


@app.command(epilog="Example: pixify inspect resnet50 --zeta 2 --no-pretrained")
def inspect(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    zeta: str = typer.Option("auto", "--zeta", "-z", help=_ZETA_HELP),
    tau: str = typer.Option("0.5", "--tau", help="pick/mix threshold in (0, 1)"),
    preset: Optional[str] = typer.Option(None, "--preset", help="'paper': the paper's ResNet configuration"),
    mode: str = typer.Option("squeeze", "--mode", help="squeeze (replace channel-squeezing layers) or prune (PiX "
                             "in front of dense layers fed by an activation; there --zeta auto means 2)"),
    rules: list[Path] = typer.Option([], "--rules", help="extra rules file (TOML); repeatable"),
    pretrained: bool = typer.Option(False, "--pretrained/--no-pretrained",
                                    help="inspect with the published weights (not needed for a dry run)"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="original weights (.safetensors or .pth state dict)"),
    model_arg: list[str] = typer.Option([], "--model-arg", help="constructor argument KEY=VALUE; repeatable"),
    key_map: Optional[str] = typer.Option(None, "--key-map", help=_KEY_MAP_HELP),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="C,H,W of the example input"),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help=_DATA_HELP + "; measures every site alone"),
    calib_images: int = typer.Option(512, "--calib-images", help="images of --data to use"),
    mean: Optional[str] = typer.Option(None, "--mean", help="normalisation mean [default: pretrained_cfg]"),
    std: Optional[str] = typer.Option(None, "--std", help="normalisation std [default: pretrained_cfg]"),
    crop_pct: Optional[float] = typer.Option(None, "--crop-pct", help="centre-crop fraction"),
    interpolation: Optional[str] = typer.Option(None, "--interpolation", help="bilinear | bicubic ..."),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Dry run: every site, every near-miss with its reason, MACs and params before/after.

    With --data, also every site's cost measured alone on real images: MACs saved, top-1 agreement and
    logit error against the original. Given a pixify checkpoint instead of a model name, shows the sites
    its recipe rewrote.
    """
    from .conversion import convert_named

    if Path(model).is_file() or model.endswith(".safetensors"):
        report = _checkpoint_report(model)
        if as_json:
            _print_json(report.to_json(), indent=2)
        else:
            _print_report(report, verbose=False)
        return
    with _quiet_warnings(), _progress(not as_json and data is not None, "measuring sites") as bar:
        _, report = convert_named(model, zeta, tau, preset, mode, rules, pretrained, weights,
                                  _parse_kwargs(model_arg), _parse_input_size(input_size), key_map, data=data,
                                  calib_images=calib_images, preprocessing=_preprocessing(mean, std, crop_pct,
                                                                                          interpolation),
                                  dry_run=True, progress=bar)
    if as_json:
        _print_json(report.to_json(), indent=2)
        return
    _print_report(report, verbose=True)
    if report.mode == "prune":
        saved = sum(s.macs_before - s.macs_after for s in report.sites if s.action == "prune")
        _console().print(f"prune points: {report.count('prune')}, MACs saved at them: {_human(saved)}"
                         f" ({saved / report.macs_before:.1%} of the model)" if report.macs_before else "")


@app.command(name="rules", epilog="Example: pixify rules --rules my_rules.toml")
def rules_cmd(
    rules: list[Path] = typer.Option([], "--rules", help="also validate and list this rules file; repeatable"),
    as_json: bool = typer.Option(False, "--json", help="print as JSON"),
) -> None:
    """List the rules: built-in, registered and from --rules files."""
    from .rules import all_rules, load_rules_file

    found = all_rules()
    for f in rules:
        found.extend(load_rules_file(f))
    if as_json:
        _print_json([{"name": r.name, "mode": r.mode, "preset": r.preset, "priority": r.priority,
                      "pattern": list(r.pattern), "description": r.description, "source": r.source,
                      "sha256": r.digest} for r in found], indent=2)
        return
    t = Table(title="pixify rules", title_justify="left")
    for col in ("name", "mode", "preset", "pattern", "priority", "description", "source"):
        t.add_column(col, overflow="fold", no_wrap=col in ("name", "pattern", "source", "mode"), ratio=1 if col == "description" else None)
    for r in found:
        t.add_row(r.name, r.mode, r.preset or "-", " → ".join(r.pattern), str(r.priority), r.description, r.source)
    _console().print(t)


# ------------------------------------------------------------------------------ benchmarks, fine-tuning

# torch.compile's modes (reduce-overhead: CUDA graphs, which remove the per-kernel launch cost on a GPU)
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@app.command(epilog="Example: pixify bench resnet50 --zeta auto --batch-size 1,8 --threads 2 --json")
def bench(
    model: Optional[str] = typer.Argument(None, help=_MODEL_HELP + "; omit with --op"),
    zeta: str = typer.Option("auto", "--zeta", "-z", help=_ZETA_HELP),
    batch_size: str = typer.Option("1,8", "--batch-size", "-b", help="comma-separated batch sizes"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice)"),
    compile: bool = typer.Option(False, "--compile", help="time torch.compile'd models"),
    compile_mode: Optional[str] = typer.Option(None, "--compile-mode", help="torch.compile mode, implies "
                                               "--compile: " + ", ".join(_COMPILE_MODES)),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16"),
    channels_last: bool = typer.Option(False, "--channels-last", help="channels-last inputs and weights"),
    train: bool = typer.Option(True, "--train/--no-train", help="also time a training step (fwd+bwd)"),
    rounds: int = typer.Option(15, "--rounds", help="timed rounds per measurement (median)"),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="C,H,W (default: the model's)"),
    op: bool = typer.Option(False, "--op", help="op-level: PiX vs one pass over its input vs the 1x1 conv"),
    runtime: str = typer.Option("eager", "--runtime", help="eager (PyTorch, with --compile: torch.compile), "
                                "onnxruntime or torch.export (the exported graphs, CPU; inference only)"),
    floor: bool = typer.Option(False, "--floor", help="also time the converted model with every PiX made free "
                               "(inference): the best ratio any PiX kernel could reach here"),
    malloc: str = typer.Option("tuned", "--malloc", help="tuned: glibc reuses freed memory (mmap threshold "
                               "32 MiB, no trimming), so neither model page-faults its activations back in on "
                               "every run, as with jemalloc/tcmalloc; system: the process's defaults"),
    as_json: bool = typer.Option(False, "--json", help="print the results as JSON"),
) -> None:
    """Time the converted model against the original in one process (as ratios)."""
    import torch

    from .bench import BenchReport, bench_models, bench_op, tune_malloc

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise PixifyError(f"--dtype must be one of {', '.join(dtypes)}, got '{dtype}'")
    from .validate import check_batch_size, check_device, check_threads

    check_device(device)
    if threads is not None:
        torch.set_num_threads(check_threads(threads))
    if rounds < 1:
        raise PixifyError(f"--rounds must be >= 1, got {rounds}")
    if runtime not in ("eager", "onnxruntime", "torch.export"):
        raise PixifyError(f"--runtime must be eager, onnxruntime or torch.export, got '{runtime}'")
    if runtime != "eager" and (compile or device != "cpu" or dtype != "float32" or channels_last):
        raise PixifyError(f"--runtime {runtime} times the exported fp32 graphs on the CPU",
                          "drop --compile/--compile-mode, --device, --dtype and --channels-last")
    if malloc not in ("tuned", "system"):
        raise PixifyError(f"--malloc must be tuned or system, got '{malloc}'")
    if compile_mode is not None and compile_mode not in _COMPILE_MODES:
        raise PixifyError(f"--compile-mode must be one of {', '.join(_COMPILE_MODES)}, got '{compile_mode}'")
    compile = compile or compile_mode is not None
    try:
        sizes = tuple(int(b) for b in batch_size.split(",") if b.strip())
    except ValueError:
        raise PixifyError(f"--batch-size must look like 1,8, got '{batch_size}'") from None
    if not sizes:
        raise PixifyError(f"--batch-size must be positive integers, got '{batch_size}'")
    for b in sizes:
        check_batch_size(b)
    con = _console()
    malloc_state = tune_malloc() if malloc == "tuned" else "system"
    if op:
        z = 4 if zeta == "auto" else int(_check_zeta_cli(zeta))
        results = [bench_op(zeta=z, batch_size=b, device=device, dtype=dtypes[dtype], rounds=rounds,
                            channels_last=channels_last) for b in sizes]
        for r in results:
            r["malloc"] = malloc_state
        if as_json:
            _print_json(results, indent=2)
            return
        t = Table(title=f"PiX op, 256×56×56, ζ={z}, {dtype}, {device}, {torch.get_num_threads()} threads, "
                  f"malloc {malloc_state}",
                  title_justify="left")
        for col in ("batch", "one pass ms", "fusion ms", "fusion/one pass", "naive ms", "conv1x1 ms", "pix ms"):
            t.add_column(col, justify="right")
        for b, r in zip(sizes, results):
            t.add_row(str(b), f"{r['one_pass_ms']:.2f}", f"{r['fusion_ms']:.2f}", f"{r['fusion_vs_one_pass']:.2f}",
                      f"{r['naive_ms']:.2f}", f"{r['conv1x1_ms']:.2f}", f"{r['pix_ms']:.2f}")
        con.print(t)
        return
    if model is None:
        raise PixifyError("bench needs a MODEL (or --op for the op-level benchmark)")
    original, converted, report_macs, report_params, label = _bench_models(model, zeta, _parse_input_size(input_size))
    recipe = converted.pixify_recipe
    size = (_parse_input_size(input_size) or tuple((recipe.get("data_config") or {}).get("input_size") or ())
            or tuple(recipe.get("input_shape", [1, 3, 224, 224])[1:]))  # the remembered preprocessing first
    say = None if as_json else (lambda m: con.print(f"[dim]{m}...[/dim]"))
    try:
        if runtime == "onnxruntime":
            from .bench import bench_onnxruntime

            timings = bench_onnxruntime(original, converted, size, sizes, threads, rounds, floor=floor,
                                        progress=say)
        elif runtime == "torch.export":
            from .bench import bench_torch_export

            timings = bench_torch_export(original, converted, size, sizes, rounds, floor=floor, progress=say)
        else:
            timings = bench_models(original, converted, size, sizes, device, dtypes[dtype], compile, train, rounds,
                                   channels_last=channels_last, floor=floor, compile_mode=compile_mode, progress=say)
    except (RuntimeError, ValueError) as exc:  # e.g. a training step whose batch norm sees one value per channel
        raise PixifyError(f"the models do not run at batch sizes {','.join(map(str, sizes))} and input "
                          f"{tuple(size)}: {type(exc).__name__}: {exc}",
                          "try a larger --batch-size or --input-size, or --no-train") from None
    rep = BenchReport(label, zeta, device, torch.get_num_threads(), compile, report_macs, report_params, timings,
                      malloc=malloc_state, compile_mode=compile_mode)
    if as_json:
        _print_json(rep.to_json(), indent=2)
        return
    t = Table(title=f"{label}: converted vs original, {device} {dtype}, {rep.threads} threads"
              + (f", torch.compile {compile_mode or ''}".rstrip() if compile else "") + f", malloc {malloc_state}",
              title_justify="left")
    for col in ("measure", "batch", "original ms", "converted ms", "ratio"):
        t.add_column(col, justify="right" if col != "measure" else "left")
    for tm in timings:
        t.add_row(tm.what, str(tm.batch_size), f"{tm.original_ms:.2f}", f"{tm.converted_ms:.2f}", f"{tm.ratio:.3f}")
    con.print(t)
    con.print(f"MACs {_human(report_macs['original'])} → {_human(report_macs['converted'])} "
              f"(×{report_macs['converted'] / report_macs['original']:.3f}); params {_human(report_params['original'])} "
              f"→ {_human(report_params['converted'])}")


def _check_zeta_cli(zeta: str):
    from .rewrite import parse_zeta

    try:
        return parse_zeta(zeta)
    except ValueError as exc:
        raise PixifyError(str(exc)) from None


def _bench_models(model: str, zeta: str, input_size):
    """(original, converted, macs, params, label) for a model name or a pixify checkpoint.

    φ is drawn at random (std 1) so that about half the groups pick and half mix, as after training;
    with the zero initialisation every group would take the mix branch.
    """
    import copy

    import torch

    from .checkpoint import load
    from .conversion import convert
    from .graph import example_input_for
    from .metrics import count_macs, count_params
    from .ops import PiX
    from .sources import Source, create_model, rebuild
    from .validate import run_on_example

    if Path(model).is_file() or model.endswith(".safetensors"):
        converted = load(model)
        source = Source.from_json(converted.pixify_recipe["source"])
        torch.manual_seed(source.seed or 0)
        original = rebuild(source)
        label = f"{model} ({source.spec})"
    else:
        _check_zeta_cli(zeta)
        original, source = create_model(model, pretrained=False)
        example = example_input_for(original, input_size=input_size) if input_size else None
        converted, _ = convert(copy.deepcopy(original), zeta=zeta, source=source, example_input=example,
                               inplace=True)
        label = source.spec
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in converted.modules():
                if isinstance(m, PiX):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    ex = example_input_for(original, input_size=input_size)
    macs = run_on_example(lambda x: {"original": count_macs(original, x), "converted": count_macs(converted, x)}, ex)
    params = {"original": count_params(original), "converted": count_params(converted)}
    return original.eval(), converted.eval(), macs, params, label


def _floats(text: Optional[str], what: str) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        vals = tuple(float(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise PixifyError(f"{what} must be comma-separated numbers, got '{text}'") from None
    if not vals:
        raise PixifyError(f"{what} must be comma-separated numbers, got '{text}'")
    return vals


def _data_config(model, input_size, mean, std, crop_pct, interpolation):
    from .data import resolve_data_config

    return resolve_data_config(model, _parse_input_size(input_size), mean=_floats(mean, "--mean"),
                               std=_floats(std, "--std"), crop_pct=crop_pct, interpolation=interpolation)


@app.command(epilog="Example: pixify finetune r50_pix.safetensors --data imagenet/train --val-data imagenet/val "
                    "--epochs 1 --out r50_ft   (torchrun --nproc-per-node 8 -m pixify.cli finetune ... for DDP)")
def finetune(
    checkpoint: Path = typer.Argument(..., help="pixify checkpoint to fine-tune"),
    data: Path = typer.Option(..., "--data", "-d", help="training images: ImageFolder tree (labelled) or a folder of images (unlabelled)"),
    val_data: Optional[Path] = typer.Option(None, "--val-data", help="held-out images, evaluated after every epoch"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default: CHECKPOINT-finetune)"),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="original weights (.safetensors/.pth); default: rebuilt from the recipe"),
    epochs: Optional[int] = typer.Option(None, "--epochs", "-e", help="passes over the data [default: 1]"),
    steps: Optional[int] = typer.Option(None, "--steps", help="total optimizer steps instead of --epochs"),
    lr: Optional[float] = typer.Option(None, "--lr", help=f"peak learning rate [default: {_LR_DEFAULTS}]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="images per step and process [default: 64]"),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adamw | sgd (Nesterov momentum) [default: adamw]"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="weight decay"),
    warmup: Optional[float] = typer.Option(None, "--warmup", help="fraction of the steps spent warming up"),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-T", help="distillation temperature"),
    kd_weight: Optional[float] = typer.Option(None, "--kd-weight", help="weight of the distillation loss (1 − it for cross-entropy)"),
    init: Optional[str] = typer.Option(None, "--init", help="lsq: least-squares refit of the layers after PiX | none"),
    calib_images: Optional[int] = typer.Option(None, "--calib-images", help="images for the refit and the batch-norm re-estimation (0: skip)"),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="timm training augmentation [default: off]"),
    unlabelled: bool = typer.Option(False, "--unlabelled", help="ignore class folders: distillation alone"),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", help="data-loading processes per training process"),
    seed: Optional[int] = typer.Option(None, "--seed", help="random seed"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: the local GPU if any)"),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="mixed precision [default: on with CUDA]"),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the student"),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="C,H,W [default: the conversion's input]"),
    mean: Optional[str] = typer.Option(None, "--mean", help="normalisation mean, e.g. 0.485,0.456,0.406 [default: pretrained_cfg]"),
    std: Optional[str] = typer.Option(None, "--std", help="normalisation std [default: pretrained_cfg]"),
    crop_pct: Optional[float] = typer.Option(None, "--crop-pct", help="centre-crop fraction [default: pretrained_cfg]"),
    interpolation: Optional[str] = typer.Option(None, "--interpolation", help="bilinear | bicubic ..."),
    check_images: bool = typer.Option(True, "--check-images/--no-check-images", help="decode every image before training"),
    resume: bool = typer.Option(False, "--resume", help="continue the interrupted run in --out exactly"),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="steps between lines of log.jsonl [default: 20]"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Recover accuracy: distil the original model into the converted one (KD + CE, cosine schedule)."""
    from .training import FinetuneConfig, finetune as run_finetune
    from .training.models import load_student as _load_student

    FinetuneConfig(**{k: v for k, v in dict(epochs=epochs, steps=steps, lr=lr, batch_size=batch_size,
                                            workers=workers).items()
                      if v is not None}).validate()  # fail fast on --epochs 0 before loading anything
    student, _, _ = _load_student(checkpoint)
    dcfg = _data_config(student, input_size, mean, std, crop_pct, interpolation)
    result = run_finetune(
        student, data, teacher=teacher, out=out or Path(f"{Path(checkpoint).with_suffix('').name}-finetune"),
        val_data=val_data, resume=resume, device=device, labelled=False if unlabelled else None, data_config=dcfg,
        progress=not quiet and not as_json, epochs=epochs, steps=steps, lr=lr, batch_size=batch_size,
        optimizer=optimizer, weight_decay=weight_decay, warmup=warmup, temperature=temperature, kd_weight=kd_weight,
        init=init, calib_images=calib_images, augment=augment, workers=workers, seed=seed, amp=amp,
        compile=compile_ or None, check_images=check_images, log_every=log_every)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        _print_json({"checkpoint": str(result.checkpoint), "out": str(result.out), "epochs": result.epochs,
                     "steps": result.steps, "seconds": round(result.seconds, 2), "init": result.init,
                     "history": result.history}, indent=2)
        return
    con = _console()
    t = Table(title=f"fine-tuned {checkpoint} → {result.checkpoint}", title_justify="left")
    for col in ("epoch", "step", "loss", "KD", "CE", "val top-1", "val top-5", "agreement", "s"):
        t.add_column(col, justify="right")
    f = lambda v, p=4: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for h in result.history:
        t.add_row(str(h["epoch"]), str(h["step"]), f(h.get("loss")), f(h.get("kd")), f(h.get("ce")),
                  f(h.get("val_top1"), 2), f(h.get("val_top5"), 2), f(h.get("val_agreement"), 2), f(h.get("seconds"), 1))
    con.print(t)
    if result.init:
        i = result.init
        con.print(f"initialisation on {i.get('calib_images')} images: held-out agreement with the teacher "
                  f"{i.get('calib_agreement_converted', float('nan')):.1f}% → {i.get('calib_agreement', float('nan')):.1f}%"
                  f" (kept: {i.get('kept', '-')}, {i.get('seconds', 0):.1f} s)")
    con.print(f"wrote {result.checkpoint}, {result.out / 'log.jsonl'}, {result.out / 'curves.png'} "
              f"in {result.seconds:.1f} s")


@app.command(name="eval", epilog="Example: pixify eval r50_ft/checkpoint.safetensors --data imagenet/val")
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="pixify checkpoint to evaluate"),
    data: Path = typer.Option(..., "--data", "-d", help="images: ImageFolder tree (top-1/top-5) or a folder of images (agreement only)"),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="original weights (.safetensors/.pth); default: rebuilt from the recipe"),
    no_teacher: bool = typer.Option(False, "--no-teacher", help="skip the agreement with the original"),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="images per batch"),
    workers: int = typer.Option(2, "--workers", "-j", help="data-loading processes"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N"),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="C,H,W [default: the conversion's input]"),
    mean: Optional[str] = typer.Option(None, "--mean", help="normalisation mean [default: pretrained_cfg]"),
    std: Optional[str] = typer.Option(None, "--std", help="normalisation std [default: pretrained_cfg]"),
    crop_pct: Optional[float] = typer.Option(None, "--crop-pct", help="centre-crop fraction [default: pretrained_cfg]"),
    interpolation: Optional[str] = typer.Option(None, "--interpolation", help="bilinear | bicubic ..."),
    check_images: bool = typer.Option(True, "--check-images/--no-check-images", help="decode every image first"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Top-1/top-5 of a checkpoint on a data folder, and its top-1 agreement with the original model."""
    from .training import evaluate
    from .training.models import load_student as _load_student

    from .validate import check_batch_size, check_workers

    check_batch_size(batch_size)
    check_workers(workers)
    if no_teacher and teacher is not None:
        raise PixifyError("--teacher and --no-teacher contradict each other", "keep one")
    student, _, _ = _load_student(checkpoint)
    dcfg = _data_config(student, input_size, mean, std, crop_pct, interpolation)
    res = evaluate(student, data, teacher=False if no_teacher else teacher, batch_size=batch_size, workers=workers,
                   device=device, data_config=dcfg, check_images=check_images, progress=not as_json)
    if as_json:
        _print_json(dict(res, checkpoint=str(checkpoint), data=str(data)), indent=2)
        return
    t = Table(title=f"{checkpoint} on {data} ({res['images']} images)", title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key, label in (("top1", "top-1 %"), ("top5", "top-5 %"), ("agreement", "top-1 agreement with the original %"),
                       ("teacher_top1", "original's top-1 %")):
        if key in res:
            t.add_row(label, f"{res[key]:.2f}")
    _console().print(t)


@app.command(name="export", epilog="Example: pixify export r50_pix.safetensors -o r50_pix.onnx")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="pixify checkpoint to export"),
    output: Path = typer.Option(..., "--output", "-o", help="model.onnx (ONNX) or model.pt2 (torch.export)"),
    batch: str = typer.Option("dynamic", "--batch", help="'dynamic' or a fixed batch size"),
    opset: int = typer.Option(18, "--opset", help="ONNX opset"),
    check: bool = typer.Option(True, "--check/--no-check", help="run the exported graph (ONNX Runtime / "
                               "torch.export.load) and compare it with the eager model before keeping it"),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="C,H,W [default: the conversion's]"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Export a converted model for deployment (ONNX or torch.export), checked against eager PyTorch."""
    from .deploy import export

    if not Path(checkpoint).is_file():
        raise PixifyError(f"checkpoint not found: {checkpoint}")
    rep = export(checkpoint, output, batch=batch, opset=opset, check=check, input_size=_parse_input_size(input_size))
    if as_json:
        _print_json(rep.to_json(), indent=2)
        return
    con = _console()
    what = f"{rep.format}" + (f", opset {rep.opset}, {rep.nodes} nodes" if rep.opset else "")
    con.print(f"wrote {rep.path} ({what}; batch {rep.batch}; input {tuple(rep.input_shape)}) in {rep.seconds:.1f} s")
    for c in rep.checked:
        con.print(f"checked on {c['input']}: max |difference| {c['max_abs_diff']:.2e}, "
                  f"top-1 agreement {c['top1_agreement']:.1f}%")


# ------------------------------------------------------------------------------------------- entry point

def main(argv: Optional[list[str]] = None) -> int:
    """Console entry point: runs the app and turns user errors into one line + exit code 2."""
    import warnings

    args = list(sys.argv[1:] if argv is None else argv)
    from .config import SETTINGS

    debug = _STATE["debug"] or SETTINGS.debug or "--debug" in args
    # warnings from torch or a model library are held back: printed (one line each) after a command that
    # succeeds, dropped when it fails, so that an error is always the one line on stderr
    with warnings.catch_warnings(record=True) as held:
        code = _dispatch(args, debug)
    if code == 0:
        seen = set()
        for w in held:
            text = str(w.message).strip().splitlines()
            line = f"warning: {text[0] if text else w.category.__name__}"
            if line not in seen:
                seen.add(line)
                print(line, file=sys.stderr)
    return code


def _interruptible(fn):
    """Keep what an interrupted command says it kept: typer turns Ctrl-C into exit code 130 on its own,
    dropping the exception and its message."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as exc:
            _STATE["interrupted"] = str(exc)
            raise

    return wrapper


for _info in app.registered_commands:
    _info.callback = _interruptible(_info.callback)


def _dispatch(args: list[str], debug: bool) -> int:
    _STATE.pop("interrupted", None)
    try:
        import signal

        if getattr(signal.getsignal(signal.SIGINT), "pixify_import_handler", False):
            signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on Ctrl-C is handled below
        rv = app(args=args, prog_name="pixify", standalone_mode=False)
        if rv == 130:  # Ctrl-C (writes are atomic: an interrupted command leaves no partial file)
            said = _STATE.pop("interrupted", "")
            print(f"interrupted: {said}" if said else "interrupted; nothing was written", file=sys.stderr)
        return rv if isinstance(rv, int) else 0
    except PixifyError as exc:
        if debug:
            raise
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except _cx.UsageError as exc:
        if type(exc).__name__.startswith("NoArgsIsHelp"):  # `pixify` alone prints its help
            print(exc.format_message() if hasattr(exc, "format_message") else str(exc))
            return 0
        if debug:
            raise
        cmd = exc.ctx.command_path if exc.ctx else "pixify"
        print(f"error: {exc.format_message()} (see '{cmd} --help')", file=sys.stderr)
        return 2
    except typer.Abort:  # public in typer (its vendored click has no Abort/Exit)
        print("aborted", file=sys.stderr)
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt as exc:  # writes are atomic: an interrupted command leaves no partial file
        if debug:
            raise
        print(f"interrupted: {exc}" if str(exc) else "interrupted; nothing was written", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
