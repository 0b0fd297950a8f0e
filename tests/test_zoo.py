"""Model-zoo sweeps (marked slow, run in CI with ``pytest -m slow``).

Every torchvision classification model and one small model per timm module, converted in squeeze and in
prune mode: forward + backward with the right output shape, then a save/load round trip with identical
outputs in eval mode. See ``tests/zoo.py`` for the input sizes, constructor kwargs, time limits and the
exclusion lists with their reasons; ``examples/coverage.py`` prints the same sweep as a table.
"""

from __future__ import annotations

import math

import pytest

import zoo

pytestmark = pytest.mark.slow

ENTRIES = zoo.all_entries()


def _param(entry: zoo.ZooEntry):
    marks = [pytest.mark.skip(reason=f"excluded: {entry.excluded}")] if entry.excluded else []
    return pytest.param(entry, id=entry.label.replace(" ", ""), marks=marks)


@pytest.mark.parametrize("entry", [_param(e) for e in ENTRIES])
def test_model_converts_trains_and_round_trips(entry, tmp_path):
    results = zoo.run_entry(entry, timeout=zoo.DEFAULT_TIMEOUT_S, workdir=tmp_path)
    assert [r.mode for r in results] == list(zoo.MODES)
    bad = [f"{r.mode}: {r.status}: {r.reason}" for r in results if not r.ok]
    assert not bad, "; ".join(bad)
    for r in results:
        if r.status == zoo.CONVERTED:
            assert r.sites > 0 and r.macs_ratio < 1.0 + 1e-6, (r.mode, r.macs_ratio)
        else:
            assert r.sites == 0 and math.isclose(r.macs_ratio, 1.0, rel_tol=1e-6)


def test_every_timm_module_and_torchvision_model_is_accounted_for():
    import timm
    import torchvision

    tv = {e.spec.split(":", 1)[1] for e in ENTRIES if e.module == "torchvision"}
    assert tv == set(torchvision.models.list_models(module=torchvision.models))
    assert not any(e.excluded for e in ENTRIES if e.module == "torchvision"), "torchvision: 100% must run"
    modules = {e.module: e for e in ENTRIES if e.module != "torchvision"}
    assert set(modules) == set(timm.list_modules())
    excluded = {m: e.excluded for m, e in modules.items() if e.excluded}
    assert all(reason and len(reason) > 10 for reason in excluded.values())
    assert len(excluded) <= 0.05 * len(modules), excluded
    for m, e in modules.items():
        if not e.excluded:
            assert timm.is_model(e.spec), (m, e.spec)
            assert max(e.input_size[1:]) <= 224, (m, e.input_size)
