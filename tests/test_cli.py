import json
import subprocess
import sys

import pytest
import torch

import pixify
from pixify.cli import main

BAD_RULES_SYNTAX = '[[rule]]\nname = "x\n'
BAD_RULES_KEY = ('[[rule]]\nname = "x"\ndescription = "d"\nmode = "squeeze"\npattern = ["conv2d"]\n'
                 'colour = "red"\n')


def _run(args, capsys):
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def _files(tmp_path):
    rules_syntax = tmp_path / "syntax.toml"
    rules_syntax.write_text(BAD_RULES_SYNTAX)
    rules_key = tmp_path / "key.toml"
    rules_key.write_text(BAD_RULES_KEY)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"__metadata__\":")
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    return rules_syntax, rules_key, truncated, foreign


BAD = [
    (["convert", "resnet5000"], "unknown model 'resnet5000'"),
    (["convert", "torchvision:resnet5000"], "unknown torchvision model"),
    (["convert", "resnet50", "--zeta", "0"], "zeta must be"),
    (["convert", "resnet50", "--zeta", "-1"], "zeta must be"),
    (["convert", "resnet50", "--zeta", "1.5"], "zeta must be"),
    (["convert", "resnet50", "--zeta", "x"], "zeta must be"),
    (["convert", "resnet50", "--tau", "1.2"], "tau must be in (0, 1)"),
    (["convert", "resnet50", "--rules", "{syntax}"], "syntax.toml:2"),
    (["convert", "resnet50", "--rules", "{key}"], "unknown key 'colour'"),
    (["inspect", "{trunc}"], "not a readable safetensors"),
    (["inspect", "{foreign}"], "not a pixify checkpoint"),
    (["convert", "{foreign}"], "is a file, not a model name"),
    (["convert", "resnet50", "--no-pretrained", "-o", "{missing}/out.safetensors"], "does not exist"),
    (["convert", "resnet50", "--mode", "sideways"], "unknown mode"),
    (["convert", "resnet50", "--preset", "nonsense"], "unknown preset"),
    (["convert", "resnet50", "--preset", "paper", "--zeta", "2"], "fixes ζ"),
    (["convert", "resnet50", "--input-size", "3,a"], "--input-size"),
    (["convert"], "Missing argument"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_inputs_one_line_exit_2_no_output(tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    syntax, key, trunc, foreign = _files(tmp_path)
    subst = {"syntax": syntax, "key": key, "trunc": trunc, "foreign": foreign, "missing": tmp_path / "nope"}
    args = [a.format(**subst) for a in args]
    before = set(tmp_path.iterdir())
    rc, out, err = _run(args, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0]
    assert "Traceback" not in err
    assert set(tmp_path.iterdir()) == before  # no output file, no temporary left behind


def test_convert_writes_checkpoint_and_json(tmp_path, capsys):
    out = tmp_path / "r50.safetensors"
    rc, stdout, err = _run(["convert", "resnet50", "--zeta", "2", "--no-pretrained", "-o", str(out), "--json",
                            "--input-size", "3,64,64"], capsys)
    assert rc == 0, err
    data = json.loads(stdout)
    assert data["counts"] == {"pure": 3, "hybrid": 12, "skip": 0}
    assert data["output"] == str(out) and out.is_file()
    recipe = pixify.read_recipe(out)
    assert recipe["source"] == {"library": "timm", "name": "resnet50", "kwargs": {}, "weights": "random",
                                "sha256": None, "seed": 0}
    # inspect reads it back
    rc, stdout, err = _run(["inspect", str(out), "--json"], capsys)
    assert rc == 0 and json.loads(stdout)["counts"]["hybrid"] == 12


def test_pretrained_offline_error_names_the_alternatives(tmp_path, capsys, monkeypatch):
    import pixify.sources as s

    monkeypatch.setattr(s, "_hub_reachable", lambda: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(["convert", "resnet18"], capsys)
    assert rc == 2
    assert "could not fetch pretrained weights for 'resnet18'" in err and "--no-pretrained" in err
    assert "--weights FILE" in err and list(tmp_path.glob("*.safetensors")) == []


def test_rules_command_lists_builtin_rules(capsys):
    rc, out, err = _run(["rules"], capsys)
    assert rc == 0 and "conv1x1-squeeze" in out and "paper-resnet-bottleneck-conv1" in out


def test_a_bug_in_a_command_surfaces_as_itself(monkeypatch):
    """An unexpected exception (a bug, not a user error) propagates unchanged, with its traceback."""
    import pixify.rules

    def broken():
        raise RuntimeError("planted bug")

    monkeypatch.setattr(pixify.rules, "all_rules", broken)
    with pytest.raises(RuntimeError, match="planted bug"):
        main(["rules"])


@pytest.mark.parametrize("cmd", ["convert", "inspect", "rules"])
def test_every_command_help_shows_an_example(capsys, cmd):
    rc, out, err = _run([cmd, "--help"], capsys)
    assert rc == 0 and "Example: pixify " + cmd in out


def test_console_script_real_process(tmp_path):
    """The installed entry point: real exit code and a one-line error on stderr."""
    r = subprocess.run([sys.executable, "-m", "pixify.cli", "convert", "resnet50", "--zeta", "0"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: zeta must be 'auto' or an integer >= 1, got 0"]
    r = subprocess.run([sys.executable, "-m", "pixify.cli", "--debug", "convert", "resnet50", "--zeta", "0"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_help_and_import_do_not_import_timm_or_torchvision():
    # timm imports torchvision, which imports torch._dynamo: about half of `pixify --help` on this machine.
    # They are imported where a model is built or analysed, not on import.
    code = ("import sys; from pixify.cli import main; rc = main(['--help']); "
            "assert rc == 0, rc; print(sorted(m for m in ('timm', 'torchvision', 'torch._dynamo') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"
