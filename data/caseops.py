"""CaseOps: a lossless text transform that moves ASCII capitalization out of the words into operator
characters, so that a tokenizer spends no pieces on case variants ("The", "THE" and "the" share "the").

The operators are four private-use characters, reserved in the tokenizer as user-defined pieces:

    TITLE   U+E001  before a word: its first letter is uppercase
    ALLCAPS U+E002  before a word of two or more letters: every letter is uppercase
    CAPNEXT U+E003  inside a word: the next letter is uppercase
    ESC     U+E004  the next character is one of the four, literally (text that already holds them)

A word is a maximal run of ASCII letters A-Z a-z; in the transformed text every letter is lowercase.
A word is written as:
    all lowercase                          -> unchanged                       "cat"    -> "cat"
    two or more letters, all uppercase     -> ALLCAPS + lowercase             "NASA"   -> ALLCAPS "nasa"
    otherwise                              -> TITLE if the first letter is uppercase, then the lowercase
                                              letters, CAPNEXT before each later uppercase one
                                                                              "The"    -> TITLE "the"
                                                                              "A"      -> TITLE "a"
                                                                              "McDo"   -> TITLE "mc" CAPNEXT "do"
                                                                              "iPhone" -> "i" CAPNEXT "phone"
Every other character is copied unchanged, except the four operators, which are escaped (ESC + itself).

These are the rules of the public variant lossless_caps_caseops_v1 (the 2026-04-18..04-27 records'
tokenizer fineweb_8192_bpe_lossless_caps_caseops_v1_reserved): the same text gives the same
characters, so its tokenizer and shards and ours agree. Only ASCII letters are touched: a non-ASCII
letter (title-case U+01C5, sharp s and its capital U+1E9E, Turkish dotted capital I U+0130 and dotless
i U+0131, letters whose case forms differ in length) stays as it is and ends the ASCII word it
touches, and a combining mark is a character like any other. That is what makes the transform exactly
invertible for every string: no Unicode case mapping is ever applied.

decode() accepts exactly the strings encode() produces and raises CaseOpsError on anything else (an
uppercase ASCII letter, an operator in the wrong place, a word spelled in a non-canonical way such as
TITLE "a" CAPNEXT "b" for "AB"), so decode(encode(s)) == s for every s and encode(decode(t)) == t for
every t that decode accepts.

The tokenizer's normalization (nmt_nfkc) runs after the transform, as in the public pipeline. It never
touches the operators, but a compatibility character can become ASCII capitals that no operator marks
(U+01C5 "ǅ" becomes "Dž", a fullwidth "Ａ" becomes "A"): the tokenizer then sees them as they are, and
its decoded text is not always CaseOps text that decode() accepts. Scores are unaffected: they count the
original bytes (below), not the tokens' text.

Bytes. A score on CaseOps text must count the ORIGINAL text's UTF-8 bytes. original_bytes() gives, for
consecutive fragments of a transformed text (the stretches of text a tokenizer's pieces cover), the
original bytes of each: an operator counts 0, an escaped operator its 3 bytes, every other character
its UTF-8 length (a lowercased letter is as long as the capital it stands for).
token_original_bytes() cuts a document's text into its tokens' stretches with sentencepiece's offsets.

    python3 -c "from data.caseops import encode, decode; t = encode('The NASA iPhone'); print(repr(t), decode(t))"
"""

from __future__ import annotations

import re
from typing import Iterable

import numpy as np

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)  # in this order: the tokenizer's ids 4..7
# The public name of this transform (the text_transform of the public export's manifest).
TRANSFORM_NAME = "lossless_caps_caseops_v1"
OPERATOR_BYTES = len(TITLE.encode("utf-8"))  # every operator is 3 bytes of UTF-8

