"""Model-zoo coverage sweeps: every torchvision classification model and one small model from
every timm module, each converted in squeeze and in prune mode, then checked end to end.

For every model and mode :func:`run_one` does: build (random weights, seeded) → ``pixify.convert`` →
forward + backward in train mode with the right output shape → ``pixify.save`` / ``pixify.load`` round
trip → identical outputs in eval mode (``torch.equal``). Inputs are small (≤ 128 px where the model
allows it; fixed-size timm transformers are built with ``img_size`` so that they accept it, and those
constructor kwargs are recorded in the checkpoint and replayed by ``pixify.load``), every model runs under
a time limit, and every model left out is listed with its reason. ``examples/coverage.py`` prints the
table; ``tests/test_zoo.py`` (marked ``slow``) asserts it.
"""

from __future__ import annotations

import gc
import math
import signal
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from pixify.ops import eager_kernels

__all__ = ["ZooEntry", "ZooResult", "torchvision_entries", "timm_entries", "all_entries", "run_one", "run_entry",
           "OK_STATUSES"]

MODES = ("squeeze", "prune")
CONVERTED, NO_SITE, EXCLUDED, FAILED, TIMEOUT = "converted", "no candidate site", "excluded", "failed", "timeout"
OK_STATUSES = (CONVERTED, NO_SITE)

DEFAULT_TIMEOUT_S = 420  # per model (both modes); the largest (regnet_y_128gf) needs about 80 s on one core

# ------------------------------------------------------------------------------------------- torchvision
# Every classification model runs; these only change the input size or constructor kwargs (3×64×64 and
# no kwargs otherwise). ViTs take their image size as a constructor argument (a multiple of the patch).
TORCHVISION_INPUT = {
    "inception_v3": (3, 128, 128),  # needs ≥ 75 px (and no auxiliary head, below)
    "maxvit_t": (3, 224, 224),  # its window partition needs every stage to be a multiple of 7
    "vit_h_14": (3, 56, 56),  # image_size must be a multiple of its 14 px patch
}
TORCHVISION_KWARGS: dict[str, dict[str, Any]] = {
    # the auxiliary classifier (train mode only) pools a 17×17 map with a 5×5 window: it needs 299 px
    "inception_v3": {"aux_logits": False},
    "vit_b_16": {"image_size": 64},
    "vit_b_32": {"image_size": 64},
    "vit_l_16": {"image_size": 64},
    "vit_l_32": {"image_size": 64},
    "vit_h_14": {"image_size": 56},
}
TORCHVISION_EXCLUDED: dict[str, str] = {}

