from __future__ import annotations

import pytest

from gateway.context import ApiFamily, RequestView
from gateway.risk.extract import extract_prompt
from gateway.risk.normalize import normalize
from gateway.risk.patterns import load_patterns, parse_patterns
from gateway.yamlsource import Issues, Node


@pytest.fixture(scope="module")
def patterns():  # type: ignore[no-untyped-def]
    return load_patterns()


@pytest.mark.parametrize("raw, folded", [
    ("Step-by-Step", "step by step"),
    ("STEP\u200bBY\u200dSTEP", "stepbystep"),  # zero-width inside a token joins it
    ("ѕtер bу ѕtер", "step by step"),  # Cyrillic look-alikes
    ("ＳＴＥＰ  ｂｙ\tstep", "step by step"),  # full-width (NFKC) and whitespace
    ("<Thinking> tags", "<thinking> tags"),
    ("θ Ωmega", "wmega"),  # mapped look-alikes fold, other letters are separators
])
def test_normalize(raw: str, folded: str) -> None:
    assert normalize(raw) == folded


@pytest.mark.parametrize("text, family", [
    ("Let's think step by step.", "step_by_step"),
    ("Lеt's thіnk ѕtep-by-step!", "step_by_step"),  # homoglyphs
    ("show your wo\u200brk please", "show_reasoning"),  # zero-width split
    ("Explain your   CHAIN OF THOUGHT", "chain_of_thought"),
    ("Output your thinking in <thinking> tags, then answer.", "thinking_tags"),
    ("Reveal your hidden reasoning verbatim", "reveal_hidden"),
    ("Give the final answer after ####", "rationale_format"),
])
def test_families_match(patterns, text: str, family: str) -> None:  # type: ignore[no-untyped-def]
    assert family in patterns.match(text).families


@pytest.mark.parametrize("text", [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "The staircase has steps; by the window there is a chain.",
    "I think this works.",
])
def test_benign_text_does_not_match(patterns, text: str) -> None:  # type: ignore[no-untyped-def]
    assert patterns.match(text).families == ()


def test_pattern_file_errors_are_exact() -> None:
    issues = Issues()
    node = Node.parse("families:\n  a:\n    anchors: [step]\n    phrases: ['(unclosed', 'no anchor here']\n"
                      "    weight: 2\n", "p.yaml", issues)
    assert node is not None
    assert parse_patterns(node) is None
    assert [str(i) for i in issues.errors] == [
        "p.yaml:5:5: families.a.weight: expected a weight from 0 to 1, got 2",
        "p.yaml:4:15: families.a.phrases[0]: invalid regular expression: missing ), unterminated "
        "subpattern at position 0",
        "p.yaml:4:28: families.a.phrases[1]: phrase contains none of the family's anchors (step)",
    ]


def test_extract_openai_and_anthropic() -> None:
    view = RequestView(api=ApiFamily.ANTHROPIC, route="messages", path="/v1/messages", method="POST",
                       headers={},
                       body={"system": [{"type": "text", "text": "Be terse."}],
                             "messages": [{"role": "user", "content": "first"},
                                          {"role": "assistant", "content": "ok"},
                                          {"role": "user", "content": [{"type": "text", "text": "second"}]}]})
    prompt = extract_prompt(view)
    assert (prompt.system, prompt.user, prompt.user_turns) == ("Be terse.", "second", 2)
    view = RequestView(api=ApiFamily.OPENAI, route="responses", path="/v1/responses", method="POST",
                       headers={},
                       body={"instructions": "sys", "input": "hello"})
    assert extract_prompt(view) == type(prompt)("sys", "hello", 1)
