"""The `search` tool of tool_qa: bm25 (`bm25s`, imported on first use) over (title, text) documents.

Observations use Search-R1's layout, so a policy trained here reads real NQ/HotpotQA retrieval the same
way: "\\n<information>Doc 1(Title: …) text\\nDoc 2(Title: …) text</information>\\n". Titles are indexed
with the text. Documents with no query word in common with the query are not returned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from trgrpo.run.records import Example

MAX_QUERY_CHARS = 300  # longer queries are cut (a runaway generation must not slow the search)
MAX_DOC_WORDS = 80  # documents are cut to this many words in observations (real corpora)
NO_RESULTS = "\n<information>No results.</information>\n"


def format_observation(documents: Sequence[tuple[str, str]]) -> str:
    """Search-R1's observation text for (title, text) documents, in rank order."""
    if not documents:
        return NO_RESULTS
    lines = []
    for rank, (title, text) in enumerate(documents, start=1):
        words = text.split()
        short = " ".join(words[:MAX_DOC_WORDS]) + (" …" if len(words) > MAX_DOC_WORDS else "")
        lines.append(f"Doc {rank}(Title: {title}) {short}")
    return "\n<information>" + "\n".join(lines) + "</information>\n"


class Bm25Index:
    """A bm25 index over (title, text) documents, built on the first search."""

    def __init__(self, documents: Sequence[tuple[str, str]]):
        self.documents = list(documents)
        self._retriever = None

    def _build(self):
        import logging

        import bm25s

        logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every index build at DEBUG
        corpus = [f"{title}\n{text}" for title, text in self.documents]
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)
        return retriever

    def search(self, query: str, k: int) -> list[tuple[str, str]]:
        """The top-k documents for `query` with a positive score, best first."""
        import bm25s

        if not self.documents:
            return []
        if self._retriever is None:
            self._retriever = self._build()
        tokens = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)
        if not tokens or not tokens[0]:
            return []
        ids, scores = self._retriever.retrieve(tokens, k=min(k, len(self.documents)), show_progress=False)
        return [self.documents[int(i)] for i, score in zip(ids[0], scores[0]) if score > 0]


class SearchTool:
    """`<search>query</search>` → the top-k documents of the example's corpus (its world, or a real one)."""

    name = "search"
    open_tag = "<search>"
    close_tag = "</search>"

    def __init__(self, top_k: int, index_for: Callable[[Example], Bm25Index]):
        self.top_k = top_k
        self.index_for = index_for

    def __call__(self, query: str, example: Example) -> str:
        try:
            return format_observation(
                self.index_for(example).search(query.strip()[:MAX_QUERY_CHARS], self.top_k)
            )
        except Exception as err:  # a tool never raises: the policy reads the error
            return f"\n<information>Search failed: {type(err).__name__}.</information>\n"
