"""``TextMemos.analyse``: the remembered pattern hit and fingerprint of a whole prompt."""

from __future__ import annotations

from gateway.risk.fingerprint import fingerprint
from gateway.risk.patterns import load_patterns
from gateway.risk.signals import TextMemos

TEMPLATE = "Solve the following problem. {q} Let's think step by step and show your work after ####."


def test_analyse_equals_the_plain_computation_and_remembers_it() -> None:
    patterns, memos = load_patterns(), TextMemos()
    prompts = [("", TEMPLATE.format(q=f"What is {i} + {i}?")) for i in range(5)]
    prompts += [("You are a careful tutor. Explain your reasoning.", "Hi there. How are tides made?"),
                ("", "hello"), ("", ""), ("Only a system prompt here, nothing else at all.", "")]
    for system, user in prompts * 2:
        hit, fp = memos.analyse(patterns, system, user)
        expected = fingerprint(system, user) if system or user else fingerprint("", "")
        assert hit == patterns.match(f"{system}\n{user}" if system else user)
        assert fp == expected
    assert memos.prompts.misses == len(prompts) and memos.prompts.hits == len(prompts)


def test_analyse_keys_keep_system_and_user_apart() -> None:
    patterns, memos = load_patterns(), TextMemos()
    split_one = memos.analyse(patterns, "Think step by step.", " Then answer the question about the sea.")
    split_two = memos.analyse(patterns, "Think step by step. Then answer", " the question about the sea.")
    assert memos.prompts.misses == 2  # same concatenated text, two different prompts
    assert split_one[1] != split_two[1]


def test_analyse_forgets_entries_of_another_pattern_set() -> None:
    memos = TextMemos()
    first, second = load_patterns(), load_patterns()
    memos.analyse(first, "", "Let's think step by step about the tides tonight.")
    memos.analyse(first, "", "Let's think step by step about the tides tonight.")
    assert memos.prompts.hits == 1
    memos.analyse(second, "", "Let's think step by step about the tides tonight.")
    assert memos.prompts.hits == 0 and memos.prompts.misses == 1 and len(memos.prompts) == 1


def test_analyse_does_not_keep_huge_prompts() -> None:
    patterns, memos = load_patterns(), TextMemos()
    memos.analyse(patterns, "", "word " * 2000)
    assert len(memos.prompts) == 0
