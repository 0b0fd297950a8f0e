"""The conversion pipeline behind ``pixify.convert`` and ``pixify.inspect``.

analyse (trace + match rules) → plan (ζ per site) → apply (swap modules) → check (forward once, output
shape) → optionally re-estimate batch-norm statistics on calibration data → measure (MACs, params,
output agreement) → report.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .errors import PixifyError, short_reason
from .graph import Analysis, NearMiss, Untraced, analyse, example_input_for
from .metrics import _call, _logits, count_macs, count_params, output_agreement
from .ops import eager_kernels
from .rewrite import SiteRecord, apply_sites, parse_zeta, plan_sites
from .rules import Rule, active_rules, check_rule
from .sources import Source
from .validate import run_on_example

__all__ = ["ConversionReport", "convert", "convert_named", "inspect", "recalibrate_batchnorm"]

MODES = ("squeeze", "prune")


@dataclass
class ConversionReport:
    """What a conversion matched, did, skipped and measured."""

    model: str
    mode: str
    zeta: int | str
    tau: float
    preset: str | None
    sites: list[SiteRecord] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)
    untraced: list[Untraced] = field(default_factory=list)
    rules: list[dict[str, Any]] = field(default_factory=list)
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    input_shape: tuple[int, ...] = ()
    agreement: dict[str, float] = field(default_factory=dict)
    agreement_on: str = "example input"
    seconds: float = 0.0
    source_note: str = ""  # why the source could not be verified ("" when it was)
    init: dict[str, Any] = field(default_factory=dict)  # the fitted initialisation (with calibration data)
    selection: dict[str, Any] = field(default_factory=dict)  # the budget, per-site costs, what was chosen
    warning: str = ""  # e.g. the converted model's outputs collapse

    @property
    def actions(self) -> tuple[str, ...]:
        """The site actions this report's mode can take."""
        return ("prune", "skip") if self.mode == "prune" else ("pure", "hybrid", "skip")

    def count(self, action: str) -> int:
        return sum(1 for s in self.sites if s.action == action)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else float("nan")

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "mode": self.mode, "zeta": self.zeta, "tau": self.tau, "preset": self.preset,
            "counts": {a: self.count(a) for a in self.actions},
            "sites": [s.to_json() for s in self.sites],
            "near_misses": [vars(n) for n in self.near_misses],
            "untraced": [vars(u) for u in self.untraced],
            "rules": self.rules,
            "macs_before": self.macs_before, "macs_after": self.macs_after, "macs_ratio": self.macs_ratio,
            "params_before": self.params_before, "params_after": self.params_after,
            "params_ratio": self.params_ratio, "input_shape": list(self.input_shape),
            "agreement": self.agreement, "agreement_on": self.agreement_on, "seconds": round(self.seconds, 3),
            "source_note": self.source_note, "init": self.init, "selection": self.selection,
            "warning": self.warning,
        }


def _check_tau(tau: Any) -> float:
    try:
        t = float(tau)
    except (TypeError, ValueError):
        raise PixifyError(f"tau must be a number in (0, 1), got '{tau}'") from None
    if not (0.0 < t < 1.0) or not math.isfinite(t):
        raise PixifyError(f"tau must be in (0, 1), got {tau}")
    return t


def _check_zeta(zeta: Any) -> int | str:
    try:
        return parse_zeta(zeta)
    except ValueError as exc:
        raise PixifyError(str(exc)) from None


def _rules_for(mode: str, preset: str | None, rules: Iterable[Rule | str | Path] | None) -> list[Rule]:
    if mode not in MODES:
        raise PixifyError(f"unknown mode '{mode}'", f"use one of: {', '.join(MODES)}")
    if preset is not None and mode != "squeeze":
        raise PixifyError(f"--preset {preset} is a squeeze-mode configuration", "drop --preset or use --mode squeeze")
    extra, files = [], []
    if isinstance(rules, (str, Path, Rule)):
        rules = [rules]
    if rules is not None and not isinstance(rules, (list, tuple)):
        raise PixifyError(f"rules must be a list of Rule objects or rules files, got {type(rules).__name__}")
    for r in rules or []:
        if not isinstance(r, (Rule, str, Path)):
            raise PixifyError(f"rules must be Rule objects or paths of rules files, got {type(r).__name__}")
        if isinstance(r, Rule):
            extra.append(check_rule(r))
        else:
            files.append(r)
    return active_rules(mode, preset, extra=extra, files=files)


