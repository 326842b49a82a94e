"""Tokenizers built locally for the tiny presets: CLIP (byte-level BPE), T5 (unigram) and Llama (BPE).

Nothing here touches a hub. Each tokenizer covers every character (so any prompt tokenizes) and knows a few
hundred whole words, so attention maps over a prompt's tokens read as words, not letters.
"""

from __future__ import annotations

from functools import lru_cache


# Words the tiny tokenizers know whole: the vocabulary of typical diffusion prompts.
PROMPT_WORDS: tuple[str, ...] = tuple(
    """
    a an the of and with on in at to by for from near next behind above below under over left right top bottom
    photo picture painting drawing image portrait close up view scene style render detailed realistic high quality
    cat dog bird horse cow sheep fish rabbit bear lion tiger elephant monkey fox wolf deer duck frog turtle
    man woman boy girl child person people astronaut robot knight king queen chef doctor student
    car bus truck bike bicycle boat ship train plane airplane rocket
    house building city street road bridge tower castle church room kitchen garden park forest tree trees
    flower flowers rose grass field mountain mountains hill river lake sea ocean beach sand desert snow sky cloud
    clouds sun moon star stars rain sunset sunrise night day water fire ice stone rock wood
    apple banana orange lemon cake bread cup bowl plate bottle glass vase book chair table bed sofa lamp clock
    hat shirt dress shoes bag ball box
    red green blue yellow purple pink black white brown gray grey golden silver
    big small large tiny little tall short long old new young happy sad cute beautiful bright dark colorful
    circle square triangle cube sphere shape
    running sitting standing walking flying swimming eating playing sleeping holding wearing riding
    is are two three one four many some
    """.split()
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-character table: every byte gets a visible character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _train_bpe_merges(words: list[list[str]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Plain BPE training until no pair is left, so every training word ends as one token.

    Encoding applies merges in the order learned, which reproduces the training segmentation; that is why the
    merges are learned rather than written word by word (hand-written merges collide: "at" would split "cat").
    Ties between equally frequent pairs go to the lexicographically smallest, so the result is deterministic.
    """
    words = [list(w) for w in words if len(w) > 1]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in words:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        joined = best[0] + best[1]
        vocab.setdefault(joined, len(vocab))
        for i, symbols in enumerate(words):
            out, j = [], 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == best:
                    out.append(joined)
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            words[i] = out
        words = [w for w in words if len(w) > 1]


@lru_cache(maxsize=None)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    byte_chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for ch in byte_chars:
        vocab[ch] = len(vocab)
    for ch in byte_chars:
        vocab[ch + "</w>"] = len(vocab)
    merges = _train_bpe_merges([list(w[:-1]) + [w[-1] + "</w>"] for w in PROMPT_WORDS], vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def build_clip_tokenizer(model_max_length: int = 77):
    """A `transformers.CLIPTokenizer` with ~1.5k tokens; pads to `model_max_length` like SD's."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)


def build_t5_tokenizer(model_max_length: int = 512):
    """A `transformers.T5Tokenizer` (unigram): whole words score higher than the characters that spell them."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = {p for p, _ in pieces}
    for word in PROMPT_WORDS:
        piece = "\u2581" + word
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, -2.0))
    for code in list(range(32, 127)):
        for piece in (chr(code), "\u2581" + chr(code)):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -8.0))
    pieces.append(("\u2581", -6.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def build_llama_tokenizer(model_max_length: int = 1024):
    """A `transformers.LlamaTokenizer` (sentencepiece-style BPE with the \u2581 word marker)."""
    from transformers import LlamaTokenizer

    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "\u2581": 4}
    for code in range(32, 127):
        vocab.setdefault(chr(code), len(vocab))
    merges = _train_bpe_merges([["\u2581"] + list(w) for w in PROMPT_WORDS], vocab)
    return LlamaTokenizer(vocab=vocab, merges=merges, pad_token="<pad>", model_max_length=model_max_length)
