"""Time to first token of a chat's next turn against its first, on a running gateway.

Each conversation sends a first prompt of --prompt-tokens (its own text), then, once the reply is in, a next
turn that repeats the conversation so far (prompt and reply) and adds a question: what a chat client sends.
A gateway that kept the first turn's keys and values computes only the new tokens; one that freed them
(`--prefix-cache-tokens 0`) computes the whole conversation again. Conversations run one after another,
each turn greedy. Prints the median TTFT of each turn over --conversations.

    bloomduo up --model /tmp/m560 --num-shards 2 --dtype bfloat16 &
    python scripts/chat_turns.py --target localhost:50051 --prompt-tokens 512
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from bloomduo.apps.bench import build_prompt
from bloomduo.client import AsyncClient

FOLLOW_UP = "\nUser: Tell me more about that.\nAssistant:"


async def _first_token_s(client: AsyncClient, prompt: str, new_tokens: int) -> tuple[float, str]:
    """Seconds to the first streamed token, and the reply's text."""
    sent = time.perf_counter()
    first = None
    text = ""
    async for event in client.generate_stream(prompt, max_new_tokens=new_tokens, do_sample=False):
        if event.token is not None and first is None:
            first = time.perf_counter() - sent
        if event.result is not None:
            text = event.result.text
    if first is None:
        raise SystemExit("the gateway streamed no token")
    return first, text


async def main(args: argparse.Namespace) -> None:
    async with AsyncClient(args.target, timeout=600) as client:
        firsts, nexts = [], []
        # Conversation 0 warms the stack up and is not counted.
        for conversation in range(args.conversations + 1):
            prompt, _ = await build_prompt(client, args.prompt_tokens, variant=7 * conversation + 1)
            first, reply = await _first_token_s(client, prompt, args.new_tokens)
            following, _ = await _first_token_s(client, prompt + reply + FOLLOW_UP, args.new_tokens)
            if conversation:
                firsts.append(first)
                nexts.append(following)
                print(
                    f"conversation {conversation}: TTFT {first * 1e3:.1f} ms, next turn {following * 1e3:.1f}"
                )
    first, following = statistics.median(firsts), statistics.median(nexts)
    print(
        f"median over {args.conversations}: first turn ({args.prompt_tokens} tokens) {first * 1e3:.1f} ms, "
        f"next turn {following * 1e3:.1f} ms ({following / first:.2f}x)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--conversations", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