def check_eager_model(model: Any) -> nn.Module:
    """``model`` if it is an eager ``nn.Module`` with real weights (what pixify rewrites and loads into);
    else a one-line PixifyError."""
    if not isinstance(model, nn.Module):
        raise PixifyError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise PixifyError(f"{type(model).__name__} is a TorchScript module (scripted or traced); pixify rewrites "
                          "eager modules", "pass the Python model before torch.jit.script / torch.jit.trace")
    if isinstance(model, torch.fx.GraphModule):
        raise PixifyError("the model is a torch.fx GraphModule; pixify rewrites the original module tree",
                          "pass the model before symbolic tracing")
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        raise PixifyError("the model is on the meta device (it has no weights)",
                          "materialise it first: model.to_empty(device='cpu'), then load its weights")
    return model


def _check_example(example_input: Any) -> None:
    if example_input is None:
        return
    if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
        raise PixifyError(f"example_input must be a floating-point tensor, got {type(example_input).__name__}"
                          + (f" of {example_input.dtype}" if isinstance(example_input, torch.Tensor) else ""))
    if example_input.dim() < 2 or example_input.shape[0] < 1 or example_input.numel() == 0:
        raise PixifyError(f"example_input must hold at least one example (N >= 1), got shape "
                          f"{tuple(example_input.shape)}")
    if example_input.is_meta:
        raise PixifyError("example_input is on the meta device", "give a real tensor, e.g. torch.randn(1, 3, 224, 224)")


def _check_progress(progress: Any) -> None:
    if progress is not None and not callable(progress):
        raise PixifyError(f"progress must be a function progress(done, total), got {type(progress).__name__}")


def _prepare(model: nn.Module, zeta, tau, preset, mode, rules, example_input):
    check_eager_model(model)
    _check_example(example_input)
    zeta = _check_zeta(zeta)
    tau = _check_tau(tau)
    if preset is not None and zeta != "auto":
        raise PixifyError(f"--preset {preset} fixes ζ at every site", "drop --zeta or the preset")
    rule_list = _rules_for(mode, preset, rules)
    if example_input is None:
        example_input = example_input_for(model)
    return zeta, tau, rule_list, example_input


def _reordered(model: nn.Module, sites: list[SiteRecord], fit: list[torch.Tensor]) -> nn.Module:
    """An eval-mode copy of ``model`` with the channels feeding its pair-pooling site options reordered
    (:func:`pixify.reorder.reorder_sites`); the names of the reordered sites in ``_pixify_reordered``."""
    from .recovery import site_options
    from .reorder import reorder_sites

    base = copy.deepcopy(model).eval()
    info = reorder_sites(base, site_options(sites), fit)
    base._pixify_reordered = info["reordered"]
    return base


def _calibration_inputs(calibration: Iterable[Any], example: Any) -> list[torch.Tensor]:
    """The input batches of ``calibration`` (batches or ``(input, target)`` pairs), checked: floating-point
    tensors shaped like the example input, apart from the batch size."""
    try:
        batches = [b[0] if isinstance(b, (tuple, list)) and b else b for b in calibration]
    except TypeError:
        raise PixifyError(f"calibration must be an iterable of input batches, got {type(calibration).__name__}") from None
    if not batches:
        raise PixifyError("the calibration data is empty")
    want = tuple(example.shape[1:]) if isinstance(example, torch.Tensor) else None
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor) or not b.is_floating_point():
            raise PixifyError(f"calibration batch {i} is {type(b).__name__}"
                              + (f" of {b.dtype}" if isinstance(b, torch.Tensor) else "")
                              + ", not a floating-point tensor", "pass batches of preprocessed images")
        if want is not None and (b.dim() != len(want) + 1 or tuple(b.shape[1:]) != want or len(b) == 0):
            raise PixifyError(f"calibration batch {i} has shape {tuple(b.shape)}; the model's example input is "
                              f"(N, {', '.join(map(str, want))})", "use the model's input size")
        if isinstance(example, torch.Tensor) and (b.dtype != example.dtype or b.device != example.device):
            raise PixifyError(f"calibration batch {i} is {b.dtype} on {b.device}; the model runs "
                              f"{example.dtype} on {example.device}", "convert the batches with .to(...) first")
    return batches


