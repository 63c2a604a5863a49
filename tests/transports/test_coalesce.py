"""Token coalescing: which deltas merge, when they go out, and that ids stay resume cursors."""

from __future__ import annotations

import random
from typing import Any

import pytest

from tokenrelay.events import Event, EventType
from tokenrelay.transports.coalesce import DeltaCoalescer

WINDOW = 0.010


def delta(seq: int, content: str, index: int = 0) -> Event:
    return Event(seq, EventType.MESSAGE_DELTA, {"index": index, "content": content})


def event(seq: int, kind: EventType, **data: Any) -> Event:
    return Event(seq, kind, data)


def started(coalescer: DeltaCoalescer, seq: int = 1) -> None:
    """Let the first text delta through, as every response does before holding anything."""
    assert coalescer.push([delta(seq, "first ")], 0.0) == [delta(seq, "first ")]


def test_the_first_text_delta_goes_at_once() -> None:
    coalescer = DeltaCoalescer(WINDOW, 1024)
    role = Event(2, EventType.MESSAGE_DELTA, {"index": 0, "role": "assistant", "content": ""})
    # Even when more deltas came in the same read: the first token must not wait for them.
    ready = coalescer.push([role, delta(3, "Hel"), delta(4, "lo"), delta(5, " you")], 0.0)
    assert ready == [role, delta(3, "Hel")]
    assert coalescer.deadline == pytest.approx(WINDOW)


def test_an_empty_text_is_not_the_first_token() -> None:
    coalescer = DeltaCoalescer(WINDOW, 1024)
    assert coalescer.push([delta(1, "")], 0.0) == [delta(1, "")]
    assert coalescer.push([delta(2, "Hi")], 0.001) == [delta(2, "Hi")]
    assert coalescer.deadline is None


def test_later_deltas_merge_into_one_event_with_the_last_seq() -> None:
    coalescer = DeltaCoalescer(WINDOW, 1024)
    started(coalescer)
    assert coalescer.push([delta(2, "a")], 1.000) == []
    assert coalescer.push([delta(3, "b"), delta(4, "c")], 1.004) == []
    assert coalescer.push([], 1.009) == []
    assert coalescer.push([delta(5, "d")], 1.010) == [delta(5, "abcd")]
    assert coalescer.deadline is None


def test_the_window_counts_from_the_first_held_delta() -> None:
    coalescer = DeltaCoalescer(WINDOW, 1024)
    started(coalescer)
    coalescer.push([delta(2, "a")], 5.0)
    for step in range(1, 10):  # a steady trickle does not push the deadline back
        assert coalescer.push([delta(2 + step, "x")], 5.0 + step * 0.001) == []
        assert coalescer.deadline == pytest.approx(5.0 + WINDOW)
    assert coalescer.push([], 5.0 + WINDOW) == [delta(11, "a" + "x" * 9)]


def test_a_single_held_delta_goes_out_unchanged() -> None:
    coalescer = DeltaCoalescer(WINDOW, 1024)
    started(coalescer)
    held = delta(2, "alone")
    coalescer.push([held], 0.0)
    [sent] = coalescer.push([], WINDOW)
    assert sent is held


@pytest.mark.parametrize(
    ("pieces", "sizes"),
    [
        pytest.param(["12345"] * 5, [10, 10], id="ascii"),
        # Three bytes each in UTF-8: the limit counts bytes on the wire, not characters.
        pytest.param(["\u2713\u2713"] * 5, [12, 12], id="utf-8"),
    ],
)
def test_merged_text_goes_out_once_it_reaches_max_bytes(
    pieces: list[str], sizes: list[int]
) -> None:
    coalescer = DeltaCoalescer(60.0, 10)
    started(coalescer)
    ready = coalescer.push([delta(2 + i, piece) for i, piece in enumerate(pieces)], 0.0)
    assert [len(e.data["content"].encode()) for e in ready] == sizes
    rest = coalescer.flush()
    assert "".join(e.data["content"] for e in ready + rest) == "".join(pieces)
    assert (ready + rest)[-1].seq == 1 + len(pieces)


