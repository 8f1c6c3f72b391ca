from __future__ import annotations

from gateway.risk.fingerprint import bands, fingerprint, mask, simhash

TEMPLATE = ("Solve the following problem carefully. {q} Think step by step and put the final answer "
            "after ####.")
QUESTIONS = [
    "Janet's ducks lay 16 eggs per day. She eats 3 for breakfast. How many are left?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total?",
    "Josh buys a house for $80,000 and puts in $50,000 in repairs. What is his profit?",
]


def test_mask_numbers_quotes_entities_urls() -> None:
    masked = mask('Tom paid $1,250.50 for "the red car" at https://x.example/a, said Alice.')
    assert "1,250" not in masked and "red car" not in masked and "Alice" not in masked
    assert "https" not in masked and masked.startswith("Tom paid")


def test_same_template_shares_an_id_across_questions() -> None:
    prints = [fingerprint("", TEMPLATE.format(q=q)) for q in QUESTIONS]
    heads = {dict(p.candidates)["head"] for p in prints}
    tails = {dict(p.candidates)["tail"] for p in prints}
    assert len(heads) == 1 and len(tails) == 1


def test_stable_under_number_and_entity_changes() -> None:
    a = fingerprint("You are a maths tutor for Acme Corp.",
                    "Yesterday Alice had 3 apples and gave Bob 2 of them.")
    b = fingerprint("You are a maths tutor for Zenith Ltd.",
                    "Yesterday Carol had 17 apples and gave Dan 9 of them.")
    assert a == b


def test_different_prompts_differ_and_short_ones_have_no_template() -> None:
    a = fingerprint("", "Write a haiku about the sea in winter please.")
    b = fingerprint("", "Summarise the attached quarterly report for the board.")
    assert a.primary != b.primary
    assert fingerprint("", "Thanks!").candidates == ()


def test_simhash_is_deterministic_and_near_duplicates_are_close() -> None:
    tokens = "please solve the following maths problem and explain every step".split()
    near = "please solve the following maths problem and explain each step".split()
    far = "write a limerick about a cat who lives on a boat in paris".split()
    assert simhash(tokens) == simhash(list(tokens))
    assert bin(simhash(tokens) ^ simhash(near)).count("1") < bin(simhash(tokens) ^ simhash(far)).count("1")
    assert len(bands(simhash(tokens))) == 4
