"""Micro-benchmark of the token-accounting hot functions (CPU per call, one core).

Run: ``.venv/bin/python bench/micro_tokens.py`` (or ``-m bench.micro_tokens``);
``--quick`` for a fast smoke run. Prints the best-of-N mean time per call in
microseconds: the per-chunk numbers are what every streamed SSE chunk of every request
costs the ext_proc process.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ext_proc.tokens.estimator import count_text, count_texts, estimate_chat
from ext_proc.tokens.parsers import new_stream_parser, parse_json
from ext_proc.tokens.sse import SSEDecoder


def _openai_small_chunk(i: int) -> bytes:
    """~200 bytes: an OpenAI-compatible server's chunk (vLLM, Azure without extras)."""
    chunk = {
        "id": "chatcmpl-BNkqzJ2yvVh6o4l9GnAKxWq7xJ3fP",
        "object": "chat.completion.chunk",
        "created": 1744997211,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"content": f" word{i}"}, "finish_reason": None}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _openai_chunk(i: int) -> bytes:
    """~300 bytes: api.openai.com's chunk today (service tier, fingerprint, logprobs)."""
    chunk = {
        "id": "chatcmpl-BNkqzJ2yvVh6o4l9GnAKxWq7xJ3fP",
        "object": "chat.completion.chunk",
        "created": 1744997211,
        "model": "gpt-4o-mini-2024-07-18",
        "service_tier": "default",
        "system_fingerprint": "fp_0392822090",
        "choices": [
            {"index": 0, "delta": {"content": f" word{i}"}, "logprobs": None, "finish_reason": None}
        ],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _anthropic_chunk(i: int) -> bytes:
    data = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": f" word{i}"},
    }
    return b"event: content_block_delta\ndata: " + orjson.dumps(data) + b"\n\n"


OPENAI_JSON = orjson.dumps(
    {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion",
        "created": 1741569952,
        "model": "gpt-4.1-2025-04-14",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! " * 60, "refusal": None},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 19,
            "completion_tokens": 120,
            "total_tokens": 139,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }
)

CHAT_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant for ACME support. " * 8},
    {"role": "user", "content": "My order #1234 has not arrived yet; what can I do? " * 3},
    {"role": "assistant", "content": "I'm sorry to hear that. Let me check the status."},
    {"role": "user", "content": "Thanks, please hurry."},
]


def _time(func: Callable[[], object], number: int, repeat: int) -> float:
    """Best mean seconds per call over ``repeat`` runs of ``number`` calls."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            func()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def main(argv: list[str] | None = None) -> None:
    args_parser = argparse.ArgumentParser(description=__doc__)
    args_parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = args_parser.parse_args(argv)
    scale = 10 if args.quick else 1
    number, repeat = 20_000 // scale, 15

    chunks = [_openai_chunk(i) for i in range(1000)]
    small_chunks = [_openai_small_chunk(i) for i in range(1000)]
    a_chunks = [_anthropic_chunk(i) for i in range(1000)]
    count_text("gpt-4o", "warm up")  # load the encodings outside the timings
    count_text("gpt-4", "warm up")

    def per_chunk(make: Callable[[], Callable[[bytes], object]], body: list[bytes]) -> float:
        # Feed a whole stream's chunks per run; report time per chunk.
        runs = max(1, number // len(body))

        def run() -> None:
            feed = make()
            for chunk in body:
                feed(chunk)

        return _time(run, runs, repeat) / len(body)

    deltas = [f" word{i}" for i in range(500)]
    chat_chars = sum(len(m["content"]) for m in CHAT_MESSAGES)
    rows = [
        (
            f"SSEDecoder.feed, OpenAI chunk ({len(chunks[0])} B)",
            per_chunk(lambda: SSEDecoder().feed, chunks),
        ),
        (
            f"openai stream parser feed, per chunk ({len(chunks[0])} B)",
            per_chunk(lambda: new_stream_parser("openai").feed, chunks),
        ),
        (
            f"openai stream parser feed, per chunk ({len(small_chunks[0])} B)",
            per_chunk(lambda: new_stream_parser("openai").feed, small_chunks),
        ),
        (
            f"anthropic stream parser feed, per chunk ({len(a_chunks[0])} B)",
            per_chunk(lambda: new_stream_parser("anthropic").feed, a_chunks),
        ),
        (
            f"parse_json openai chat ({len(OPENAI_JSON)} B)",
            _time(lambda: parse_json("openai", OPENAI_JSON), number, repeat),
        ),
        (
            f"estimate_chat gpt-4o, 4 messages ({chat_chars} chars)",
            _time(lambda: estimate_chat("gpt-4o", CHAT_MESSAGES), number // 4, repeat),
        ),
        (
            "count_text gpt-4o, 200 chars",
            _time(lambda: count_text("gpt-4o", "Hello there, friend! " * 10), number, repeat),
        ),
        (
            "count_texts gpt-4o, 500 stream deltas",
            _time(lambda: count_texts("gpt-4o", deltas), max(1, number // 200), repeat),
        ),
    ]
    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds * 1e6:9.2f} us")


if __name__ == "__main__":
    main()
