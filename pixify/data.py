"""Data for fine-tuning and evaluation, through timm's pipeline.

``prepare_data`` validates a data folder up front (it exists, holds images, every image decodes), tells
labelled ImageFolder trees (one sub-folder per class) from flat folders of unlabelled images, and
``create_loader`` turns it into a timm ``ImageDataset`` + ``create_loader`` with the transforms resolved
from the model's ``pretrained_cfg`` (``resolve_data_config``). Other timm sources (``torch/NAME``,
``hfds/NAME``, ``wds/NAME``, tar files) pass through to ``timm.data.create_dataset`` unchecked.

Every problem a user can cause is a one-line :class:`~pixify.errors.PixifyError`.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from timm.data import ImageDataset
from timm.data.readers.img_extensions import get_img_extensions
from torch import nn

from .errors import PixifyError
from .schema import CROP_PCT_RANGE, MEAN_RANGE, STD_RANGE

__all__ = ["DataSource", "prepare_data", "resolve_data_config", "create_loader", "read_batches", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = tuple(sorted(get_img_extensions()))  # what timm's folder reader picks up
_TRAIN_SPLITS = ("train", "training")
_EVAL_SPLITS = ("validation", "val", "valid", "eval", "evaluation", "test")


@dataclass
class DataSource:
    """A validated data source: where it is, whether it has labels, its classes and its size."""

    root: str
    name: str = ""  # timm dataset name ('' = ImageFolder / tar, else e.g. 'torch/cifar10')
    labelled: bool = True
    classes: list[str] = field(default_factory=list)
    num_images: int | None = None
    split: str = "train"

    def describe(self) -> str:
        n = f"{self.num_images} images" if self.num_images is not None else "images"
        kind = f"{len(self.classes)} classes" if self.labelled and self.classes else (
            "labelled" if self.labelled else "unlabelled")
        return f"{Path(self.root).name or self.root}: {n}, {kind}"  # no absolute path in logs


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _search_split(root: Path, split: str) -> Path:
    """timm's convention: ``root/train`` for training, ``root/val`` (or validation, test...) for evaluation."""
    names = _TRAIN_SPLITS if split == "train" else _EVAL_SPLITS
    for n in names:
        if (root / n).is_dir():
            return root / n
    return root


