"""Offline prompt parsing against expectations written by hand."""

import pytest

from diffattn.presets.text_tokenizers import build_clip_tokenizer
from diffattn.text import concept_words, noun_phrases, parse_noun_phrases, token_spans


PHRASES = [
    ("a red car and a white sheep", ["a red car", "a white sheep"], ["car", "sheep"]),
    ("A photo of a red cat sitting on a blue "
     "chair.", ["a photo", "a red cat", "a blue chair"], ["photo", "cat", "chair"]),
    ("a small green star to the left of a yellow triangle", ["a small green "
                                                             "star", "a yellow triangle"], ["star", "triangle"]),
    ("A room with blue walls and a white sink", ["a room", "blue walls", "a white sink"], ["room", "walls", "sink"]),
    ("two dogs, three cats and a big bird", ["two dogs", "three cats", "a big bird"], ["dogs", "cats", "bird"]),
    ("an astronaut riding a horse on the "
     "moon", ["an astronaut", "a horse", "the moon"], ["astronaut", "horse", "moon"]),
    ("a cat and a cat", ["a cat", "a cat"], ["cat", "cat"]),
    ("a brown leather bag next to a shiny metal lamp", ["a brown leather bag", "a shiny metal lamp"], ["bag", "lamp"]),
    # modifiers that are nouns too, at the end of a phrase (the shapes-sd prompts)
    ("a red circle and a blue square", ["a red circle", "a blue square"], ["circle", "square"]),
    ("a blue square and a red square", ["a blue square", "a red square"], ["square", "square"]),
    ("a glass on a stone", ["a glass", "a stone"], ["glass", "stone"]),
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


def test_spacy_backend_aligns_noun_chunks_to_words(monkeypatch):
    """spaCy is not installed here: a stand-in module with spaCy's interface (load -> nlp -> doc.noun_chunks with
    .text and .root) checks how the backend maps chunks onto the prompt's words, against hand-written phrases."""
    import sys
    import types

    from diffattn import text

    class Chunk:
        def __init__(self, chunk_text, root):
            self.text, self.root = chunk_text, types.SimpleNamespace(text=root)

    chunks = {"A red car, and a white Sheep!": [Chunk("A red car", "car"), Chunk("a white Sheep", "Sheep")]}
    fake = types.ModuleType("spacy")
    fake.load = lambda name: lambda prompt: types.SimpleNamespace(noun_chunks=chunks[prompt])
    monkeypatch.setitem(sys.modules, "spacy", fake)
    text._spacy_model.cache_clear()
    try:
        phrases = text.parse_noun_phrases("A red car, and a white Sheep!", backend="spacy")
        assert [(p.text, p.start, p.end, p.head) for p in phrases] == [
            ("a red car", 0, 3, "car"),
            ("a white sheep", 5, 8, "sheep"),
        ]
        assert text.concept_words("A red car, and a white Sheep!", backend="spacy") == ["car", "sheep"]
        fake.load = lambda name: (_ for _ in ()).throw(OSError(name))  # spaCy without an English model
        text._spacy_model.cache_clear()
        with pytest.raises(ValueError, match="found no English spaCy model"):
            text.noun_phrases("a cat", backend="spacy")
    finally:
        text._spacy_model.cache_clear()


def test_plain_words_are_the_words_without_punctuation():
    from diffattn.text import plain_words

    assert plain_words("A red circle, and a blue-green star.") == [
        "a",
        "red",
        "circle",
        "and",
        "a",
        "blue-green",
        "star",
    ]
