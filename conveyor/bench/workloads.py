"""The reference workloads of ../shared/workloads.md, generated from a seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOS_ID = 2  # the default model's BOS


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int  # generated exactly (greedy, EOS ignored)


def w1_requests(seed: int = 1234, num_requests: int = 64, min_input: int = 32, max_input: int = 512,
                min_output: int = 16, max_output: int = 256, bos_id: int = BOS_ID,
                token_ids: tuple[int, int] = (1000, 200000)) -> list[BenchRequest]:
    """W1: random token-id prompts of 32..512 tokens (BOS included) and 16..256 output tokens."""
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(num_requests):
        input_len = int(rng.integers(min_input, max_input + 1))
        output_len = int(rng.integers(min_output, max_output + 1))
        prompt = [bos_id] + [int(t) for t in rng.integers(*token_ids, size=input_len - 1)]
        requests.append(BenchRequest(prompt, output_len))
    return requests


# Plain English words for W3's text: any server's tokenizer sees ordinary prose, about a token a word.
_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part over new sound take only little work know place year live me back give most very "
    "after thing our just name good sentence man think say great where help through much before line right "
    "too mean old any same tell boy follow came want show also around form three small set put end does "
    "another well large must big even such because turn here why ask went men read need land different home "
    "us move try kind hand picture again change off play spell air away animal house point page letter "
    "mother answer found study still learn should world high every near add food between own below country "
    "plant last school father keep tree never start city earth eye light thought head under story saw left"
).split()


@dataclass
class Conversation:
    """One W3 chat: a shared system prompt, user messages, exact answer lengths and timing."""

    system_prompt_index: int
    system_prompt: str
    user_messages: list[str]
    answer_lens: list[int]  # tokens generated exactly for each turn (EOS ignored)
    start_time: float  # seconds after the benchmark starts
    think_times: list[float]  # seconds between a turn's answer and the next user message


def _words(rng: np.random.Generator, count: int) -> str:
    return " ".join(_WORDS[int(i)] for i in rng.integers(0, len(_WORDS), size=count)).capitalize() + "."


def w3_conversations(seed: int = 7, num_conversations: int = 16, num_system_prompts: int = 3,
                     system_words: int = 400, min_turns: int = 3, max_turns: int = 6,
                     user_words: tuple[int, int] = (30, 80), answer_tokens: tuple[int, int] = (30, 150),
                     conversation_rate: float = 0.5, mean_think_time: float = 2.0) -> list[Conversation]:
    """W3: conversations over a few shared ~400-token system prompts, 3-6 turns of 30-80-word messages and
    30-150-token answers; conversations start as a Poisson process, a turn follows the previous answer
    after an exponential think time."""
    rng = np.random.default_rng(seed)
    system_prompts = [f"You are assistant number {i}. " + _words(rng, system_words) for i in range(num_system_prompts)]
    conversations = []
    start = 0.0
    for _ in range(num_conversations):
        turns = int(rng.integers(min_turns, max_turns + 1))
        index = int(rng.integers(0, num_system_prompts))
        conversations.append(Conversation(
            system_prompt_index=index, system_prompt=system_prompts[index],
            user_messages=[_words(rng, int(rng.integers(user_words[0], user_words[1] + 1))) for _ in range(turns)],
            answer_lens=[int(rng.integers(answer_tokens[0], answer_tokens[1] + 1)) for _ in range(turns)],
            start_time=start, think_times=rng.exponential(mean_think_time, size=turns).tolist()))
        start += float(rng.exponential(1.0 / conversation_rate))
    return conversations