# ------------------------------------------------------------------------------------------------- timm
# One small model per timm module: the smallest by parameter count (counted on the meta device), or a
# smaller configuration of it where the smallest registered model is large (constructor kwargs, recorded
# in the checkpoint). Entries: module -> (model name, constructor kwargs, input size).
# Where a model is fixed to its pretraining size (``fixed_input_size``), ``img_size`` rebuilds it for 128 px;
# where the smallest registered model is large, ``depth`` (transformers), ``mlp_ratio`` (VGG's pre-logits
# MLP) or ``num_features``/``stem_size`` (NASNet) shrink it. byoanet's smallest model (halonet_h1) only runs
# at 256 px, so the smallest one that runs at 128 px is used. The parameter counts are after the kwargs.
TIMM_PICKS: dict[str, tuple[str, dict[str, Any], tuple[int, int, int]]] = {
    "beit": ("beit_base_patch16_224", {"depth": 2, "img_size": 128}, (3, 128, 128)),  # 15.5 M params
    "byoanet": ("eca_botnext26ts_256", {"img_size": 128}, (3, 128, 128)),  # 10.6 M params
    "byobnet": ("test_byobnet", {}, (3, 128, 128)),  # 0.5 M params
    "cait": ("cait_xxs24_224", {"img_size": 128}, (3, 128, 128)),  # 11.9 M params
    "coat": ("coat_tiny", {"img_size": 128}, (3, 128, 128)),  # 5.5 M params
    "convit": ("convit_tiny", {"img_size": 128}, (3, 128, 128)),  # 5.7 M params
    "convmixer": ("convmixer_768_32", {}, (3, 128, 128)),  # 21.1 M params
    "convnext": ("test_convnext", {}, (3, 128, 128)),  # 0.3 M params
    "cpubone": ("cpubone_nano", {}, (3, 128, 128)),  # 6.5 M params
    "crossvit": ("crossvit_tiny_240", {}, (3, 128, 128)),  # 7.0 M params
    "csatv2": ("csatv2", {}, (3, 128, 128)),  # 11.1 M params
    "cspnet": ("cs3darknet_focus_s", {}, (3, 128, 128)),  # 3.3 M params
    "cspnext": ("cspnext_tiny", {}, (3, 128, 128)),  # 2.7 M params
    "davit": ("davit_tiny", {}, (3, 128, 128)),  # 28.4 M params
    "deepseek_vit": ("deepseek_vit_412m", {"depth": 2, "img_size": 112}, (3, 112, 112)),  # 26.3 M params
    "deit": ("deit_tiny_patch16_224", {"img_size": 128}, (3, 128, 128)),  # 5.7 M params
    "densenet": ("densenet121", {}, (3, 128, 128)),  # 8.0 M params
    "dla": ("dla46x_c", {}, (3, 128, 128)),  # 1.1 M params
    "dpn": ("dpn48b", {}, (3, 128, 128)),  # 9.1 M params
    "edgenext": ("edgenext_xx_small", {}, (3, 128, 128)),  # 1.3 M params
    "efficientformer": ("efficientformer_l1", {}, (3, 224, 224)),  # 12.3 M params
    "efficientformer_v2": ("efficientformerv2_s0", {"img_size": 128}, (3, 128, 128)),  # 3.6 M params
    "efficientnet": ("test_efficientnet", {}, (3, 128, 128)),  # 0.4 M params
    "efficientvim": ("efficientvim_m1", {}, (3, 128, 128)),  # 6.7 M params
    "efficientvit_mit": ("efficientvit_b0", {}, (3, 128, 128)),  # 3.4 M params
    "efficientvit_msra": ("efficientvit_m0", {}, (3, 128, 128)),  # 2.4 M params
    "eva": ("vit_tiny_patch16_dinov3_qkvb", {}, (3, 128, 128)),  # 5.5 M params
    "fasternet": ("fasternet_t0", {}, (3, 128, 128)),  # 3.9 M params
    "fastvit": ("fastvit_t8", {}, (3, 128, 128)),  # 4.0 M params
    "focalnet": ("focalnet_tiny_srf", {}, (3, 128, 128)),  # 28.4 M params
    "gcvit": ("gcvit_xxtiny", {"img_size": 128}, (3, 128, 128)),  # 12.0 M params
    "gemma4_vit": ("gemma4_vit_167m", {"depth": 2}, (3, 128, 128)),  # 35.2 M params
    "ghostnet": ("ghostnet_050", {}, (3, 128, 128)),  # 2.6 M params
    "hardcorenas": ("hardcorenas_b", {}, (3, 128, 128)),  # 5.2 M params
    "hgnet": ("hgnetv2_b0", {}, (3, 128, 128)),  # 6.0 M params
    "hiera": ("hiera_tiny_224", {"img_size": 128}, (3, 128, 128)),  # 27.7 M params
    "hieradet_sam2": ("sam2_hiera_tiny", {}, (3, 128, 128)),  # 26.9 M params
    "hrnet": ("hrnet_w18_small", {}, (3, 128, 128)),  # 13.2 M params
    "iformer": ("iformer_t", {}, (3, 128, 128)),  # 2.9 M params
    "inception_next": ("inception_next_atto", {}, (3, 128, 128)),  # 4.2 M params
    "inception_resnet_v2": ("inception_resnet_v2", {}, (3, 128, 128)),  # 55.8 M params
    "inception_v3": ("inception_v3", {}, (3, 128, 128)),  # 23.8 M params
    "inception_v4": ("inception_v4", {}, (3, 128, 128)),  # 42.7 M params
    "lcnetv2": ("lcnetv2_small", {}, (3, 128, 128)),  # 4.1 M params
    "levit": ("levit_128s", {"img_size": 128}, (3, 128, 128)),  # 7.8 M params
    "lowformer": ("lowformer_b0", {}, (3, 128, 128)),  # 14.1 M params
    "mambaout": ("test_mambaout", {}, (3, 128, 128)),  # 0.5 M params
    "maxxvit": ("test_coatnet", {"img_size": 128}, (3, 128, 128)),  # 0.6 M params
    "metaformer": ("poolformerv2_s12", {}, (3, 128, 128)),  # 11.9 M params
    "mlp_mixer": ("gmlp_ti16_224", {"img_size": 128}, (3, 128, 128)),  # 4.8 M params
    "mobilenetv3": ("mobilenetv3_small_050", {}, (3, 128, 128)),  # 1.6 M params
    "mobilenetv5": ("mobilenetv5_base", {}, (3, 128, 128)),  # 82.7 M params
    "mobilevit": ("mobilevit_xxs", {}, (3, 128, 128)),  # 1.3 M params
    "mvitv2": ("mvitv2_tiny", {}, (3, 128, 128)),  # 24.2 M params
    "naflexvit": ("naflexvit_base_patch16_parfac_gap", {"depth": 2}, (3, 128, 128)),  # 15.6 M params
    "nasnet": ("nasnetalarge", {"num_features": 768, "stem_size": 32}, (3, 128, 128)),  # 4.1 M params
    "nest": ("nest_tiny", {"img_size": 128}, (3, 128, 128)),  # 16.7 M params
    "nextvit": ("nextvit_small", {}, (3, 128, 128)),  # 31.8 M params
    "nfnet": ("test_nfnet", {}, (3, 128, 128)),  # 0.4 M params
    "pit": ("pit_ti_224", {"img_size": 128}, (3, 128, 128)),  # 4.8 M params
    "pnasnet": ("pnasnet5large", {}, (3, 128, 128)),  # 86.1 M params
    "pvt_v2": ("pvt_v2_b0", {}, (3, 128, 128)),  # 3.7 M params
    "qwen3_vit": ("qwen3_vit_88m", {"depth": 2}, (3, 128, 128)),  # 16.5 M params
    "rdnet": ("rdnet_tiny", {}, (3, 128, 128)),  # 23.9 M params
    "regnet": ("regnetx_002", {}, (3, 128, 128)),  # 2.7 M params
    "repghost": ("repghostnet_050", {}, (3, 128, 128)),  # 2.3 M params
    "repvit": ("repvit_m1", {}, (3, 128, 128)),  # 5.5 M params
    "res2net": ("res2next50", {}, (3, 128, 128)),  # 24.7 M params
    "resnest": ("resnest14d", {}, (3, 128, 128)),  # 10.6 M params
    "resnet": ("test_resnet", {}, (3, 128, 128)),  # 0.5 M params
    "resnetv2": ("resnetv2_18", {}, (3, 128, 128)),  # 11.7 M params
    "rexnet": ("rexnet_100", {}, (3, 128, 128)),  # 4.8 M params
    "selecsls": ("selecsls42", {}, (3, 128, 128)),  # 30.4 M params
    "senet": ("legacy_seresnet18", {}, (3, 128, 128)),  # 11.8 M params
    "sequencer": ("sequencer2d_s", {}, (3, 128, 128)),  # 27.6 M params
    "shvit": ("shvit_s1", {}, (3, 128, 128)),  # 6.3 M params
    "sknet": ("skresnet18", {}, (3, 128, 128)),  # 12.0 M params
    "starnet": ("starnet_s050", {}, (3, 128, 128)),  # 0.5 M params
    "swiftformer": ("swiftformer_xs", {}, (3, 128, 128)),  # 3.5 M params
    "swin_transformer": ("swin_tiny_patch4_window7_224", {"img_size": 128}, (3, 128, 128)),  # 28.3 M params
    "swin_transformer_v2": ("swinv2_tiny_window16_256", {"img_size": 128}, (3, 128, 128)),  # 28.4 M params
    "swin_transformer_v2_cr": ("swinv2_cr_tiny_224", {"img_size": 128}, (3, 128, 128)),  # 28.3 M params
    "tiny_vit": ("tiny_vit_5m_224", {}, (3, 128, 128)),  # 12.1 M params
    "tnt": ("tnt_s_legacy_patch16_224", {"img_size": 128}, (3, 128, 128)),  # 23.7 M params
    "tresnet": ("tresnet_m", {}, (3, 128, 128)),  # 31.4 M params
    "twins": ("twins_svt_small", {}, (3, 128, 128)),  # 24.1 M params
    "vgg": ("vgg11", {"mlp_ratio": 0.25}, (3, 128, 128)),  # 43.2 M params
    "visformer": ("visformer_tiny", {"img_size": 128}, (3, 128, 128)),  # 10.2 M params
    "vision_transformer": ("test_vit", {}, (3, 128, 128)),  # 0.4 M params
    "vision_transformer_hybrid": ("vit_tiny_r_s16_p8_224", {"img_size": 128}, (3, 128, 128)),  # 6.3 M params
    "vision_transformer_relpos": ("test_vit_relpos", {"img_size": 128}, (3, 128, 128)),  # 0.8 M params
    "vision_transformer_sam": ("samvit_base_patch16_224", {"depth": 2}, (3, 128, 128)),  # 15.5 M params
    "vitamin": ("vitamin_small_224", {"img_size": 128}, (3, 128, 128)),  # 22.1 M params
    "volo": ("volo_d1_224", {"img_size": 128}, (3, 128, 128)),  # 26.6 M params
    "vovnet": ("ese_vovnet19b_slim_dw", {}, (3, 128, 128)),  # 1.9 M params
    "xception": ("legacy_xception", {}, (3, 128, 128)),  # 22.9 M params
    "xception_aligned": ("xception41p", {}, (3, 128, 128)),  # 26.9 M params
    "xcit": ("xcit_nano_12_p8_224", {}, (3, 128, 128)),  # 3.0 M params
}
TIMM_EXCLUDED: dict[str, str] = {}


