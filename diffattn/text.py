"""Prompt parsing that works offline: noun phrases, their head nouns, and their CLIP token positions.

The default parser is rule-based, with a small bundled lexicon: a prompt is split into words, words are split into
chunks at boundary words (prepositions, conjunctions, verbs and auxiliaries, punctuation), and each chunk minus its
leading non-nominal words is a base noun phrase whose last word is the head noun. With `nested=True`, phrases
joined by "of" or a preposition are also returned whole ("a photo of a red cat"), as a constituency parse would
nest them (StructureDiffusion keeps every noun phrase of the parse tree). When spaCy and an English model are
installed, `backend="spacy"` uses spaCy's noun chunks instead. Everywhere, callers may give phrases or token
positions explicitly instead of parsing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache


DETERMINERS = frozenset(
    "a an the this that these those some any each every either neither no another other such what which whose my "
    "your his her its our their one two three four five six seven eight nine ten several many few both all".split()
)
PREPOSITIONS = frozenset(
    "of on in at near beside besides behind above below under over underneath beneath by from to into onto inside "
    "outside across through against along among around between with without within atop toward towards upon "
    "beyond past like via next front top left right".split()
)
CONJUNCTIONS = frozenset("and or but nor while as than".split())
VERBS = frozenset(
    "is are was were be been being am has have had do does did can could will would shall should may might must "
    "sits sit stands stand lies lie looks look holds hold wears wear rides ride eats eat plays play flies fly runs "
    "run walks walk jumps jump sleeps sleep swims swim made covered filled painted parked placed standing sitting "
    "lying holding wearing riding eating playing flying running walking jumping sleeping swimming looking resting "
    "floating hanging growing leaning reading drinking driving".split()
)
# Words that can open a noun phrase but never end one (a phrase needs a noun after them).
MODIFIERS = frozenset(
    "red green blue yellow orange purple pink black white brown gray grey golden silver beige teal cyan magenta "
    "big small large tiny little huge giant tall short long old new young round square wooden metal metallic "
    "glass plastic stone leather paper furry fluffy shiny dark bright light colorful cute beautiful".split()
)
# Modifiers that are nouns too: one that ends a phrase is its head ("a blue square", "a glass on a stone").
NOUN_MODIFIERS = frozenset("square glass stone metal paper leather light".split())
BOUNDARIES = PREPOSITIONS | CONJUNCTIONS | VERBS
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*|[^\sa-z0-9]", re.IGNORECASE)


@dataclass(frozen=True)
class NounPhrase:
    """A phrase of the prompt: its text, its word span [start, end) and head noun; `nested` if built from others."""

    text: str
    start: int
    end: int
    head: str
    nested: bool = False


def words(prompt: str) -> list[str]:
    """The prompt's words and punctuation, lowercased, in order (CLIP's pre-tokenisation splits the same way)."""
    return [w.lower() for w in _WORD.findall(prompt)]


def _is_word(token: str) -> bool:
    return token[0].isalnum()


def plain_words(text: str) -> list[str]:
    """`words` without the punctuation: "A red circle." -> ["a", "red", "circle"]."""
    return [w for w in words(text) if _is_word(w)]


def _base_phrases(tokens: list[str]) -> list[NounPhrase]:
    phrases, start = [], 0
    for i in range(len(tokens) + 1):
        if i == len(tokens) or tokens[i] in BOUNDARIES or not _is_word(tokens[i]):
            chunk = list(range(start, i))
            while chunk and tokens[chunk[-1]] in DETERMINERS | MODIFIERS and len(chunk) > 1:
                if tokens[chunk[-1]] in NOUN_MODIFIERS:
                    break  # "a blue square": the last word is the noun
                chunk.pop()  # "a big" before a boundary has no noun; keep only if nothing else is left
            if chunk and not (tokens[chunk[-1]] in DETERMINERS and len(chunk) == 1):
                s, e = chunk[0], chunk[-1] + 1
                phrases.append(NounPhrase(" ".join(tokens[s:e]), s, e, tokens[e - 1]))
            start = i + 1
    return phrases


def parse_noun_phrases(prompt: str, *, nested: bool = False, backend: str = "rules") -> list[NounPhrase]:
    """Noun phrases with word spans, in order of appearance (nested ones after the base phrases they join)."""
    if backend not in ("rules", "spacy"):
        raise ValueError(f"backend={backend!r} is not allowed: expected 'rules' or 'spacy'")
    tokens = words(prompt)
    base = _spacy_phrases(prompt, tokens) if backend == "spacy" else _base_phrases(tokens)
    if not nested:
        return base
    joined = []
    for left, right in zip(base, base[1:]):
        between = tokens[left.end : right.start]
        if len(between) == 1 and between[0] in PREPOSITIONS:  # "a photo of a cat", "a cup on a table"
            joined.append(NounPhrase(" ".join(tokens[left.start : right.end]), left.start, right.end, left.head, True))
    return sorted(base + joined, key=lambda p: (p.start, -p.end))


def noun_phrases(prompt: str, *, nested: bool = False, backend: str = "rules") -> list[str]:
    """'a red car and a white sheep' -> ['a red car', 'a white sheep'] (lowercased, punctuation dropped)."""
    return [p.text for p in parse_noun_phrases(prompt, nested=nested, backend=backend)]


def concept_words(prompt: str, *, backend: str = "rules") -> list[str]:
    """The head noun of each base noun phrase: 'a red car and a white sheep' -> ['car', 'sheep']."""
    return [p.head for p in parse_noun_phrases(prompt, backend=backend)]


@lru_cache(maxsize=1)
def _spacy_model():
    try:
        import spacy
    except ImportError:
        raise ValueError("backend='spacy' needs spaCy and an English model (pip install spacy)") from None
    for name in ("en_core_web_sm", "en_core_web_md", "en_core_web_lg"):
        try:
            return spacy.load(name)
        except OSError:
            continue
    raise ValueError("backend='spacy' found no English spaCy model (en_core_web_sm/md/lg)")


def _spacy_phrases(prompt: str, tokens: list[str]) -> list[NounPhrase]:
    doc = _spacy_model()(prompt)
    phrases, cursor = [], 0
    for chunk in doc.noun_chunks:
        chunk_words = words(chunk.text)
        for s in range(cursor, len(tokens) - len(chunk_words) + 1):
            if tokens[s : s + len(chunk_words)] == chunk_words:
                phrases.append(NounPhrase(" ".join(chunk_words), s, s + len(chunk_words), chunk.root.text.lower()))
                cursor = s + len(chunk_words)
                break
    return phrases


def token_spans(tokenizer, prompt: str, phrase: str) -> list[tuple[int, int]]:
    """Token positions [start, end) of every occurrence of `phrase` (words) in the tokenised `prompt`.

    Positions count the start token, as the text encoder's output does (position 0 is <|startoftext|>). Words that
    the BPE splits into several pieces span all their pieces; a repeated phrase gives one span per occurrence.
    Works for any tokenizer whose pre-tokenisation splits on words and punctuation (CLIP, SDXL's two).
    """
    prompt_words, target = words(prompt), words(phrase)
    if not any(_is_word(t) for t in target):
        raise ValueError(f"phrase={phrase!r} has no words")
    offsets, position = [], 1  # after the start token
    for word in prompt_words:
        offsets.append(position)
        position += len(tokenizer.tokenize(word))
    offsets.append(position)
    spans = []
    for s in range(len(prompt_words) - len(target) + 1):
        if prompt_words[s : s + len(target)] == target:
            spans.append((offsets[s], offsets[s + len(target)]))
    if not spans:
        raise ValueError(f"phrase={phrase!r} does not occur in prompt={prompt!r}")
    limit = getattr(tokenizer, "model_max_length", None)
    if limit and spans[0][0] >= limit - 1:
        raise ValueError(f"phrase={phrase!r} lies past the tokenizer's {limit}-token limit")
    return spans


def word_token_positions(tokenizer, prompt: str, words_: list[str]) -> list[int]:
    """The last token position of each word in `prompt` (its head token, where a concept's attention is read); a word
    named twice takes its next occurrence. Raises if a word is missing or named more often than it occurs."""
    positions, used = [], {}
    for word in words_:
        spans = token_spans(tokenizer, prompt, word)
        occurrence = used.get(word, 0)
        if occurrence >= len(spans):
            raise ValueError(f"word {word!r} occurs {len(spans)} time(s) in prompt={prompt!r}, named more often")
        used[word] = occurrence + 1
        positions.append(spans[occurrence][1] - 1)
    return positions
