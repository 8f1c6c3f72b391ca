"""gateway.yamlsource: libyaml composes what the pure-Python parser would, with the same marks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway import yamlsource
from gateway.yamlsource import Issues, Node

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*ROOT.glob("policies/*.yaml"), ROOT / "config.example.yaml", ROOT / "keys.example.yaml"])


def _flatten(node: Node) -> list[tuple[str, str, object]]:
    """Every node's key path, mark and value, depth first."""
    out = [(node.path, str(node.mark), node.value)]
    if node.is_mapping:
        for _, child in node.items():
            out += _flatten(child)
    elif node.is_list:
        for child in node.elements():
            out += _flatten(child)
    return out


@pytest.mark.skipif(not hasattr(yaml, "CSafeLoader"), reason="PyYAML built without libyaml")
@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_libyaml_and_pure_python_give_the_same_values_and_marks(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = path.read_text()
    assert yamlsource._LOADER.__name__ == "CSafeLoader"  # what a PyYAML wheel brings
    fast = Node.parse(text, path.name, Issues())
    monkeypatch.setattr(yamlsource, "_LOADER", yaml.SafeLoader)
    pure = Node.parse(text, path.name, Issues())
    assert fast is not None and pure is not None
    assert _flatten(fast) == _flatten(pure)


def test_a_syntax_error_is_worded_by_the_pure_python_parser() -> None:
    issues = Issues()
    assert Node.parse("a: {b: 1\n", "bad.yaml", issues) is None
    [issue] = issues.errors
    assert str(issue) == "bad.yaml:2:1: invalid YAML: expected ',' or '}', but got '<stream end>'"


def test_scalars_keep_their_yaml_types() -> None:
    node = Node.parse("a: 1\nb: 1.5\nc: true\nd: 2025-01-31\ne: '1'\nf: null\n", "t.yaml", Issues())
    assert node is not None
    assert node.value["a"] == 1 and node.value["b"] == 1.5 and node.value["c"] is True
    assert str(node.value["d"]) == "2025-01-31" and node.value["e"] == "1" and node.value["f"] is None