_OPS = "".join(OPERATORS)
_ENCODE_RE = re.compile(f"[A-Za-z]+|[{_OPS}]")
# One item of a transformed text: an escaped operator, a word in one of its canonical shapes, or a run of
# characters that are neither ASCII letters nor operators. Anything else is not CaseOps text.
_DECODE_RE = re.compile(
    f"{ESC}(?P<literal>[{_OPS}])"
    f"|{ALLCAPS}(?P<allcaps>[a-z]{{2,}})"
    f"|(?P<title>{TITLE})?(?P<word>[a-z](?:{CAPNEXT}?[a-z])*)"
    f"|(?P<other>[^A-Za-z{_OPS}]+)"
)
_OP_LEAD = tuple(TITLE.encode("utf-8")[:2])  # the UTF-8 of U+E001..U+E004: EE 80 81..84
_OP_LAST = tuple(op.encode("utf-8")[2] for op in OPERATORS)


class CaseOpsError(ValueError):
    """A string that encode() cannot have produced."""


def _encode_item(match: re.Match) -> str:
    word = match.group()
    if word in OPERATORS:
        return ESC + word
    if word.islower():
        return word
    lower = word.lower()
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + lower
    head = TITLE + lower[0] if word[0].isupper() else lower[0]
    return head + "".join(CAPNEXT + low if up.isupper() else low for up, low in zip(word[1:], lower[1:]))


def encode(text: str) -> str:
    """The CaseOps form of text."""
    return _ENCODE_RE.sub(_encode_item, text)


def decode(text: str) -> str:
    """The original text of a CaseOps string; CaseOpsError (with the position) if encode() cannot have
    produced it."""
    out: list[str] = []
    pos, word_ended_at = 0, -1
    while pos < len(text):
        m = _DECODE_RE.match(text, pos)
        if m is None:
            raise CaseOpsError(f"position {pos}: {text[pos:pos + 12]!r} is not CaseOps text (an uppercase ASCII "
                               f"letter, or an operator not followed by what it applies to)")
        if m.group("literal") is not None:
            out.append(m.group("literal"))
        elif m.group("other") is not None:
            out.append(m.group("other"))
        else:
            if word_ended_at == pos:  # two words back to back: encode() writes one word with CAPNEXT
                raise CaseOpsError(f"position {pos}: a word operator inside a word")
            if m.group("allcaps") is not None:
                out.append(m.group("allcaps").upper())
            else:
                word = _decode_word(m.group("word"), m.group("title") is not None)
                if len(word) >= 2 and word.isupper():
                    raise CaseOpsError(f"position {pos}: an all-caps word written letter by letter (ALLCAPS "
                                       f"is its only form)")
                out.append(word)
            word_ended_at = m.end()
        pos = m.end()
    return "".join(out)


def _decode_word(body: str, title: bool) -> str:
    letters, upper_next = [], title
    for ch in body:
        if ch == CAPNEXT:
            upper_next = True
            continue
        letters.append(ch.upper() if upper_next else ch)
        upper_next = False
    return "".join(letters)


def _marker_starts(raw: bytes) -> np.ndarray:
    """Byte offsets of the operators that act in UTF-8 CaseOps text: every operator but one that an ESC
    makes literal text. (0xEE starts a 3-byte character, so it is never inside another character.)"""
    a = np.frombuffer(raw, dtype=np.uint8)
    if len(a) < OPERATOR_BYTES:
        return np.zeros(0, dtype=np.int64)
    last = a[2:]
    starts = np.flatnonzero((a[:-2] == _OP_LEAD[0]) & (a[1:-1] == _OP_LEAD[1]) & (last >= _OP_LAST[0])
                            & (last <= _OP_LAST[-1]))
    is_esc = last[starts] == _OP_LAST[-1]
    if not is_esc.any():
        return starts
    keep, literal_at = [], None  # the offset the pending escape makes literal
    for start, esc in zip(starts.tolist(), is_esc.tolist()):
        if start == literal_at:
            literal_at = None
            continue
        if literal_at is not None:
            raise CaseOpsError(f"byte {literal_at - OPERATOR_BYTES}: an escape not followed by an operator")
        keep.append(start)
        if esc:
            literal_at = start + OPERATOR_BYTES
    if literal_at is not None:
        raise CaseOpsError(f"byte {literal_at - OPERATOR_BYTES}: an escape not followed by an operator")
    return np.asarray(keep, dtype=np.int64)


