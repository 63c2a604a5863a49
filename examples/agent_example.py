"""A small weather assistant served by tokenrelay's agent mode.

Run it, then talk to it with any OpenAI client, or read its native events::

    python examples/agent_example.py --port 8080
    curl -N http://127.0.0.1:8080/v1/runs -H 'Content-Type: application/json' \\
      -d '{"model": "weather-assistant",
           "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}'

What it does, by the last message of the conversation:

- a question about the weather in a city: a status, then a ``get_weather`` tool call (the
  answer ends with ``finish_reason: "tool_calls"``; the client runs the tool);
- the tool's result (a ``tool`` message): a sentence with the forecast;
- ``fail``: a status, then an exception, to show what a client sees when an agent breaks
  (``agent_error``, without the exception's text);
- anything else: a status and a greeting, word by word.
"""

from __future__ import annotations

import argparse
import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

from tokenrelay import AgentEvent, AgentRequest, create_app, status, tool_call, usage
from tokenrelay.telemetry.logging import configure_logging

AGENT_NAME = "weather-assistant"
GREETING = "Hello! I am a small weather assistant. Ask me about the weather in any city."
WORD_DELAY = 0.02  # seconds between words, so that the answer visibly streams

# "... weather in New York?" -> "New York": the capitalised words after "in".
_CITY = re.compile(r"\bin ((?:[A-Z][\w-]*)(?: [A-Z][\w-]*)*)")


async def weather_agent(request: AgentRequest) -> AsyncIterator[AgentEvent]:
    """Answer one turn of a conversation with the weather assistant.

    Args:
        request: the conversation; only its last message is looked at.
    """
    last = request.messages[-1]
    said = _text_of(last)
    if last.get("role") == "tool":
        yield status("reading the forecast")
        answer = f"Here is the forecast: {said}"
    elif said.strip().lower() == "fail":
        yield status("about to fail on purpose")
        # The client sees only "the agent failed"; this text and the traceback go to the log.
        raise RuntimeError("the weather service rejected key wx-secret-123")
    elif "weather" in said.lower() and (city := _CITY.search(said)):
        yield status("looking up the weather", city=city.group(1))
        yield tool_call("get_weather", f'{{"city": "{city.group(1)}"}}')
        return
    elif "weather" in said.lower():
        answer = "Which city would you like the weather for?"
    else:
        yield status("thinking")
        answer = GREETING
    words = answer.split(" ")
    for position, word in enumerate(words):
        await asyncio.sleep(WORD_DELAY)
        yield word if position == 0 else " " + word
    yield usage(prompt_tokens=len(said.split()), completion_tokens=len(words))


def _text_of(message: dict[str, Any]) -> str:
    """A message's text, whether its content is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    parts = content or []
    return "".join(part.get("text") or "" for part in parts if isinstance(part, dict))


def main() -> None:
    """Serve the weather assistant with uvicorn."""
    parser = argparse.ArgumentParser(description="Serve the example weather assistant.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8080, help="port to bind")
    args = parser.parse_args()
    # tokenrelay's log lines, uvicorn's included; tracebacks without local variables, which
    # would hold prompts.
    configure_logging("info", "console")
    app = create_app(agent=weather_agent, agent_name=AGENT_NAME)
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False)


if __name__ == "__main__":
    main()
