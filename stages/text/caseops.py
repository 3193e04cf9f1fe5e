"""CaseOps: a lossless rewrite that moves letter case out of the words and into operator characters.

Why: "The", "THE" and "the" are three different strings to a BPE tokenizer, so case splits the
vocabulary and the statistics. Rewriting each ASCII word as lowercase plus an operator saying how to
re-capitalise it lets the tokenizer and the model share one piece per word (the challenge's
lossless_caps_caseops_v1 tokenizer, as used by PR #1855).

The operators are Private Use Area characters (U+E001..U+E004, the code points the challenge's
CaseOps tokenizer reserves), so they never clash with real text; a literal one in the input is
escaped. The rewrite is a bijection: `decode(encode(s)) == s` for every string.

BPB must still be measured in bytes of the *original* text: `original_byte_counts` charges each
token the original UTF-8 bytes it stands for (operators cost 0), which is what the byte sidecar stores.
`TRANSFORM` bundles all this for pgolf.text.tokenizer, which takes it as a value (it never imports this
module: scoring a blob needs the sidecar, not the transform, so this is data-prep code only).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from pgolf.errors import PgolfError
from pgolf.text.tokenizer import TextTransform, charge_bytes, user_defined_pieces

TITLE = "\ue001"  # next letter is uppercase (a capitalised word, or the first letter of a mixed-case one)
ALLCAPS = "\ue002"  # every letter of the following ASCII letter run is uppercase
CAPNEXT = "\ue003"  # next letter is uppercase (inside a mixed-case word)
ESC = "\ue004"  # next character is literal (an operator character that was in the input)
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
TRANSFORM_NAME = "caseops_v1"

# A maximal ASCII letter run holding an uppercase letter (all-lowercase runs stay as they are, and
# are never handed to Python), or an operator character that must be escaped.
_WORD_OR_OPERATOR = re.compile("(?<![A-Za-z])[A-Za-z]*[A-Z][A-Za-z]*|[" + "".join(OPERATORS) + "]")


def _is_letter(ch: str) -> bool:
    return ("a" <= ch <= "z") or ("A" <= ch <= "Z")


def _encode_word(word: str) -> str:
    lower = word.lower()
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + lower
    if word[0].isupper() and (len(word) == 1 or word[1:].islower()):
        return TITLE + lower
    # mixed case: TITLE for an uppercase first letter, CAPNEXT before every later uppercase letter
    out = [TITLE if word[0].isupper() else "", lower[0]]
    out += [CAPNEXT + c.lower() if c.isupper() else c for c in word[1:]]
    return "".join(out)


def encode(text: str) -> str:
    """The case-transformed text. Only maximal runs of ASCII letters and operator characters change."""
    def sub(m: re.Match) -> str:
        s = m.group()
        return ESC + s if s in OPERATORS else _encode_word(s)

    return _WORD_OR_OPERATOR.sub(sub, text)


def decode(text: str) -> str:
    """The exact inverse of `encode`. ValueError for an operator with nothing to act on."""
    out: list[str] = []
    upper_next = allcaps = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            out.append(ch)
            escaped = allcaps = False
        elif ch == ESC:
            escaped = True
        elif ch in (TITLE, CAPNEXT, ALLCAPS):
            if i + 1 == len(text) or not _is_letter(text[i + 1]):
                raise ValueError(f"case operator U+{ord(ch):04X} at {i} is not followed by an ASCII letter")
            upper_next, allcaps = ch != ALLCAPS, ch == ALLCAPS
        elif _is_letter(ch):
            out.append(ch.upper() if upper_next or allcaps else ch)
            upper_next = False
        else:
            out.append(ch)
            allcaps = False  # ALLCAPS covers one letter run only
    if escaped:
        raise ValueError("escape operator at the end of the text")
    return "".join(out)


# An operator is EE 80 81..84 in UTF-8; UTF-8 is self-synchronising, so these byte patterns match
# exactly the operator characters. An escape with the operator it protects is matched as one unit.
_OPERATOR_BYTES = re.compile(rb"\xee\x80\x84(?:\xee\x80[\x81-\x84])?|\xee\x80[\x81-\x83]")


def byte_costs(transformed: str) -> np.ndarray:
    """Per UTF-8 byte of the transformed text, the original bytes it stands for (0 or 1).

    This replays the decoder: an original character and its transformed form have the same UTF-8
    length (case does not change an ASCII letter's size), except that operators are inserted. So
    every byte costs 1 except those of an operator (the escape included), which cost 0; an escaped
    operator is a literal original character and keeps its 3 bytes. Sum = len(decode(t).encode()).
    """
    raw = transformed.encode("utf-8")
    costs = np.ones(len(raw), dtype=np.int64)
    for m in _OPERATOR_BYTES.finditer(raw):
        costs[m.start():m.start() + 3] = 0  # the operator (or the escape) only, not what it escapes
    return costs


def original_byte_counts(transformed: str, ends: Sequence[int]) -> np.ndarray:
    """Original UTF-8 bytes charged to each SentencePiece piece of `transformed`, from the pieces' span ends.

    `ends` are the pieces' span ends (proto `piece.end`: byte offsets into the transformed text). They
    are mapped to original-byte offsets and charged by tokenizer.charge_bytes' rule, so the counts sum
    to the original text's UTF-8 length exactly and an operator piece costs 0.
    """
    prefix = np.concatenate([[0], np.cumsum(byte_costs(transformed))])  # original bytes behind the first k
    ends = np.asarray(ends, dtype=np.int64)
    if ends.size and (ends.min() < 0 or ends.max() >= prefix.size):
        raise ValueError(f"piece span end outside the text's {prefix.size - 1} bytes")
    return charge_bytes(prefix[ends].tolist(), int(prefix[-1]))


TRANSFORM = TextTransform(TRANSFORM_NAME, encode, original_byte_counts, OPERATORS)


# --- tokenizers --------------------------------------------------------------------------------

def is_caseops_tokenizer(sp, source: str = "tokenizer") -> bool:
    """True if the four operators are user-defined pieces of `sp`, False if none is.

    Only user-defined pieces count: an operator learnt as an ordinary piece could be merged into
    longer pieces. Some but not all of them is an error.
    """
    user_defined = user_defined_pieces(sp)
    found = [op for op in OPERATORS if op in user_defined]
    if found and len(found) != len(OPERATORS):
        missing = ", ".join(f"U+{ord(op):04X}" for op in OPERATORS if op not in found)
        raise PgolfError(f"{source}: has only some of the CaseOps operator pieces (missing {missing}); it is neither "
                         "a CaseOps nor a plain tokenizer: train a new one with `pgolf tokenize` (drop --tokenizer)")
    return bool(found)


def check_tokenizer(sp, use_caseops: bool, source: str) -> None:
    """PgolfError unless the tokenizer's kind (CaseOps or plain) matches the run's --caseops setting."""
    ops = f"U+{ord(OPERATORS[0]):04X}..U+{ord(OPERATORS[-1]):04X}"
    has = is_caseops_tokenizer(sp, source)
    if use_caseops and not has:
        raise PgolfError(f"{source}: not a CaseOps tokenizer (the operators {ops} are not user-defined pieces), but "
                         "--caseops is on; drop --tokenizer to train a CaseOps tokenizer, or run with --no-caseops")
    if has and not use_caseops:
        raise PgolfError(f"{source}: is a CaseOps tokenizer (operators {ops} are reserved pieces), so its shards must "
                         "be made from case-transformed text: pass --caseops (params: tokenize.caseops: true)")