def test_any_other_event_sends_the_held_delta_first() -> None:
    coalescer = DeltaCoalescer(WINDOW, 1024)
    started(coalescer)
    status = event(4, EventType.RUN_STATUS, status="searching")
    ready = coalescer.push([delta(2, "a"), delta(3, "b"), status, delta(5, "c")], 0.0)
    assert ready == [delta(3, "ab"), status]
    assert coalescer.flush() == [delta(5, "c")]


def test_the_terminal_event_flushes() -> None:
    coalescer = DeltaCoalescer(60.0, 1024)
    started(coalescer)
    completed = event(4, EventType.MESSAGE_COMPLETED, index=0, finish_reason="stop")
    end = event(5, EventType.RUN_COMPLETED)
    coalescer.push([delta(2, "a")], 0.0)
    assert coalescer.push([delta(3, "b"), completed, end], 0.001) == [
        delta(3, "ab"),
        completed,
        end,
    ]
    assert coalescer.deadline is None


@pytest.mark.parametrize(
    "other",
    [
        pytest.param({"index": 0, "role": "assistant"}, id="role"),
        pytest.param({"index": 0, "content": "x", "logprobs": {"content": []}}, id="logprobs"),
        pytest.param({"index": 0, "reasoning_content": "hmm"}, id="reasoning"),
        pytest.param({"index": 0, "content": None, "refusal": "no"}, id="refusal"),
    ],
)
def test_deltas_with_other_fields_are_not_merged(other: dict[str, Any]) -> None:
    coalescer = DeltaCoalescer(WINDOW, 1024)
    started(coalescer)
    odd = Event(3, EventType.MESSAGE_DELTA, other)
    assert coalescer.push([delta(2, "a"), odd, delta(4, "b")], 0.0) == [delta(2, "a"), odd]
    assert coalescer.flush() == [delta(4, "b")]


def test_choices_are_never_mixed() -> None:
    coalescer = DeltaCoalescer(WINDOW, 1024)
    started(coalescer)
    ready = coalescer.push([delta(2, "a", 0), delta(3, "b", 0), delta(4, "c", 1)], 0.0)
    assert ready == [delta(3, "ab", 0)]
    assert coalescer.push([delta(5, "d", 1)], 0.001) == []
    assert coalescer.flush() == [delta(5, "cd", 1)]


def test_flush_with_nothing_held() -> None:
    coalescer = DeltaCoalescer(WINDOW, 1024)
    assert coalescer.flush() == []
    started(coalescer)
    assert coalescer.flush() == []


@pytest.mark.parametrize("seed", range(20))
def test_every_id_is_an_exact_resume_cursor(seed: int) -> None:
    """Whatever the timing: the text is kept, in order, and each sent id covers exactly the
    events sent up to it, so resuming after any sent id loses nothing and repeats nothing."""
    rng = random.Random(seed)
    events: list[Event] = []
    for seq in range(1, 400):
        roll = rng.random()
        if roll < 0.85:
            events.append(delta(seq, rng.choice(["a", "bb", "\u00e9", "", " word"])))
        elif roll < 0.95:
            events.append(delta(seq, rng.choice(["x", "y"]), index=1))
        else:
            events.append(event(seq, EventType.RUN_STATUS, status="step"))
    events.append(event(400, EventType.RUN_COMPLETED))

    coalescer = DeltaCoalescer(WINDOW, rng.choice([4, 16, 1024]))
    sent: list[Event] = []
    now, position = 0.0, 0
    while position < len(events):
        now += rng.choice([0.0, 0.001, 0.004, 0.02])
        size = rng.randint(0, 6)
        sent += coalescer.push(events[position : position + size], now)
        position += size
    assert coalescer.deadline is None  # the terminal event flushed everything

    assert [e.seq for e in sent] == sorted({e.seq for e in sent})
    assert sent[-1] == events[-1]
    for cut in range(len(sent)):
        cursor = sent[cut].seq
        before = [e for e in events if e.seq <= cursor]
        for choice in (0, 1):
            assert text_of(sent[: cut + 1], choice) == text_of(before, choice)
        assert [e for e in sent[: cut + 1] if e.type is not EventType.MESSAGE_DELTA] == [
            e for e in before if e.type is not EventType.MESSAGE_DELTA
        ]


def text_of(events: list[Event], choice: int) -> str:
    return "".join(
        e.data["content"]
        for e in events
        if e.type is EventType.MESSAGE_DELTA and e.data["index"] == choice
    )