def _report_base(model, source, mode, zeta, tau, preset, rule_list, analysis: Analysis, example) -> ConversionReport:
    used = {s.rule for s in analysis.candidates}
    return ConversionReport(
        model=(source.spec if source else type(model).__name__), mode=mode, zeta=zeta, tau=tau, preset=preset,
        near_misses=analysis.near_misses, untraced=analysis.untraced,
        rules=[r.summary() for r in rule_list if r.name in {u.name for u in used}] or [r.summary() for r in rule_list],
        input_shape=tuple(example.shape) if isinstance(example, torch.Tensor) else (),
    )


def inspect(model: nn.Module, zeta: int | str = "auto", tau: float = 0.5, preset: str | None = None,
            mode: str = "squeeze", rules: Iterable[Rule | str | Path] | None = None,
            example_input: Any = None, source: Source | None = None, calibration: Iterable[Any] | None = None,
            progress: Callable[[int, int], None] | None = None) -> ConversionReport:
    """Dry run: every site with its decision and every near-miss, plus MACs/params before and after.

    The model is not modified (the after-numbers are measured on a converted copy). With ``calibration``
    (input batches of real images) every way of converting each site is also measured alone: converted,
    fitted to the original on three quarters of the images, and compared with the original on the held-out
    quarter (``report.selection["costs"]``: MACs saved, top-1 agreement, logit error).
    """
    _check_progress(progress)
    _, report = convert(model, zeta=zeta, tau=tau, preset=preset, mode=mode, rules=rules,
                        example_input=example_input, source=source, inplace=False)
    if calibration is not None:
        from .recovery import site_costs, site_options, split_batches

        fit, held = split_batches(_calibration_inputs(
            calibration, example_input if example_input is not None else example_input_for(model)))
        base = _reordered(model, report.sites, fit)
        costs = site_costs(base, site_options(report.sites), fit, held, progress=progress)
        report.selection = {"costs": [c.to_json() for c in costs], "fit_images": sum(len(b) for b in fit),
                            "held_out_images": sum(len(b) for b in held)}
    return report


def convert(model: nn.Module, zeta: int | str = "auto", tau: float = 0.5, preset: str | None = None,
            mode: str = "squeeze", rules: Iterable[Rule | str | Path] | None = None, example_input: Any = None,
            calibration: Iterable[Any] | None = None, source: Source | str | None = None,
            inplace: bool = False, budget: Any = None,
            progress: Callable[[int, int], None] | None = None) -> tuple[nn.Module, ConversionReport]:
    """Rewrite ``model``'s squeeze sites into PiX modules.

    Args:
        model: any ``nn.Module`` (timm and torchvision models keep their class, methods and attributes).
        zeta: ``"auto"`` or an integer ≥ 1 applied everywhere it fits. In squeeze mode ``"auto"`` means
            ζ = C_in/C_out at each site; in prune mode the rule's ``auto_zeta`` (2 for the built-ins).
        tau: the pick/mix threshold, in (0, 1).
        preset: ``"paper"`` for the paper's ResNet configuration.
        mode: ``"squeeze"`` (replace channel-squeezing layers) or ``"prune"`` (insert PiX in front of
            dense layers fed by an activation and shrink them to ``ceil(C_in/ζ)`` inputs).
        rules: extra :class:`Rule` objects or rules files (TOML) besides the built-in ones.
        example_input: input used for shape propagation and measurements (default: a random batch of one
            sized from ``model.pretrained_cfg``, else 3×224×224).
        calibration: input batches of real images (or ``(input, target)`` pairs). Three quarters fit every
            site to the original (:mod:`pixify.recovery`: pure sites keep their norm as a fitted affine
            map, hybrid and prune layers are refitted by least squares); the fit is kept only if it agrees
            better with the original on the held-out quarter, where the report's agreement is measured.
        source: how to rebuild the original, recorded in the recipe so that ``pixify.load(path)`` needs
            nothing but the file. By default it is worked out from the model (timm's ``pretrained_cfg``
            and constructor arguments, torchvision's builders) and verified by rebuilding the architecture
            on the meta device: same state-dict keys, shapes and dtypes. A string such as
            ``"torchvision:resnet50"`` is checked the same way; a :class:`pixify.Source` is taken as it
            is. A model that cannot be verified is recorded as a user module (``report.source_note`` says
            why) and loads with ``pixify.load(path, model=...)``.
        inplace: modify ``model`` itself instead of a deep copy.
        budget: with ``calibration``: ``"agreement=99"`` (the least top-1 agreement, %, with the original on
            the held-out images) or ``"macs=0.8"`` (the largest MACs ratio). Every way of converting each
            site is measured alone, the sites that save the most MACs for their cost are chosen, and the
            combined model is checked (``report.selection``).
        progress: ``progress(done, total)`` while sites are measured or fitted.

    Returns:
        ``(converted_model, report)``; the converted model carries its recipe as ``.pixify_recipe``.
    """
    from .recovery import parse_budget

    budget = parse_budget(budget)
    if budget is not None and calibration is None:
        raise PixifyError("a budget needs calibration data", "pass calibration= (Python) or --data DIR (CLI)")
    # a handful of forward passes: compiling the generated PiX kernel would cost more than it saves
    with eager_kernels():
        return _convert(model, zeta, tau, preset, mode, rules, example_input, calibration, source, inplace,
                        budget, progress)


