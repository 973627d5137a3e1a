"""Rule forms (Python, text, YAML, JSON) parse to the same rules; every bad input names its place."""
import json

import pytest

from fxcompress.errors import ConfigError
from fxcompress.rules import Field, RuleSchema, choice, integer, real, real_list

SCHEMA = RuleSchema("Demo.rules", [
    Field("granularity", choice("element", "kernel", "filter")),
    Field("sparsity", real_list(0.0, 1.0, hi_open=True)),
    Field("importance", choice("abs", "l1", "l2", allow_callable=True), default="abs"),
])
QUANT = RuleSchema("Quant.rules", [Field("method", choice("k-means", "linear")), Field("bits", integer(1, 16)),
                                   Field("scale", real(0.0), default=1.0)])
NAMES = ["fc1.weight", "fc2.weight", "fc3.weight"]
EXPECTED = [("fc1\\.weight", "element", (0.3, 0.5, 0.7), "abs"), ("fc.*", "filter", (0.5,), "l2")]


def as_tuples(ruleset):
    return [(r.pattern, r["granularity"], r["sparsity"], r["importance"]) for r in ruleset.rules]


def test_python_tuples_and_mappings():
    rules = SCHEMA.load([("fc1\\.weight", "element", [0.3, 0.5, 0.7]),
                         {"pattern": "fc.*", "granularity": "filter", "sparsity": 0.5, "importance": "l2"}])
    assert as_tuples(rules) == EXPECTED


def test_text_file_with_comments_blank_lines_and_lists(tmp_path):
    path = tmp_path / "prune.rule"
    path.write_text("# name granularity sparsities [importance]\n\n"
                    "fc1\\.weight  element 0.3,0.5,0.7   # first stage lists\n"
                    "fc.*\tfilter 0.5 l2\n")
    assert as_tuples(SCHEMA.load(path)) == EXPECTED
    assert SCHEMA.load(str(path)).rules[1].origin == "prune.rule:4"


