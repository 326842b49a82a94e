"""Offline prompt parsing against expectations written by hand."""

import pytest

from diffattn.presets.text_tokenizers import build_clip_tokenizer
from diffattn.text import concept_words, noun_phrases, parse_noun_phrases, token_spans


PHRASES = [
    ("a red car and a white sheep", ["a red car", "a white sheep"], ["car", "sheep"]),
    ("A photo of a red cat sitting on a blue chair.", ["a photo", "a red cat", "a blue chair"], ["photo", "cat", "chair"]),
    ("a small green star to the left of a yellow triangle", ["a small green star", "a yellow triangle"], ["star", "triangle"]),
    ("A room with blue walls and a white sink", ["a room", "blue walls", "a white sink"], ["room", "walls", "sink"]),
    ("two dogs, three cats and a big bird", ["two dogs", "three cats", "a big bird"], ["dogs", "cats", "bird"]),
    ("an astronaut riding a horse on the moon", ["an astronaut", "a horse", "the moon"], ["astronaut", "horse", "moon"]),
    ("a cat and a cat", ["a cat", "a cat"], ["cat", "cat"]),
    ("a brown leather bag next to a shiny metal lamp", ["a brown leather bag", "a shiny metal lamp"], ["bag", "lamp"]),
]  # fmt: skip


@pytest.mark.parametrize("prompt, phrases, heads", PHRASES)
def test_noun_phrases_and_concepts(prompt, phrases, heads):
    assert noun_phrases(prompt) == phrases
    assert concept_words(prompt) == heads


def test_nested_phrases_are_flagged():
    parsed = parse_noun_phrases("a photo of a red cat on a blue chair", nested=True)
    assert [(p.text, p.nested) for p in parsed] == [
        ("a photo of a red cat", True),
        ("a photo", False),
        ("a red cat on a blue chair", True),
        ("a red cat", False),
        ("a blue chair", False),
    ]


def test_token_spans_count_bpe_pieces_and_repeats():
    tok = build_clip_tokenizer()  # knows "red", "cat", ...; spells unknown words in several pieces
    prompt = "a red zebra and a red cat"
    pieces = tok.tokenize("zebra")
    assert len(pieces) > 1
    # positions: 0 = start token, 1 "a", 2 "red", 3.. "zebra" pieces, then "and", "a", "red", "cat"
    zebra = (3, 3 + len(pieces))
    assert token_spans(tok, prompt, "zebra") == [zebra]
    assert token_spans(tok, prompt, "a red zebra") == [(1, zebra[1])]
    after = zebra[1]
    assert token_spans(tok, prompt, "red") == [(2, 3), (after + 2, after + 3)]
    assert token_spans(tok, prompt, "cat") == [(after + 3, after + 4)]
    ids = tok(prompt).input_ids
    assert tok.convert_ids_to_tokens(ids[after + 3 : after + 4]) == ["cat</w>"]
    with pytest.raises(ValueError, match="phrase='dog' does not occur"):
        token_spans(tok, prompt, "dog")


def test_parser_errors():
    with pytest.raises(ValueError, match="backend='nltk' is not allowed"):
        noun_phrases("a cat", backend="nltk")
    with pytest.raises(ValueError, match="has no words"):
        token_spans(build_clip_tokenizer(), "a cat", "!")