def _convert(model: nn.Module, zeta: int | str, tau: float, preset: str | None, mode: str,
             rules: Iterable[Rule | str | Path] | None, example_input: Any, calibration: Iterable[Any] | None,
             source: Source | None, inplace: bool, budget: Any = None,
             progress: Callable[[int, int], None] | None = None) -> tuple[nn.Module, ConversionReport]:
    t0 = time.perf_counter()
    _check_progress(progress)
    zeta, tau, rule_list, example = _prepare(model, zeta, tau, preset, mode, rules, example_input)
    from .provenance import source_for

    source, source_note = source_for(model, source)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        macs_before, ref_out = run_on_example(lambda ex: count_macs(model, ex, return_output=True), example,
                                              "pass example_input= (Python) or --input-size (CLI)")
    params_before = count_params(model)
    analysis = analyse(model, rule_list, example)
    report = _report_base(model, source, mode, zeta, tau, preset, rule_list, analysis, example)
    report.sites = plan_sites(analysis.candidates, zeta, tau)
    report.macs_before, report.params_before = macs_before, params_before

    fit = held = None
    teacher = model
    if calibration is not None:
        from .recovery import keep_norm, split_batches

        fit, held = split_batches(_calibration_inputs(calibration, example))
        # the fits need the original: a copy whose channels feeding pair-pooling sites are reordered so
        # that each pair pools with little loss (the same function; see pixify.reorder)
        teacher = _reordered(model, report.sites, fit)
        if budget is not None:
            report.sites, report.selection = _select(teacher, report.sites, budget, fit, held, macs_before, progress)
        report.sites = keep_norm(report.sites)  # a pure site's norm holds the fitted affine map

    if teacher is not model and inplace:
        model.load_state_dict(teacher.state_dict())  # the reordered weights, in the user's own module
    out = model if inplace else copy.deepcopy(teacher)
    out.__dict__.pop("_pixify_reordered", None)
    apply_sites(out, report.sites)
    out.eval()
    with torch.no_grad():
        try:
            macs_after, new_out = count_macs(out, example, return_output=True)
        except Exception as exc:  # a rewrite that breaks the model is a pixify bug: say where
            sites = ", ".join(s.name for s in report.sites if s.action != "skip")
            raise RuntimeError(f"converted model fails its forward check ({exc}); sites: {sites}") from exc
    ref_shape, new_shape = tuple(_logits(ref_out).shape), tuple(_logits(new_out).shape)
    if ref_shape != new_shape:
        raise RuntimeError(f"converted model output {new_shape} differs from the original's {ref_shape}")

    if fit is not None:
        from .recovery import initialise

        report.init = initialise(out, teacher, report.sites, fit, held, progress=progress)
        report.init["reordered_sites"] = len(getattr(teacher, "_pixify_reordered", []))
        report.agreement = report.init.pop("final")
        report.agreement_on = f"{report.init['held_out_images']} held-out calibration images"
        out.eval()
        with torch.no_grad():
            new_out = _call(out, example)
    else:
        report.agreement = output_agreement([ref_out], [new_out])
        report.warning = _collapse_warning(model, out, example)
    report.macs_after = macs_after
    report.params_after = count_params(out)
    model.train(was_training)
    out.train(was_training)
    report.source_note = source_note
    out.pixify_recipe = make_recipe(report, source)
    report.seconds = time.perf_counter() - t0
    if report.warning:
        import warnings

        from .errors import PixifyWarning

        warnings.warn(PixifyWarning(report.warning), stacklevel=3)
    return out, report


