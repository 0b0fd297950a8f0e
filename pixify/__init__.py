"""pixify: rewrite the channel-squeezing layers of PyTorch vision models into Pick-or-Mix (PiX) modules.

Public API::

    model, report = pixify.convert(model, zeta="auto")   # or zeta=2, preset="paper"
    report = pixify.inspect(model)                          # dry run
    pixify.save(model, "model.safetensors")                 # weights + recipe, atomic
    model = pixify.load("model.safetensors")                # rebuild, re-apply, load strictly
    result = pixify.finetune("model.safetensors", "train/") # distil the original back into it
    metrics = pixify.evaluate(result.checkpoint, "val/")    # top-1/top-5, agreement with the original
    pixify.export("model.safetensors", "model.onnx")        # ONNX or .pt2, checked against eager
"""

__version__ = "0.1.0"


def _install_import_interrupt() -> None:
    """Run as the ``pixify`` command, a Ctrl-C while torch and the model libraries are still being imported
    (the first second or two) would end in Python's traceback of the import: say one line and exit 130
    instead (nothing has been written yet). The command restores Python's own handler before it runs."""
    import os
    import signal
    import sys

    def interrupted(signum, frame):
        os.write(2, b"interrupted; nothing was written\n")
        os._exit(130)

    orig = list(getattr(sys, "orig_argv", []))
    as_module = "-m" in orig[:-1] and orig[orig.index("-m") + 1] in ("pixify", "pixify.cli")  # python -m pixify
    command = os.path.basename(sys.argv[0] if sys.argv else "") == "pixify" or as_module
    if command and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupted)
        interrupted.pixify_import_handler = True


_install_import_interrupt()

from .checkpoint import load, read_recipe, save  # noqa: E402
from .conversion import ConversionReport, convert, inspect, recalibrate_batchnorm  # noqa: E402
from .deploy import ExportReport, export  # noqa: E402
from .errors import CheckpointError, PixifyError, PixifyWarning, RuleError  # noqa: E402
from .ops import PiX, pix, pick_or_mix  # noqa: E402
from .rewrite import PiXBlock  # noqa: E402
from .rules import Rule, builtin_rules, register_rule  # noqa: E402
from .sources import Source, create_model  # noqa: E402
from .training import FinetuneConfig, FinetuneResult, evaluate, finetune  # noqa: E402

__all__ = [
    "__version__", "convert", "inspect", "save", "load", "read_recipe", "create_model", "recalibrate_batchnorm",
    "ConversionReport", "PiX", "PiXBlock", "pix", "pick_or_mix", "Rule", "register_rule", "builtin_rules",
    "Source", "PixifyError", "PixifyWarning", "RuleError", "CheckpointError", "finetune", "evaluate",
    "FinetuneConfig", "FinetuneResult", "export", "ExportReport",
]