@dataclass
class ZooEntry:
    spec: str  # timm name or torchvision:NAME
    module: str  # timm module or "torchvision"
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: tuple[int, int, int] = (3, 64, 64)
    excluded: str | None = None  # reason, when the model is left out

    @property
    def label(self) -> str:
        if not self.kwargs:
            return self.spec
        args = ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.spec}({args})"


@dataclass
class ZooResult:
    entry: ZooEntry
    mode: str
    status: str
    sites: int = 0  # sites rewritten (pure + hybrid + prune)
    skipped: int = 0  # sites matched but skipped (with a reason in the report)
    macs_ratio: float = float("nan")
    untraced: int = 0  # parts of the model that could not be analysed
    seconds: float = 0.0
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES


def torchvision_entries() -> list[ZooEntry]:
    import torchvision

    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        out.append(ZooEntry(f"torchvision:{name}", "torchvision", dict(TORCHVISION_KWARGS.get(name, {})),
                            TORCHVISION_INPUT.get(name, (3, 64, 64)), TORCHVISION_EXCLUDED.get(name)))
    return out


def timm_entries() -> list[ZooEntry]:
    import timm

    out = []
    for module in timm.list_modules():
        if module in TIMM_PICKS:
            name, kwargs, size = TIMM_PICKS[module]
            out.append(ZooEntry(name, module, dict(kwargs), tuple(size), TIMM_EXCLUDED.get(module)))
        else:
            reason = TIMM_EXCLUDED.get(module, "new timm module: no model picked for it yet (add it to "
                                               "tests/zoo.py TIMM_PICKS)")
            out.append(ZooEntry(f"<{module}>", module, {}, (3, 64, 64), reason))
    return out