def _select(teacher: nn.Module, sites: list[SiteRecord], budget: Any, fit: list, held: list, macs_before: int,
            progress: Callable[[int, int], None] | None) -> tuple[list[SiteRecord], dict[str, Any]]:
    """Measure every option alone, choose within ``budget``, then check the combined model on ``held`` and
    drop the least efficient choices until it keeps the agreement budget."""
    from .metrics import _logits
    from .recovery import agreement, choose_sites, fit_sites, keep_norm, site_costs, site_options

    options = site_options(sites)
    costs = site_costs(teacher, options, fit, held, progress=progress)
    chosen = choose_sites(costs, budget, macs_before)
    with torch.no_grad():
        ref = [_logits(teacher(b)) for b in held]

    def build(choice):
        recs = [next(o for o in options if o.name == c.name and o.action == c.action and (o.zeta or 0) == c.zeta)
                for c in choice]
        student = copy.deepcopy(teacher)
        recs = keep_norm(recs)
        apply_sites(student, recs)
        fit_sites(student, teacher, recs, fit)
        return recs, agreement(student, ref, held)

    recs, measured = build(chosen)
    checks = [{"sites": len(chosen), "agreement": measured["top1_agreement"]}]
    while budget.agreement is not None and chosen and measured["top1_agreement"] < budget.agreement:
        chosen = chosen[:-1]  # the least efficient choice goes first
        recs, measured = build(chosen)
        checks.append({"sites": len(chosen), "agreement": measured["top1_agreement"]})
    by_name = {r.name: r for r in recs}
    out = []
    for s in sites:
        if s.name in by_name:
            out.append(by_name[s.name])
        elif s.action != "skip":
            s = copy.deepcopy(s)
            own = [c for c in costs if c.name == s.name]
            best = max(own, key=lambda c: c.agreement) if own else None
            s.reason = (f"left out by the budget (alone: {best.agreement:.1f}% agreement)" if best
                        else "left out by the budget")
            s.action, s.zeta, s.removed, s.kept, s.macs_after = "skip", None, [], [], s.macs_before
            out.append(s)
        else:
            out.append(s)
    saved = sum(r.macs_saved for r in recs)
    selection = {"budget": budget.to_json(), "costs": [c.to_json() for c in costs],
                 "chosen": [r.name for r in recs], "agreement": measured["top1_agreement"],
                 "macs_ratio": 1 - saved / macs_before if macs_before else None, "checks": checks}
    return out, selection


def _collapse_warning(original: nn.Module, converted: nn.Module, example: Any) -> str:
    """A loud warning when, on a few random inputs, the converted model gives one class for all while the
    original does not, or disagrees with it on most of them (measured without data; --data measures it)."""
    from .graph import example_input_for
    from .metrics import _logits

    if not isinstance(example, torch.Tensor) or example.ndim < 2:
        return ""
    probe = example_input_for(original, batch_size=4, input_size=tuple(example.shape[1:]), seed=1)
    try:
        with torch.no_grad():
            a, b = _logits(_call(original, probe)).float(), _logits(_call(converted, probe)).float()
    except Exception:  # noqa: BLE001 - an advisory probe: a model that takes only its example batch is not an error
        return ""
    if a.ndim != 2 or a.shape[1] < 2:
        return ""
    ta, tb = a.argmax(1), b.argmax(1)
    if len(set(tb.tolist())) == 1 and len(set(ta.tolist())) > 1:
        return ("the converted model gives the same class for every probe input while the original does not: "
                "its outputs have collapsed; convert with --data DIR (real images) to fit it and measure it")
    if float((ta == tb).float().mean()) < 0.5:
        return ("the converted model disagrees with the original on most probe inputs; convert with --data DIR "
                "(real images) to fit it and measure it, or fine-tune it")
    return ""


