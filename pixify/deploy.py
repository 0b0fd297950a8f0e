"""Export a converted model for deployment: ONNX (``.onnx``, run by ONNX Runtime) or ``torch.export``
(``.pt2``), checked against the eager model before the file is kept.

PiX is written into the graph as its export formulation (:func:`pixify.ops.pick_or_mix_export`: a reshape of
the channel axis, reductions over one axis, the decision as two coefficients on the small N×G tensor and a
multiply-add; no full-size transposes), so the exported graph needs nothing from pixify to run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import PixifyError
from .metrics import _logits
from .ops import export_mode
from .validate import run_on_example
from .outputs import atomic_write, check_output_file

__all__ = ["export", "ExportReport", "FORMATS"]

FORMATS = {".onnx": "onnx", ".pt2": "torch.export"}
DEFAULT_OPSET = 18
MIN_OPSET = 18  # the dynamo exporter writes 18 and later (earlier ones go through a converter that fails)


@dataclass
class ExportReport:
    path: str
    format: str
    batch: str  # "dynamic" or the fixed batch size
    input_shape: list[int]
    opset: int | None = None
    nodes: int | None = None  # ONNX graph nodes
    checked: list[dict[str, Any]] = field(default_factory=list)  # per checked input: batch, max_abs_diff, ...
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _load(model: nn.Module | str | Path) -> tuple[nn.Module, dict[str, Any]]:
    if isinstance(model, nn.Module):
        return model.eval(), getattr(model, "pixify_recipe", None) or {}
    from .checkpoint import load

    m = load(model)
    return m, m.pixify_recipe


def _example(model: nn.Module, recipe: dict[str, Any], batch: int, input_size: tuple[int, ...] | None,
             seed: int = 0) -> torch.Tensor:
    from .graph import example_input_for

    if input_size is None:
        shape = recipe.get("input_shape")
        input_size = tuple(shape[1:]) if isinstance(shape, list) and len(shape) > 1 else None
    return example_input_for(model, batch_size=batch, input_size=input_size, seed=seed)


MAX_EXPORT_BATCH = 4096  # the dynamic batch axis's upper bound too


def _parse_batch(batch: Any) -> int | None:
    """None for a dynamic batch axis, else the fixed batch size."""
    if batch is None or (isinstance(batch, str) and batch.strip() == "dynamic"):
        return None
    bad = PixifyError(f"--batch must be 'dynamic' or an integer from 1 to {MAX_EXPORT_BATCH}, got {batch!r}")
    if isinstance(batch, bool) or isinstance(batch, float):
        raise bad
    try:
        b = int(batch)
    except (TypeError, ValueError):
        raise bad from None
    if not 1 <= b <= MAX_EXPORT_BATCH:
        raise bad
    return b


def _check_args(path: Any, opset: Any, input_size: Any, atol: Any, inputs: Any) -> None:
    """What export() is given, checked before any work: one-line errors."""
    from .validate import check_input_size

    if not isinstance(path, (str, Path)):
        raise PixifyError(f"the export path must be a file name, got {type(path).__name__}")
    try:
        import onnx.defs

        top = onnx.defs.onnx_opset_version()
    except ImportError:  # onnx comes with pixify[deploy]; a .pt2 export does not need it
        top = 10 ** 6
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= top:
        raise PixifyError(f"--opset must be an integer from {MIN_OPSET} to {top}, got {opset!r}",
                          f"the exporter writes opset {MIN_OPSET} or later")
    if input_size is not None:
        if not isinstance(input_size, (tuple, list)):
            raise PixifyError(f"input_size must be (C, H, W) integers, got {input_size!r}")
        check_input_size(input_size, "input_size")
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not (0 < atol < math.inf):
        raise PixifyError(f"atol must be a positive number, got {atol!r}")
    if inputs is not None and (not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point()
                               or inputs.dim() < 2 or inputs.device.type == "meta"):
        raise PixifyError("inputs must be a floating-point tensor of images (N, C, H, W)")


def export(model: nn.Module | str | Path, path: str | Path, *, batch: int | str = "dynamic",
           opset: int = DEFAULT_OPSET, check: bool = True, input_size: tuple[int, ...] | None = None,
           inputs: torch.Tensor | None = None, atol: float = 1e-4) -> ExportReport:
    """Export ``model`` (a converted model or a pixify checkpoint) to ``path``.

    Args:
        path: ``.onnx`` (ONNX, through ``torch.onnx.export(dynamo=True)``) or ``.pt2`` (``torch.export``).
        batch: ``"dynamic"`` (a symbolic batch axis) or a fixed batch size.
        opset: the ONNX opset.
        check: run the exported graph (ONNX Runtime, or ``torch.export.load``) on random inputs, and on
            ``inputs`` when given, and compare with the eager model: the largest absolute difference must be
            within ``atol`` times the outputs' scale, else nothing is written.
        input_size: (C, H, W) of the input (default: the conversion's).
    """
    import time

    t0 = time.perf_counter()
    _check_args(path, opset, input_size, atol, inputs)
    p = Path(path)
    kind = FORMATS.get(p.suffix.lower())
    if kind is None:
        raise PixifyError(f"cannot tell the export format from {p.name}", "use a .onnx or .pt2 file name")
    check_output_file(p, "-o")
    fixed = _parse_batch(batch)
    if kind == "onnx" and check:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise PixifyError("checking an ONNX export needs onnxruntime",
                              "pip install 'pixify[deploy]', or pass --no-check") from None
    model, recipe = _load(model)
    model = model.eval()
    if any(t.device.type == "meta" for t in model.parameters()):
        raise PixifyError("the model is on the meta device (it has no weights)", "load or convert it for real")
    trace_batch = fixed if fixed is not None else 2  # torch.export specialises sizes 0 and 1
    shape = input_size or (recipe.get("input_shape") or [None])[1:]
    if shape and all(isinstance(d, int) for d in shape) and trace_batch * math.prod(shape) > 1 << 28:
        raise PixifyError(f"--batch {trace_batch} of {tuple(shape)} inputs is more than pixify allocates "
                          f"({1 << 28:,} values)", "export with a dynamic batch, or a smaller fixed one")
    example = _example(model, recipe, trace_batch, input_size)
    with torch.no_grad():  # an input the model cannot take fails here in one line, not inside the exporter
        run_on_example(model, example)
    if inputs is not None:
        if tuple(inputs.shape[1:]) != tuple(example.shape[1:]):
            raise PixifyError(f"inputs of shape {tuple(inputs.shape)} do not fit the model's input "
                              f"{tuple(example.shape[1:])}", "give (N, " + ", ".join(map(str, example.shape[1:])) + ")")
        if (fixed is not None and inputs.shape[0] != fixed) or not 1 <= inputs.shape[0] <= MAX_EXPORT_BATCH:
            raise PixifyError(f"inputs hold {inputs.shape[0]} images; the export takes "
                              f"{fixed if fixed is not None else f'1 to {MAX_EXPORT_BATCH}'}")
    report = ExportReport(str(p), kind, "dynamic" if fixed is None else str(fixed), list(example.shape[1:]),
                          opset if kind == "onnx" else None)
    def write(tmp: str) -> None:  # into the temporary file beside the target: renamed into place if it checks
        with torch.no_grad(), export_mode():
            if kind == "onnx":
                report.nodes = _to_onnx(model, example, Path(tmp), fixed is None, opset)
            else:
                _to_pt2(model, example, Path(tmp), fixed is None)
        if not check:
            return
        run = _runner(Path(tmp), kind)
        sizes = [trace_batch] if fixed is not None else [1, 2, 3]
        cases = [(_example(model, recipe, b, input_size, seed=i + 1), f"random batch {b}") for i, b in enumerate(sizes)]
        if inputs is not None:
            cases.append((inputs, "the given inputs"))
        report.checked = [_compare(model, run, x, atol, what) for x, what in cases]

    atomic_write(p, write, "-o")
    report.seconds = round(time.perf_counter() - t0, 2)
    return report


def _batch_axis(dynamic: bool) -> dict | None:
    """``dynamic_shapes`` for the one input ``x``: a symbolic batch axis, or None for the example's size."""
    return {"x": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic else None


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """The exporters' log notes and warnings held back (torch.export logs its error lines before it raises):
    they would push pixify's one-line error, or a clean export's silence, past what the user asked for."""
    quiet = [logging.getLogger(n) for n in ("onnxscript", "torch.onnx", "torch.export")]
    levels = [q.level for q in quiet]
    try:
        for q in quiet:
            q.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def _to_onnx(model: nn.Module, example: torch.Tensor, out: Path, dynamic: bool, opset: int) -> int:
    try:
        with _quiet_exporters():
            prog = torch.onnx.export(_Wrapped(model), (example,), dynamo=True, opset_version=opset,
                                     dynamic_shapes=_batch_axis(dynamic), input_names=["x"], output_names=["y"],
                                     verbose=False)
            prog.save(str(out))
    except Exception as exc:  # noqa: BLE001 - the exporter's many failure types: one line for the user
        raise PixifyError(f"ONNX export failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}",
                          "try .pt2 (torch.export), or --batch N") from None
    import onnx

    graph = onnx.load(str(out), load_external_data=False)
    written = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise PixifyError(f"the exporter wrote opset {written}, not the {opset} asked for", f"use --opset {written}")
    return len(graph.graph.node)


def _exported_program(model: nn.Module, example: torch.Tensor, dynamic: bool) -> torch.export.ExportedProgram:
    return torch.export.export(_Wrapped(model), (example,), dynamic_shapes=_batch_axis(dynamic))


def _to_pt2(model: nn.Module, example: torch.Tensor, out: Path, dynamic: bool) -> None:
    try:
        with _quiet_exporters():
            program = _exported_program(model, example, dynamic)
        with open(out, "wb") as f:  # a file object: torch would warn that the temporary name lacks .pt2
            torch.export.save(program, f)
    except Exception as exc:  # noqa: BLE001
        raise PixifyError(f"torch.export failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}",
                          "try --batch N") from None


class _Wrapped(nn.Module):
    """One tensor in, the logits out (timm and torchvision models already are; a wrapper names the input)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _logits(self.model(x))


def _runner(path: Path, kind: str) -> Any:
    """A function that runs the exported graph in ``path`` on one input (loaded once)."""
    if kind == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda x: torch.from_numpy(sess.run(None, {name: x.float().numpy()})[0])
    with open(path, "rb") as f:
        program = torch.export.load(f).module()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return program(x).float()
    return run


def _compare(model: nn.Module, run: Any, x: torch.Tensor, atol: float, what: str) -> dict[str, Any]:
    with torch.no_grad():
        want = _logits(model(x)).float()
    got = run(x)
    if tuple(got.shape) != tuple(want.shape):
        raise PixifyError(f"the exported graph gives {tuple(got.shape)} for {what}, the model {tuple(want.shape)}")
    diff = float((got - want).abs().max())
    scale = max(1.0, float(want.abs().max()))
    if not math.isfinite(diff) or diff > atol * scale:
        raise PixifyError(f"the exported graph differs from the model on {what}: max |difference| {diff:.3g} "
                          f"(allowed {atol * scale:.3g}); nothing was written", "report this as a pixify bug")
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean() * 100) if want.dim() == 2 else None
    return {"input": what, "batch": int(x.shape[0]), "max_abs_diff": diff, "top1_agreement": agree}
