import pytest

from pixify.errors import RuleError
from pixify.rules import active_rules, builtin_rules, load_rules_file, parse_rules, register_rule, unregister_rule

GOOD = '''
[[rule]]
name = "mine"
description = "1x1 squeezes in layer3 only"
mode = "squeeze"
pattern = ["conv2d", "norm?", "act?"]
kernel_size = 1
groups = 1
min_ratio = 1.0
min_spatial = 2
include = ["layer3.*"]
'''


def test_builtin_rules_are_shipped_and_valid():
    names = [r.name for r in builtin_rules()]
    assert "conv1x1-squeeze" in names and "linear-token-squeeze" in names
    assert all(r.digest and r.description for r in builtin_rules())
    # a preset's rules are exclusive, the default set excludes them
    default = [r.name for r in active_rules("squeeze")]
    assert "paper-resnet-bottleneck-conv1" not in default
    assert [r.name for r in active_rules("squeeze", "paper")] == ["paper-resnet-bottleneck-conv1"]


def test_parse_good_file(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text(GOOD)
    (rule,) = load_rules_file(f)
    assert rule.name == "mine" and rule.include == ("layer3.*",)
    assert rule.names_match("layer3.0.conv1") and not rule.names_match("layer2.0.conv1")


def test_syntax_error_names_file_and_line(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text(GOOD.replace('mode = "squeeze"', 'mode = "squeeze'))
    with pytest.raises(RuleError) as e:
        load_rules_file(f)
    assert e.value.line == 5 and "bad.toml:5" in str(e.value) and "syntax" in str(e.value)


def test_unknown_key_names_its_line(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text(GOOD.replace("groups = 1", "grups = 1"))
    with pytest.raises(RuleError) as e:
        load_rules_file(f)
    assert e.value.line == 8 and "unknown key 'grups'" in str(e.value)


@pytest.mark.parametrize("change,needle", [
    (('mode = "squeeze"', 'mode = "shrink"'), "mode must be one of"),
    (('pattern = ["conv2d", "norm?", "act?"]', 'pattern = ["pool"]'), "pattern must start"),
    (('pattern = ["conv2d", "norm?", "act?"]', 'pattern = ["conv2d", "act?", "norm?"]'), "in that order"),
    (("kernel_size = 1", 'kernel_size = "1"'), "'kernel_size' must be int"),
    (("min_ratio = 1.0", "min_ratio = -2"), "'min_ratio' must be > 0"),
    (('name = "mine"\n', ""), "missing required key 'name'"),
])
def test_invalid_rules_are_rejected(change, needle):
    with pytest.raises(RuleError, match=needle):
        parse_rules(GOOD.replace(*change), "x.toml")


def test_empty_and_foreign_documents():
    with pytest.raises(RuleError, match="no \\[\\[rule\\]\\]"):
        parse_rules("# nothing\n", "x.toml")
    with pytest.raises(RuleError, match="unknown top-level key 'tool'"):
        parse_rules("[tool]\nx = 1\n", "x.toml")


def test_register_rule_adds_to_active_set():
    register_rule({"name": "api-rule", "description": "d", "mode": "squeeze", "pattern": ["conv2d"],
                   "kernel_size": 1, "min_ratio": 1.0, "min_spatial": 2, "include": ["nowhere.*"]})
    try:
        assert "api-rule" in [r.name for r in active_rules("squeeze")]
        with pytest.raises(RuleError, match="already registered"):
            register_rule({"name": "api-rule", "description": "d", "mode": "squeeze", "pattern": ["conv2d"]})
    finally:
        unregister_rule("api-rule")
    assert "api-rule" not in [r.name for r in active_rules("squeeze")]