def _check_image(path: str) -> str | None:
    """None when the image decodes, else the reason. JPEGs decode at reduced size (draft mode)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (64, 64))
            im.load()
            if im.width < 1 or im.height < 1:
                return "empty image"
    except Exception as exc:  # PIL raises many types for bad files
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return text
    return None


def _check_images(files: Sequence[str], workers: int) -> None:
    if not files:
        return
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for path, reason in zip(files, pool.map(_check_image, files, chunksize=64)):
            if reason is not None:
                raise PixifyError(f"cannot decode image {path}: {reason}",
                                  "remove or replace the file (or pass --no-check-images to skip the scan)")


def prepare_data(path: str | Path, *, split: str = "train", dataset: str = "", labelled: bool | None = None,
                 check_images: bool = True, workers: int = 4, what: str = "data") -> DataSource:
    """Validate a data source and describe it.

    Args:
        path: an ImageFolder tree (``root/CLASS/img.png``), a flat folder of unlabelled images, a folder
            with ``train/`` and ``val/`` sub-folders (``split`` picks one), a ``.tar`` of images, or the
            root of a timm dataset named by ``dataset``.
        split: ``"train"`` or ``"val"``: which split folder to use when ``path`` has them.
        dataset: a timm dataset name (``torch/cifar10``, ``hfds/...``); ``""`` for folders and tar files.
        labelled: force labels on/off; by default a tree with class folders is labelled and a flat folder
            of images is not.
        check_images: decode every image once (JPEGs at reduced size) so a corrupt file fails now, with
            its name, instead of being skipped silently in the middle of training.
        what: how to name the source in error messages (``--data``, ``--val-data``).
    """
    if path is None or str(path).strip() == "":
        raise PixifyError(f"no {what} given", "pass a folder of images")
    p = Path(path).expanduser()
    if dataset:
        if not p.exists():
            raise PixifyError(f"{what} root {path} does not exist")
        return DataSource(str(p), dataset, labelled if labelled is not None else True, [], None, split)
    if not p.exists():
        raise PixifyError(f"{what} folder not found: {path}")
    if p.is_file():
        if p.suffix.lower() != ".tar":
            raise PixifyError(f"{what} {path} is a file", "give a folder of images (ImageFolder tree) or a .tar of images")
        return DataSource(str(p), "", labelled if labelled is not None else True, [], None, split)
    p = _search_split(p, split)
    top: list[str] = []
    by_class: dict[str, list[str]] = {}
    visited: dict[tuple[int, int], str] = {}
    for root, dirs, files in os.walk(p, followlinks=True):
        dirs.sort()
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in visited:  # a link back to a folder already read: a loop or a duplicate
            raise PixifyError(f"{what} folder {p} reaches {visited[(st.st_dev, st.st_ino)]} a second time through "
                              f"the symbolic link {root}", "remove the link (a loop or a duplicate)")
        visited[(st.st_dev, st.st_ino)] = root
        imgs = [os.path.join(root, f) for f in sorted(files) if _is_image(f)]
        if not imgs:
            continue
        rel = os.path.relpath(root, p)
        if rel == ".":
            top.extend(imgs)
        else:
            # timm's ImageFolder reader labels an image by the leaf name of its folder
            by_class.setdefault(os.path.basename(root), []).extend(imgs)
    n = len(top) + sum(len(v) for v in by_class.values())
    if n == 0:
        raise PixifyError(f"{what} folder {p} holds no images",
                          f"expected class folders of images or a folder of images ({', '.join(IMAGE_EXTENSIONS)})")
    if top and by_class:
        raise PixifyError(f"{what} folder {p} mixes images at its top level with class folders",
                          "use one folder per class, or a flat folder of unlabelled images")
    is_labelled = bool(by_class) if labelled is None else labelled
    if labelled and not by_class:
        raise PixifyError(f"{what} folder {p} has no class folders, so it has no labels",
                          "drop --labelled or arrange the images as ROOT/CLASS/IMAGE")
    if check_images:
        _check_images(top + [f for v in by_class.values() for f in v], workers)
    from timm.data.readers.reader_image_folder import natural_key

    classes = sorted(by_class, key=natural_key) if is_labelled else []
    return DataSource(str(p), "", is_labelled, classes, n, split)


INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")


def resolve_data_config(model: nn.Module, input_size: Sequence[int] | None = None, *, mean: Sequence[float] | None = None,
                        std: Sequence[float] | None = None, crop_pct: float | None = None,
                        interpolation: str | None = None) -> dict[str, Any]:
    """The model's preprocessing: timm's ``resolve_data_config`` on its ``pretrained_cfg``, adapted.

    What is not given comes from the recipe's ``data_config`` (the preprocessing given to ``convert`` or
    ``finetune`` earlier, remembered in the checkpoint), then, for the input size, the recipe's conversion
    input shape, then the pretrained_cfg. mean/std are cut to the number of input channels (a 1-channel
    model gets their average).
    """
    from timm.data import resolve_data_config as timm_resolve

    args: dict[str, Any] = {}
    recipe = getattr(model, "pixify_recipe", None) or {}
    remembered = recipe.get("data_config") if isinstance(recipe.get("data_config"), dict) else {}
    input_size = input_size if input_size is not None else remembered.get("input_size")
    mean = mean if mean is not None else remembered.get("mean")
    std = std if std is not None else remembered.get("std")
    crop_pct = crop_pct if crop_pct is not None else remembered.get("crop_pct")
    interpolation = interpolation or remembered.get("interpolation")
    if input_size is None:
        shape = recipe.get("input_shape") or []
        if len(shape) == 4:
            input_size = tuple(int(s) for s in shape[1:])
    if input_size is not None:
        input_size = tuple(int(s) for s in input_size)
        if len(input_size) != 3 or any(s < 1 for s in input_size):
            raise PixifyError(f"input size must be C,H,W positive integers, got {input_size}")
        from .validate import check_input_size

        check_input_size(input_size)
        args["input_size"] = input_size
    if interpolation:
        if interpolation not in INTERPOLATIONS:
            raise PixifyError(f"unknown interpolation '{interpolation}'", f"use one of: {', '.join(INTERPOLATIONS)}")
        args["interpolation"] = interpolation
    if crop_pct is not None:
        lo, hi = CROP_PCT_RANGE
        if not (isinstance(crop_pct, (int, float)) and lo <= crop_pct <= hi):
            raise PixifyError(f"--crop-pct must be in [{lo}, {hi}], got {crop_pct}")
        args["crop_pct"] = crop_pct
    cfg = timm_resolve(args, model=model) if hasattr(model, "pretrained_cfg") else timm_resolve(
        args, pretrained_cfg={"input_size": input_size or (3, 224, 224)})
    chans = cfg["input_size"][0]
    for key, given in (("mean", mean), ("std", std)):
        vals = tuple(float(v) for v in (given if given is not None else cfg[key]))
        lo, hi = STD_RANGE if key == "std" else MEAN_RANGE
        if not all(lo <= v <= hi for v in vals):  # NaN fails too
            raise PixifyError(f"--{key} values must be in [{lo:g}, {hi:g}], got {', '.join(f'{v:g}' for v in vals)}")
        if len(vals) == 1:
            vals = vals * chans
        elif len(vals) != chans:
            if chans == 1:
                vals = (sum(vals) / len(vals),)
            else:
                raise PixifyError(f"{key} has {len(vals)} values but the model takes {chans} channels")
        cfg[key] = vals
    return cfg


PREPROCESSING_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation")


def user_data_config(model: nn.Module, data_config: Any) -> dict[str, Any]:
    """A data config given in Python (``finetune(data_config=...)``, ``evaluate(data_config=...)``), checked
    and completed like the command line's options: what it leaves out comes from the model."""
    if not isinstance(data_config, dict):
        raise PixifyError(f"data_config must be a dict of preprocessing options, got {type(data_config).__name__}")
    unknown = sorted(set(data_config) - set(PREPROCESSING_KEYS) - {"crop_mode"})
    if unknown:
        raise PixifyError(f"data_config has unknown keys: {', '.join(map(str, unknown))}",
                          f"use {', '.join(PREPROCESSING_KEYS)}")
    try:
        size = data_config.get("input_size")
        return resolve_data_config(model, tuple(size) if size is not None else None, mean=data_config.get("mean"),
                                   std=data_config.get("std"), crop_pct=data_config.get("crop_pct"),
                                   interpolation=data_config.get("interpolation"))
    except (TypeError, ValueError) as exc:
        raise PixifyError(f"data_config is not valid: {exc}") from None