def test_yaml_lists_and_mappings(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("- [fc1\\.weight, element, [0.3, 0.5, 0.7]]\n"
                    "- {pattern: fc.*, granularity: filter, sparsity: 0.5, importance: l2}\n")
    assert as_tuples(SCHEMA.load(path)) == EXPECTED


def test_json_lists_and_mappings(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps([["fc1\\.weight", "element", "0.3,0.5,0.7"],
                                {"pattern": "fc.*", "granularity": "filter", "sparsity": [0.5], "importance": "l2"}]))
    assert as_tuples(SCHEMA.load(path)) == EXPECTED


def test_first_matching_rule_wins_and_full_match_is_required():
    rules = SCHEMA.load(EXPECTED)
    assigned = rules.assign(NAMES)
    assert assigned["fc1.weight"].pattern == "fc1\\.weight"
    assert assigned["fc2.weight"]["granularity"] == "filter"
    assert rules.match("xfc1.weight") is None and SCHEMA.load([("fc1", "element", 0.5)]).match("fc1.weight") is None


def test_callable_importance_from_python_only(tmp_path):
    def score(w):
        return w.abs()
    assert SCHEMA.load([("fc1.weight", "element", 0.5, score)]).rules[0]["importance"] is score


def test_integer_and_default_fields():
    rule = QUANT.load([("fc1.weight", "k-means", "5")]).rules[0]
    assert rule["bits"] == 5 and rule["scale"] == 1.0


@pytest.mark.parametrize("line, message", [
    ("fc1.weight", "expected 3 to 4 fields"),
    ("fc1.weight element 0.5 abs extra", "expected 3 to 4 fields"),
    ("fc1.weight elementt 0.5", "field 'granularity': expected one of element"),
    ("fc1.weight element 1.5", "field 'sparsity': 1.5 is outside"),
    ("fc1.weight element 0.3,x", "field 'sparsity': expected a number"),
    ("fc1.weight element 0.5 l3", "field 'importance'"),
    ("fc1.weight( element 0.5", "not a valid regular expression"),
])
def test_bad_text_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.rule"
    path.write_text("# header\nfc2.weight element 0.5\n" + line + "\n")
    with pytest.raises(ConfigError, match="bad.rule:3: ") as info:
        SCHEMA.load(path)
    assert message in str(info.value)


def test_bad_integer_is_rejected():
    with pytest.raises(ConfigError, match="Quant.rules\\[0\\]: field 'bits': expected an integer"):
        QUANT.load([("fc1.weight", "linear", "4.5")])
    with pytest.raises(ConfigError, match="outside \\[1, 16\\]"):
        QUANT.load([("fc1.weight", "linear", 32)])


def test_pattern_matching_nothing_is_an_error():
    with pytest.raises(ConfigError, match="Demo.rules\\[1\\]: Demo.rules pattern 'conv.*' matches no name"):
        SCHEMA.load([("fc.*", "element", 0.5), ("conv.*", "element", 0.5)]).assign(NAMES)


@pytest.mark.parametrize("rule, message", [
    ({"pattern": "fc1.weight", "granularity": "element"}, "missing field 'sparsity'"),
    ({"pattern": "fc1.weight", "granularity": "element", "sparsity": 0.5, "bits": 3}, "unknown field(s) bits"),
    ({"granularity": "element", "sparsity": 0.5}, "pattern must be a non-empty string"),
    ("fc1.weight element 0.5", "a rule must be a tuple"),
    (("fc1.weight", "element", []), "expected at least one value"),
    (("fc1.weight", "element", True), "expected a number"),
])
def test_bad_python_rules(rule, message):
    with pytest.raises(ConfigError, match="Demo.rules\\[0\\]") as info:
        SCHEMA.load([rule])
    assert message in str(info.value)


def test_bad_sources(tmp_path):
    with pytest.raises(ConfigError, match="must be a list of rules or a path"):
        SCHEMA.load(42)
    with pytest.raises(ConfigError, match="does not exist"):
        SCHEMA.load(tmp_path / "missing.rule")
    (tmp_path / "r.json").write_text('{"a": 1}')
    with pytest.raises(ConfigError, match="r.json: expected a list of rules"):
        SCHEMA.load(tmp_path / "r.json")
    (tmp_path / "s.json").write_text('[["fc1.weight", "element"\n')
    with pytest.raises(ConfigError, match="s.json:2: not valid JSON"):
        SCHEMA.load(tmp_path / "s.json")


def test_bad_yaml_items_name_their_line(tmp_path):
    path = tmp_path / "r.yml"
    path.write_text("- [fc1.weight, element, 0.5]\n\n- [fc2.weight, nope, 0.5]\n")
    with pytest.raises(ConfigError, match="r.yml:3: field 'granularity'"):
        SCHEMA.load(path)
    path.write_text("- [fc1.weight, element, 0.5\n- x: [\n")
    with pytest.raises(ConfigError, match="r.yml:.*not valid YAML"):
        SCHEMA.load(path)


def test_a_rule_every_name_of_which_an_earlier_rule_takes_is_an_error_naming_both_lines(tmp_path):
    # first match wins, so a specific rule after a general one would silently never apply
    path = tmp_path / "prune.rule"
    path.write_text("# general first\nfc.*  element 0.25\nfc2\\.weight  element 0.75\n")
    with pytest.raises(ConfigError, match=r"prune.rule:3: .*'fc2\\\\.weight' never applies: .*\(fc2.weight\) "
                                          r"is taken by the earlier rule at prune.rule:2"):
        SCHEMA.load(path).assign(NAMES)
    # the specific rule first is the working order: each rule wins some name
    path.write_text("fc2\\.weight  element 0.75\nfc.*  element 0.25\n")
    assigned = SCHEMA.load(path).assign(NAMES)
    assert assigned["fc2.weight"]["sparsity"] == (0.75,) and assigned["fc1.weight"]["sparsity"] == (0.25,)


@pytest.mark.parametrize("name, text", [("empty.rule", "# every rule commented out\n# fc1.weight element 0.5\n\n"),
                                        ("empty.json", "[]"), ("empty.yaml", "[]\n")])
def test_a_rule_file_holding_no_rule_is_an_error_naming_the_file(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=rf"{name}: Demo.rules rule file holds no rule"):
        SCHEMA.load(tmp_path / name)


def test_an_empty_rule_list_is_an_error():
    with pytest.raises(ConfigError, match=r"Demo.rules is an empty list, so it would select nothing"):
        SCHEMA.load([])


@pytest.mark.parametrize("name, text, where, value", [
    ("q.rule", "fc1.weight linear 4\nfc2.weight linear inf\n", "q.rule:2", "'inf'"),
    ("q.json", '[["fc1.weight", "linear", 4],\n ["fc2.weight", "linear", Infinity]]', "q.json: rule 2", "inf"),
    ("q.yaml", "- [fc1.weight, linear, 4]\n- [fc2.weight, linear, .nan]\n", "q.yaml:2", "nan"),
])
def test_an_infinite_or_nan_integer_is_refused_at_its_line(tmp_path, name, text, where, value):
    # int(inf) raises OverflowError, which used to escape without the rule's place
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=rf"{where}: field 'bits': expected an integer, got {value}"):
        QUANT.load(tmp_path / name)
    with pytest.raises(ConfigError, match=r"Quant.rules\[0\]: field 'bits': expected an integer, got inf"):
        QUANT.load([("fc1.weight", "linear", float("inf"))])