def make_recipe(report: ConversionReport, source: Source) -> dict[str, Any]:
    src = source.to_json()
    if report.source_note:
        src["note"] = report.source_note
    return {
        "source": src,
        "mode": report.mode,
        "zeta": report.zeta,
        "tau": report.tau,
        "preset": report.preset,
        "rules": report.rules,
        "sites": [s.to_json() for s in report.sites if s.action != "skip"],
        "input_shape": list(report.input_shape),
        **({"selection": {k: v for k, v in report.selection.items() if k != "costs"}} if report.selection else {}),
        **({"init": {k: report.init[k] for k in ("kept", "agreement_before", "agreement_after", "reordered_sites",
                                                 "fit_images",
                                                 "held_out_images")}} if report.init else {}),
        "macs_before": report.macs_before,
        "macs_after": report.macs_after,
    }


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate every batch-norm's running statistics as a cumulative average over ``batches``.

    Returns the number of batch-norm layers reset. The model is left in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved, before = {}, {}
    for m in bns:
        saved[m] = m.momentum
        before[m] = {k: v.clone() for k, v in m.state_dict().items()}
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    ok = False
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    _call(model, b)
                except (RuntimeError, TypeError, ValueError, IndexError) as exc:  # e.g. the wrong channels
                    shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
                    raise PixifyError(f"a calibration batch of {shape} does not run through the model: "
                                      f"{short_reason(exc, 200)}",
                                      "give batches of the model's input; its statistics were left as they were") from None
        ok = True
    finally:
        for m, mom in saved.items():
            m.momentum = mom
            if not ok:  # an error or Ctrl-C: the statistics as they were, not half re-estimated
                m.load_state_dict(before[m])
        model.eval()
    return len(bns)


def convert_named(spec: str, zeta: int | str = "auto", tau: Any = 0.5, preset: str | None = None,
                  mode: str = "squeeze", rules: Iterable[Rule | str | Path] | None = None, pretrained: bool = True,
                  weights: str | Path | None = None, kwargs: dict[str, Any] | None = None,
                  input_size: tuple[int, ...] | None = None, key_map: str | None = None,
                  data: str | Path | None = None, calib_images: int = 512, budget: Any = None,
                  preprocessing: dict[str, Any] | None = None, dry_run: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> tuple[nn.Module | None, ConversionReport]:
    """Build the model named by ``spec`` (timm name, ``torchvision:NAME``) and convert it in place (with
    ``dry_run``, :func:`inspect` it). ``data``: a folder of real images, ``calib_images`` of which calibrate
    (and, with ``budget``, choose) the sites; ``preprocessing`` (mean, std, crop_pct, interpolation) is used
    for them and remembered in the checkpoint.

    Arguments are validated before the model is built, so a bad ζ fails fast.
    """
    from .data import remembered_preprocessing, resolve_data_config
    from .recovery import calibration_batches, parse_budget
    from .sources import create_model

    if spec.endswith(".safetensors") or Path(spec).is_file():
        raise PixifyError(f"'{spec}' is a file, not a model name",
                          "give a timm name or torchvision:NAME; original weights go in with --weights FILE")
    if preset is not None and _check_zeta(zeta) != "auto":
        raise PixifyError(f"--preset {preset} fixes ζ at every site", "drop --zeta or the preset")
    _check_zeta(zeta)
    _check_tau(tau)
    _rules_for(mode, preset, rules)
    if parse_budget(budget) is not None and data is None:
        raise PixifyError("--budget needs --data (real images to measure the sites on)")
    if data is not None and not Path(data).exists():
        raise PixifyError(f"--data {data} does not exist")
    preprocessing = {k: v for k, v in (preprocessing or {}).items() if v is not None}
    model, source = create_model(spec, pretrained=pretrained and weights is None, weights=weights, kwargs=kwargs,
                                 key_map=key_map)
    dcfg = resolve_data_config(model, input_size, **preprocessing) if (preprocessing or data is not None) else None
    if dcfg is not None and input_size is None:
        input_size = tuple(dcfg["input_size"])
    example = example_input_for(model, input_size=input_size) if input_size else None
    calibration = calibration_batches(model, data, calib_images, dcfg) if data is not None else None
    if dry_run:
        return None, inspect(model, zeta=zeta, tau=tau, preset=preset, mode=mode, rules=rules, example_input=example,
                             source=source, calibration=calibration, progress=progress)
    out, report = convert(model, zeta=zeta, tau=tau, preset=preset, mode=mode, rules=rules, example_input=example,
                          source=source, inplace=True, calibration=calibration, budget=budget, progress=progress)
    remembered = remembered_preprocessing({**preprocessing, **({"input_size": input_size} if input_size else {})})
    if remembered:
        out.pixify_recipe["data_config"] = remembered
    return out, report
