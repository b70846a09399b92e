"""Answer extraction shared by the verifiers: the last `<tag>…</tag>` and the last `\\boxed{…}`.

Both look at the response text only and never raise. `\\boxed{}` is matched with brace counting, since
answers such as `\\frac{1}{2}` nest braces that a regular expression cannot balance.
"""

from __future__ import annotations

import re
import string

MAX_ANSWER_CHARS = 1000  # longer "answers" are treated as unparsable (no verifier time on them)


def last_tag(text: str, tag: str) -> str | None:
    """Content of the last complete `<tag>…</tag>` in `text`, stripped; None if there is none."""
    close = f"</{tag}>"
    end = text.rfind(close)
    if end < 0:
        return None
    start = text.rfind(f"<{tag}>", 0, end)
    if start < 0:
        return None
    content = text[start + len(tag) + 2 : end].strip()
    return content if len(content) <= MAX_ANSWER_CHARS else None


def last_boxed(text: str) -> str | None:
    """Content of the last balanced `\\boxed{…}` (or `\\fbox{…}`); None if there is none."""
    best = None
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            best = text[match.end() : i - 1].strip()
    if best is None or len(best) > MAX_ANSWER_CHARS:
        return None
    return best


def normalize_text(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())