def remembered_preprocessing(data_config: dict[str, Any]) -> dict[str, Any]:
    """The part of a data config that a checkpoint remembers (JSON: tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()
            if k in PREPROCESSING_KEYS and v is not None}


def create_dataset(source: DataSource, channels: int, training: bool):
    """A timm dataset for ``source`` (images read as 'L' for 1-channel models, else 'RGB'); an image folder's
    dataset stops at an image it cannot open or decode instead of skipping it (:func:`_strict`)."""
    import timm.data

    mode = "L" if channels == 1 else "RGB"
    try:
        ds = timm.data.create_dataset(source.name, root=source.root, split=source.split, search_split=False,
                                      is_training=training, input_img_mode=mode)
    except PixifyError:
        raise
    except Exception as exc:
        raise PixifyError(f"timm cannot read the dataset {source.name or source.root}: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    return _strict(ds)


_SKIP = threading.local()  # a strict dataset's read in progress: timm's skip note is its reason


class _SkipNote(logging.Filter):
    """Takes timm's "Skipped sample" log note during a strict read: it becomes the error's reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(_SKIP, "active", False):
            return True
        _SKIP.reason = record.getMessage()
        return False


def _strict(ds: Any) -> Any:
    """timm's image dataset skips an image it cannot open or decode, with a log note, and trains on the next
    one; pixify stops instead, with the file and the reason (one line through :func:`read_batches`), as it
    does when the folder is scanned up front. Other datasets are returned as they are."""
    if type(ds) is not ImageDataset:
        return ds
    logger = logging.getLogger("timm.data.dataset")
    if not any(isinstance(f, _SkipNote) for f in logger.filters):
        logger.addFilter(_SkipNote())
    ds.__class__ = _StrictImageDataset
    return ds