def all_entries() -> list[ZooEntry]:
    return torchvision_entries() + timm_entries()


class _Timeout(Exception):
    pass


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`_Timeout` in the main thread after ``seconds`` (SIGALRM; a no-op where unavailable)."""
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def handler(signum, frame):
        raise _Timeout(f"ran past {seconds:.0f} s")

    try:
        old = signal.signal(signal.SIGALRM, handler)
    except ValueError:  # not the main thread
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    msg = msg if len(msg) <= 200 else msg[:197] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _check_model(entry: ZooEntry, original: torch.nn.Module, source: Any, mode: str, example: torch.Tensor,
                 ref_shape: tuple[int, ...], workdir: Path, inplace: bool) -> ZooResult:
    import pixify
    from pixify.metrics import _logits

    t0 = time.perf_counter()
    stage = "convert"
    res = ZooResult(entry, mode, FAILED)
    try:
        converted, report = pixify.convert(original, mode=mode, example_input=example, source=source,
                                           inplace=inplace)
        res.sites = sum(report.count(a) for a in ("pure", "hybrid", "prune"))
        res.skipped = report.count("skip")
        res.macs_ratio = report.macs_ratio
        res.untraced = len(report.untraced)
        stage = "forward/backward"
        converted.train()
        batch = example.repeat(2, *([1] * (example.ndim - 1)))
        out = _logits(converted(batch))
        if tuple(out.shape[1:]) != ref_shape[1:] or out.shape[0] != 2:
            raise AssertionError(f"output shape {tuple(out.shape)}, expected {(2, *ref_shape[1:])}")
        out.float().sum().backward()
        grads = [p.grad for p in converted.parameters() if p.requires_grad]
        if not any(g is not None for g in grads):
            raise AssertionError("no parameter received a gradient")
        converted.zero_grad(set_to_none=True)
        del out, grads
        stage = "save/load"
        converted.eval()
        path = workdir / f"{entry.module}-{mode}.safetensors"
        pixify.save(converted, path)
        try:
            loaded = pixify.load(path)
        finally:
            path.unlink(missing_ok=True)
        with torch.no_grad():
            a, b = _logits(converted(example)), _logits(loaded(example))
        if not torch.equal(a, b):
            raise AssertionError(f"outputs differ after save/load (max |Δ| {float((a - b).abs().max()):.3g})")
        res.status = CONVERTED if res.sites else NO_SITE
    except _Timeout as exc:
        res.status, res.reason = TIMEOUT, f"{stage}: {exc}"
    except Exception as exc:  # every failure is named and counted
        res.status, res.reason = FAILED, f"{stage}: {_one_line(exc)}"
    res.seconds = time.perf_counter() - t0
    return res


def run_entry(entry: ZooEntry, modes: tuple[str, ...] = MODES, timeout: float = DEFAULT_TIMEOUT_S,
              workdir: str | Path | None = None) -> list[ZooResult]:
    """Build ``entry`` once and check it in each of ``modes``; never raises for a model's own failure."""
    if entry.excluded:
        return [ZooResult(entry, m, EXCLUDED, reason=entry.excluded) for m in modes]
    from pixify.graph import example_input_for
    from pixify.metrics import _logits
    from pixify.sources import create_model

    results: list[ZooResult] = []
    tmp = tempfile.TemporaryDirectory(prefix="pixify-zoo-") if workdir is None else None
    wd = Path(tmp.name if tmp else workdir)
    t0 = time.perf_counter()
    try:
        # eager kernels: a handful of one-off passes per model, where building a generated kernel for
        # every zeta and layout met would cost more than it saves (and count against the time limit);
        # tests/test_ops.py proves those kernels equal to the eager ones
        with warnings.catch_warnings(), _time_limit(timeout), eager_kernels():
            warnings.simplefilter("ignore")
            stage = "build"
            try:
                model, source = create_model(entry.spec, pretrained=False, kwargs=entry.kwargs)
                example = example_input_for(model, input_size=entry.input_size)
                stage = "original forward"
                with torch.no_grad():
                    ref_shape = tuple(_logits(model(example)).shape)
            except _Timeout as exc:
                return [ZooResult(entry, m, TIMEOUT, reason=f"{stage}: {exc}",
                                  seconds=time.perf_counter() - t0) for m in modes]
            except Exception as exc:
                return [ZooResult(entry, m, FAILED, reason=f"{stage}: {_one_line(exc)}",
                                  seconds=time.perf_counter() - t0) for m in modes]
            for i, mode in enumerate(modes):
                last = i == len(modes) - 1
                results.append(_check_model(entry, model, source, mode, example, ref_shape, wd, inplace=last))
                gc.collect()
    except _Timeout as exc:  # the alarm fired between two stages
        done = {r.mode for r in results}
        results += [ZooResult(entry, m, TIMEOUT, reason=str(exc)) for m in modes if m not in done]
    finally:
        if tmp is not None:
            tmp.cleanup()
        gc.collect()
    return results


def run_one(spec: str, mode: str = "squeeze", **kwargs: Any) -> ZooResult:
    """Check one model (a zoo spec, a timm name or ``torchvision:NAME``) in one mode."""
    entry = next((e for e in all_entries() if e.spec == spec), None) or ZooEntry(spec, "custom")
    return run_entry(entry, (mode,), **kwargs)[0]


def summarise(results: list[ZooResult]) -> dict[str, Any]:
    """Counts per library and mode: status → number of models, plus the reason of every other outcome."""
    out: dict[str, Any] = {}
    for r in results:
        lib = "torchvision" if r.entry.module == "torchvision" else "timm"
        key = f"{lib}/{r.mode}"
        d = out.setdefault(key, {"total": 0, "ok": 0, "statuses": {}, "other": []})
        d["total"] += 1
        d["ok"] += int(r.ok)
        d["statuses"][r.status] = d["statuses"].get(r.status, 0) + 1
        if not r.ok:
            d["other"].append((r.entry.label, r.status, r.reason))
    for d in out.values():
        d["ok_fraction"] = d["ok"] / d["total"] if d["total"] else math.nan
    return out
