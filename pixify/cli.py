"""The ``pixify`` command line: a thin typer layer over the Python API.

Errors a user can cause print as one line on stderr and exit with code 2 (a traceback only with
``--debug``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from .errors import PixifyError

app = typer.Typer(
    name="pixify",
    help="Rewrite channel-squeezing layers of vision models into Pick-or-Mix (PiX) modules.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_STATE = {"debug": bool(os.environ.get("PIXIFY_DEBUG"))}


def _console(stderr: bool = False) -> Console:
    width = None if sys.stdout.isatty() else max(120, shutil.get_terminal_size((120, 24)).columns)
    return Console(stderr=stderr, width=width, highlight=False)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
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
    if not dims or any(d < 1 for d in dims):
        raise PixifyError(f"--input-size must be positive integers, got '{text}'")
    return dims


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
        f"sites: {report.count('pure')} pure, {report.count('hybrid')} hybrid, {report.count('skip')} skipped"
        f" ({len(report.near_misses)} near-misses, {len(report.untraced)} parts not analysed)",
        f"MACs:   {_human(report.macs_before)} → {_human(report.macs_after)}  (×{report.macs_ratio:.3f})"
        f"  at input {tuple(report.input_shape)}",
        f"params: {_human(report.params_before)} → {_human(report.params_after)}  (×{report.params_ratio:.3f})"
        if report.params_before else f"params: {_human(report.params_after)}",
    ]
    if a:
        lines.append(f"output agreement on {report.agreement_on}: top-1 {a['top1_agreement']:.1%}, "
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
        macs_after=r.get("macs_after", 0), params_after=count_params(model), input_shape=tuple(r.get("input_shape", ())),
    )


_MODEL_HELP = "timm name (resnet50), torchvision:NAME, hf-hub:ORG/NAME (inspect also takes a pixify checkpoint)"
_ZETA_HELP = "sampling factor: 'auto' (ζ = C_in/C_out per site) or an integer >= 1"


# ----------------------------------------------------------------------------------------------- commands

@app.command(epilog="Example: pixify convert resnet50 --zeta 2 --no-pretrained -o r50_pix.safetensors")
def convert(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    zeta: str = typer.Option("auto", "--zeta", "-z", help=_ZETA_HELP),
    tau: str = typer.Option("0.5", "--tau", help="pick/mix threshold in (0, 1)"),
    preset: Optional[str] = typer.Option(None, "--preset", help="'paper': the paper's ResNet configuration"),
    mode: str = typer.Option("squeeze", "--mode", help="squeeze"),
    rules: list[Path] = typer.Option([], "--rules", help="extra rules file (TOML); repeatable"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="checkpoint path (default: MODEL_pix.safetensors)"),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", help="start from the published weights"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="original weights (.safetensors or .pth state dict)"),
    model_arg: list[str] = typer.Option([], "--model-arg", help="constructor argument KEY=VALUE; repeatable"),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="C,H,W of the example input"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also list near-misses"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Convert MODEL and write a pixify checkpoint."""
    from .conversion import convert_named

    t0 = time.perf_counter()
    out_path = Path(output) if output is not None else Path(f"{model.replace(':', '_').replace('/', '_')}_pix.safetensors")
    from .checkpoint import check_output_path, save

    check_output_path(out_path)
    converted, report = convert_named(model, zeta, tau, preset, mode, rules, pretrained, weights,
                                      _parse_kwargs(model_arg), _parse_input_size(input_size))
    save(converted, out_path)
    elapsed = time.perf_counter() - t0
    if as_json:
        data = report.to_json()
        data.update(output=str(out_path), total_seconds=round(elapsed, 3))
        print(json.dumps(data, indent=2))
        return
    _print_report(report, verbose)
    _console().print(f"wrote {out_path} in {elapsed:.2f} s")


@app.command(epilog="Example: pixify inspect resnet50 --zeta 2 --no-pretrained")
def inspect(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    zeta: str = typer.Option("auto", "--zeta", "-z", help=_ZETA_HELP),
    tau: str = typer.Option("0.5", "--tau", help="pick/mix threshold in (0, 1)"),
    preset: Optional[str] = typer.Option(None, "--preset", help="'paper': the paper's ResNet configuration"),
    mode: str = typer.Option("squeeze", "--mode", help="squeeze"),
    rules: list[Path] = typer.Option([], "--rules", help="extra rules file (TOML); repeatable"),
    pretrained: bool = typer.Option(False, "--pretrained/--no-pretrained",
                                    help="inspect with the published weights (not needed for a dry run)"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="original weights (.safetensors or .pth state dict)"),
    model_arg: list[str] = typer.Option([], "--model-arg", help="constructor argument KEY=VALUE; repeatable"),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="C,H,W of the example input"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Dry run: every site, every near-miss with its reason, MACs and params before/after.

    Given a pixify checkpoint instead of a model name, shows the sites its recipe rewrote.
    """
    from .conversion import convert_named

    if Path(model).is_file() or model.endswith(".safetensors"):
        report = _checkpoint_report(model)
        if as_json:
            print(json.dumps(report.to_json(), indent=2))
        else:
            _print_report(report, verbose=False)
        return
    _, report = convert_named(model, zeta, tau, preset, mode, rules, pretrained, weights,
                              _parse_kwargs(model_arg), _parse_input_size(input_size))
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    _print_report(report, verbose=True)


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
        print(json.dumps([{"name": r.name, "mode": r.mode, "preset": r.preset, "priority": r.priority,
                           "pattern": list(r.pattern), "description": r.description, "source": r.source,
                           "sha256": r.digest} for r in found], indent=2))
        return
    t = Table(title="pixify rules", title_justify="left")
    for col in ("name", "mode", "preset", "pattern", "priority", "description", "source"):
        t.add_column(col, overflow="fold")
    for r in found:
        t.add_row(r.name, r.mode, r.preset or "-", " → ".join(r.pattern), str(r.priority), r.description, r.source)
    _console().print(t)


# ------------------------------------------------------------------------------------------- entry point

def main(argv: Optional[list[str]] = None) -> int:
    """Console entry point: runs the app and turns user errors into one line + exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _STATE["debug"] or "--debug" in args
    try:
        rv = app(args=args, prog_name="pixify", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except PixifyError as exc:
        if debug:
            raise
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except click.exceptions.NoArgsIsHelp:
        return 0
    except click.exceptions.UsageError as exc:
        if debug:
            raise
        cmd = exc.ctx.command_path if exc.ctx else "pixify"
        print(f"error: {exc.format_message()} (see '{cmd} --help')", file=sys.stderr)
        return 2
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
