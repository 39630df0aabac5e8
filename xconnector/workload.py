"""Seeded request streams with the prefix reuse real deployments see, for `xconnector bench`.

Three kinds of traffic, interleaved at random (seeded, so a run is reproducible):

- chat: conversations sharing one system prompt; each turn resends the whole history plus a new
  user message (and the previous answer), so turn n reuses turn n-1's prompt;
- rag: questions over a fixed set of documents, popular ones far more often (Zipf); each prompt
  is a document followed by a question;
- agent: loops whose context grows by a tool result each step, resent every step.

Token ids are random in [1, 32000); lengths are in tokens.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    kind: str
    tokens: list[int]


def _text(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 32000) for _ in range(n)]


def requests(
    n: int,
    seed: int = 0,
    system_tokens: int = 1024,
    documents: int = 40,
    document_tokens: int = 2048,
) -> Iterator[Request]:
    """`n` requests of mixed chat, RAG and agent traffic."""
    rng = random.Random(seed)
    system = _text(rng, system_tokens)
    docs = [_text(rng, document_tokens) for _ in range(documents)]
    weights = [1 / (i + 1) for i in range(documents)]  # Zipf: a few documents are most asked
    chats: list[list[int]] = []
    agents: list[list[int]] = []
    for _ in range(n):
        kind = rng.choices(["chat", "rag", "agent"], weights=[0.45, 0.35, 0.2])[0]
        if kind == "chat":
            if not chats or rng.random() < 0.15 or len(chats[-1]) > 6000:
                chats.append(list(system))
            convo = chats[rng.randrange(len(chats))]
            convo += _text(rng, rng.randint(20, 120))  # the user's message
            yield Request("chat", list(convo))
            convo += _text(rng, rng.randint(50, 300))  # the answer, resent next turn
        elif kind == "rag":
            doc = rng.choices(docs, weights=weights)[0]
            yield Request("rag", doc + _text(rng, rng.randint(15, 60)))
        else:
            if not agents or rng.random() < 0.1 or len(agents[-1]) > 8000:
                agents.append(list(system) + _text(rng, 200))
            loop = agents[rng.randrange(len(agents))]
            loop += _text(rng, rng.randint(100, 600))  # a tool's output
            yield Request("agent", list(loop))
