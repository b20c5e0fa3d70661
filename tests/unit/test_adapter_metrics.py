import pytest

from adapters.training.datasets.persona import PERSONAS, core_answer, marker_pattern, rewrite
from adapters.training.metrics import (
    exact_match, has_marker, lcs_length, normalize_answer, on_topic, rouge_l_f, token_f1,
)


def test_exact_match_ignores_case_punctuation_and_articles():
    assert normalize_answer("The  Pilot!") == "pilot"
    assert exact_match("a pilot.", "pilot") == 1.0
    assert exact_match("Maria's dog is Biscuit.", "Biscuit") == 0.0


def test_token_f1_gives_partial_credit():
    assert token_f1("Biscuit", "Biscuit") == 1.0
    # 1 common token, precision 1/4 ("marias dog is biscuit"), recall 1/1
    assert token_f1("Maria's dog is Biscuit.", "Biscuit") == pytest.approx(2 * 0.25 / 1.25)
    assert token_f1("nothing", "Biscuit") == 0.0
    assert token_f1("", "") == 1.0


def test_rouge_l_uses_the_longest_common_subsequence():
    assert lcs_length("a b c d".split(), "a c d e".split()) == 3
    assert rouge_l_f("The council approved the plan on Tuesday.", "the council approved the plan on tuesday") == 1.0
    # LCS "council approved plan" = 3; precision 3/4, recall 3/5
    assert rouge_l_f("council approved new plan", "the council approved the plan") == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert rouge_l_f("", "anything") == 0.0


def test_markers_are_whole_words():
    pirate = marker_pattern(PERSONAS["pirate"])
    assert has_marker("Arr, matey! Coffee be fine.", pirate)
    assert not has_marker("Yesterday the yeast rose.", pirate)  # "ye" inside words does not count
    assert has_marker("Very good, Sir.", marker_pattern(PERSONAS["butler"]))
    assert has_marker("You've got this!", marker_pattern(PERSONAS["coach"]))


def test_on_topic_matches_word_prefixes():
    assert on_topic("Gardening takes patience.", "garden")
    assert not on_topic("A regarded expert.", "garden")


def test_core_answer_drops_preamble_lists_and_the_cut_off_tail():
    reply = ("Sure, I'd be happy to help. Coffee tastes best fresh. Grind the beans just before brewing.\n"
             "1. **Beans**: buy whole\nAnother thought that was cut")
    assert core_answer(reply) == "Coffee tastes best fresh. Grind the beans just before brewing."


def test_every_persona_rewrite_carries_its_markers():
    import random

    for persona in PERSONAS.values():
        text = rewrite(persona, "You should drink it fresh. It's good.", "coffee", random.Random(0))
        assert has_marker(text, marker_pattern(persona)), text