class _StrictImageDataset(ImageDataset):
    """timm's ``ImageDataset``; an image that cannot be opened or decoded raises ``OSError`` naming it."""

    def __getitem__(self, index: int) -> Any:
        self._max_retries = 1
        _SKIP.active, _SKIP.reason = True, None
        try:
            return super().__getitem__(index)
        except RuntimeError:
            if _SKIP.reason is None:
                raise
            reason = _SKIP.reason.split(". ", 1)[-1]  # "Skipped sample (index 3). cannot identify image ..."
            try:
                name = self.reader.filename(index)
            except Exception:  # noqa: BLE001 - the name is a courtesy
                name = f"image {index}"
            raise OSError(f"cannot read {name}: {reason}") from None
        finally:
            _SKIP.active = False


def _quiet_when_parent_leaves(previous, kind, exc, tb):
    if issubclass(kind, (EOFError, ConnectionError)):
        return
    previous(kind, exc, tb)


def _worker_init(timm_init, worker_id: int) -> None:
    """Runs in each data-loading process. When the main process is interrupted (Ctrl-C) while it fetches a
    batch's shared memory from a worker, the worker's multiprocessing resource-sharer thread loses its
    connection mid-handshake and prints a traceback through ``sys.excepthook``; the worker has nothing
    left to report then (its real errors reach the main process through the loader), so such connection
    losses are not printed. Everything else still is."""
    sys.excepthook = functools.partial(_quiet_when_parent_leaves, sys.excepthook)
    if timm_init is not None:
        timm_init(worker_id)


def create_loader(source: DataSource, data_config: dict[str, Any], batch_size: int, *, training: bool,
                  augment: bool = False, workers: int = 2, distributed: bool = False, device: str = "cpu",
                  seed: int = 0):
    """A timm loader: shuffled, drop-last and (with ``augment``) timm's training transforms when training;
    ordered with the evaluation transforms otherwise. No prefetcher: batches come as CPU tensors."""
    import timm.data

    ds = create_dataset(source, data_config["input_size"][0], training)
    if len(ds) == 0:
        raise PixifyError(f"the dataset at {source.root} is empty")
    if training and len(ds) < batch_size and not distributed:
        batch_size = len(ds)
    loader = timm.data.create_loader(
        ds, input_size=data_config["input_size"], batch_size=batch_size, is_training=training,
        no_aug=not augment, interpolation=data_config["interpolation"], mean=data_config["mean"],
        std=data_config["std"], crop_pct=data_config["crop_pct"], crop_mode=data_config.get("crop_mode"),
        num_workers=workers, distributed=distributed, pin_memory=str(device).startswith("cuda"),
        use_prefetcher=False, persistent_workers=False,
        device=torch.device(device),
    )
    loader.worker_init_fn = functools.partial(_worker_init, loader.worker_init_fn)
    sampler = getattr(loader, "sampler", None)
    if distributed and hasattr(sampler, "seed"):
        sampler.seed = seed  # DistributedSampler shuffles with seed + epoch
    if training and len(loader) == 0:
        raise PixifyError(f"the dataset at {source.root} has fewer images ({len(ds)}) than one batch per process",
                          "lower --batch-size")
    return loader


def _start(loader: Any) -> Iterator[Any]:
    import signal
    import threading

    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        return iter(loader)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a Ctrl-C that came meanwhile is raised now


def read_batches(loader: Any) -> Iterator[Any]:
    """The batches of ``loader``; an error while reading them (an image that cannot be opened, such as one
    larger than PIL will decode, or a worker that died) is a one-line :class:`PixifyError` instead of the
    loader's traceback (a worker's error arrives with its traceback inside the message: its last line is the
    reason).

    Starting the iterator forks the loader's worker processes; a Ctrl-C that lands inside ``fork()`` is
    swallowed by Python ("Exception ignored in ... _releaseLock") and the run would go on. SIGINT is held
    back while they start and delivered right after."""
    it = _start(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except PixifyError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the image library or a worker raised: one line
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            reason = lines[-1] if lines else type(exc).__name__
            raise PixifyError(f"cannot read the data: {reason[:300]}",
                              "keep the image scan on (--check-images) to find the file") from None
        yield batch