def _span_bytes(raw: bytes, bounds: np.ndarray, is_caseops: bool) -> np.ndarray:
    """Original bytes of each span [bounds[i], bounds[i+1]) of the UTF-8 text raw (bounds sorted, from 0 to
    len(raw)): its length, less 3 for each acting operator in it."""
    counts = np.diff(bounds)
    if is_caseops:
        markers = _marker_starts(raw)
        if len(markers):
            span = np.searchsorted(bounds, markers, side="right") - 1
            counts = counts - OPERATOR_BYTES * np.bincount(span, minlength=len(counts))
    return counts


def original_bytes(fragments: Iterable[str]) -> list[int]:
    """Original UTF-8 bytes of each of the consecutive fragments of a CaseOps text: operators 0, an
    escaped operator 3 (it is text), every other character its UTF-8 length. An escape may end one
    fragment and its operator start the next."""
    parts = [f.encode("utf-8", "surrogatepass") for f in fragments]
    bounds = np.concatenate([[0], np.cumsum([len(p) for p in parts], dtype=np.int64)])
    return _span_bytes(b"".join(parts), bounds, True).tolist()


def token_original_bytes(sp, text: str, is_caseops: bool = True) -> tuple[list[int], list[int]]:
    """(token ids, original bytes of each token) of one document as the tokenizer sp encodes it; text is
    the CaseOps form for a CaseOps tokenizer, else plain text (is_caseops False: plain UTF-8 lengths, an
    operator character being text like any other).

    A token counts the original bytes of the text it covers (sentencepiece's offsets, as the public export
    counts them). Text that no token covers, because the tokenizer's normalization dropped it (leading
    whitespace, a control character), counts with the next token that covers original bytes (the
    previous one at the end), never with an operator: so the counts add up to the document's original
    UTF-8 length, and operators count 0. A document that normalizes to nothing has no tokens and counts
    0. Needs sentencepiece's offsets, which come as a protobuf message (the protobuf package)."""
    return encoding_original_bytes(text, sp.encode(text, out_type="proto"), is_caseops)


def encoding_original_bytes(text: str, proto, is_caseops: bool = True) -> tuple[list[int], list[int]]:
    """token_original_bytes from an encoding already made: text and its sentencepiece proto (a batch of
    documents encodes faster at once: sp.encode(texts, out_type="proto", num_threads=n))."""
    pieces = proto.pieces
    raw = text.encode("utf-8", "surrogatepass")
    # The text cut as [gap before token 0, token 0, gap before token 1, token 1, ..., trailing gap].
    bounds = np.zeros(2 * len(pieces) + 2, dtype=np.int64)
    bounds[1:-1] = [offset for p in pieces for offset in (p.begin, p.end)]
    bounds[-1] = len(raw)
    backwards = np.flatnonzero(np.diff(bounds) < 0)
    if len(backwards):
        i = int(backwards[0])
        raise ValueError(f"token {max(0, (i - 1) // 2)}: offsets go back from {bounds[i]} to {bounds[i + 1]}")
    counts = _span_bytes(raw, bounds, is_caseops)
    own, gaps = counts[1::2].copy(), counts[0::2]
    with_text = np.flatnonzero(own > 0)
    gap_at = np.flatnonzero(gaps)
    if len(gap_at) and len(with_text):
        to = with_text[np.minimum(np.searchsorted(with_text, gap_at), len(with_text) - 1)]
        np.add.at(own, to, gaps[gap_at])
    return [p.id for p in pieces], own.tolist()
