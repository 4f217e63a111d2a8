"""The demo's workload: a shared-prefix request mix like a chat service sees.

Every prompt starts with the same system prompt. Half the requests ask
questions about long documents (several questions per document); the other
half are multi-turn chat sessions that open with a long pasted text and then
grow by the previous answer and a short follow-up message each turn. Text is
seeded made-up prose, encoded with the demo tokenizer; chat prompts are
assembled at the token level, so a session's next prompt starts with exactly
the tokens of its previous one.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from tokenizers import Tokenizer

from kvstore.demo.model import PUNCTUATION, SPECIAL_TOKENS
from kvstore.demo.presets import check_workload_size
from kvstore.errors import InvalidArgumentError

DOC_FIRST = "document, first question"
DOC_NEXT = "document, new question"
CHAT_FIRST = "chat, first turn"
CHAT_NEXT = "chat, next turn"
CLASSES = (DOC_FIRST, DOC_NEXT, CHAT_FIRST, CHAT_NEXT)
"""Request classes, in the order the demo reports them."""

_QUESTION_TOKENS = (16, 48)
_SENTENCE_WORDS = (6, 18)


@dataclass(frozen=True)
class Request:
    """One request: its class, the document or session it belongs to, and the
    tokens it appends (a framed user turn ending with the assistant tag).

    A request that starts a stream is prompted with the system prompt plus its
    tokens; a later chat turn with its session's history plus its tokens.
    """

    kind: str
    stream: str
    tokens: tuple[int, ...]
    starts_stream: bool


class Prose:
    """Seeded sentences over the tokenizer's words, Zipf-distributed like text."""

    def __init__(self, tokenizer: Tokenizer, seed: int) -> None:
        reserved = {*SPECIAL_TOKENS, *PUNCTUATION}
        vocab = tokenizer.get_vocab()
        self._words = [w for w, _ in sorted(vocab.items(), key=lambda item: item[1])]
        self._words = [w for w in self._words if w not in reserved]
        self._weights = [1.0 / (rank + 1) for rank in range(len(self._words))]
        self._rng = random.Random(seed)
        self._tokenizer = tokenizer

    def tokens(self, count: int) -> list[int]:
        """``count`` tokens of prose (sentences, cut at ``count``)."""
        ids: list[int] = []
        while len(ids) < count:
            words = self._rng.choices(
                self._words, self._weights, k=self._rng.randint(*_SENTENCE_WORDS)
            )
            mark = self._rng.choice(PUNCTUATION[:3])
            ids.extend(self._tokenizer.encode(" ".join(words) + f" {mark}").ids)
        return ids[:count]


class ChatFormat:
    """Token-level chat framing with the tokenizer's role tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        ids: dict[str, int] = {}
        for name in SPECIAL_TOKENS:
            token = tokenizer.token_to_id(name)
            if token is None:
                raise InvalidArgumentError(f"the tokenizer has no {name} token")
            ids[name] = token
        self.system = ids["<|system|>"]
        self.user = ids["<|user|>"]
        self.assistant = ids["<|assistant|>"]
        self.end = ids["<|end|>"]

    def system_prompt(self, text: list[int]) -> list[int]:
        return [self.system, *text, self.end]

    def user_turn(self, text: list[int]) -> list[int]:
        return [self.user, *text, self.end, self.assistant]

    def answer(self, tokens: list[int]) -> list[int]:
        return [*tokens, self.end]


@dataclass(frozen=True)
class Workload:
    """The system prompt and the requests, in the order they arrive."""

    system_prompt: tuple[int, ...]
    requests: tuple[Request, ...]
    end_token: int
    """What closes an answer before the next turn."""

    def __iter__(self) -> Iterator[Request]:
        return iter(self.requests)


def build_workload(
    tokenizer: Tokenizer, *, context: int, requests: int, new_tokens: int, seed: int = 0
) -> Workload:
    """``requests`` requests whose prompts plus ``new_tokens`` fit in ``context`` tokens.

    Documents fill 90-100% of the context; chat sessions have three turns (fewer if
    there are few requests), open with most of the context and reach it at
    their last turn.
    """
    check_workload_size(context=context, requests=requests, new_tokens=new_tokens)
    prose = Prose(tokenizer, seed)
    chat = ChatFormat(tokenizer)
    rng = random.Random(seed + 1)
    system = chat.system_prompt(prose.tokens(min(300, context // 8)))
    budget = context - new_tokens - len(system)

    doc_requests = (requests + 1) // 2
    chat_requests = requests - doc_requests
    documents = max(1, doc_requests // 3)
    doc_stream: list[Request] = []
    longest = budget - _QUESTION_TOKENS[1] - 3
    texts = [prose.tokens(int(longest * rng.uniform(0.9, 1.0))) for _ in range(documents)]
    asked = [0] * documents
    for number in range(doc_requests):
        doc = number % documents
        question = prose.tokens(rng.randint(*_QUESTION_TOKENS))
        kind = DOC_FIRST if asked[doc] == 0 else DOC_NEXT
        turn = chat.user_turn([*texts[doc], *question])
        doc_stream.append(Request(kind, f"document {doc + 1}", tuple(turn), True))
        asked[doc] += 1

    chat_stream: list[Request] = []
    if chat_requests:
        sessions = max(1, chat_requests // 3)
        turns = -(-chat_requests // sessions)
        follow_up = budget // 8 // turns
        opening = budget - (turns - 1) * (new_tokens + 1 + follow_up + 3) - 3
        taken = [0] * sessions
        for number in range(chat_requests):
            session = number % sessions
            if taken[session] == 0:
                message = prose.tokens(int(opening * rng.uniform(0.9, 1.0)))
            else:
                message = prose.tokens(int(follow_up * rng.uniform(0.75, 1.0)))
            kind = CHAT_FIRST if taken[session] == 0 else CHAT_NEXT
            chat_stream.append(
                Request(
                    kind, f"chat {session + 1}", tuple(chat.user_turn(message)), taken[session] == 0
                )
            )
            taken[session] += 1

    ordered: list[Request] = []
    for number in range(max(len(doc_stream), len(chat_stream))):
        ordered.extend(
            stream[number] for stream in (doc_stream, chat_stream) if number < len(stream)
        )
    return Workload(tuple(system), tuple(ordered), chat.end)
