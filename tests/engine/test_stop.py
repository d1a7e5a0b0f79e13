"""Stop strings over streamed text (any splitting, never a partial stop string shown) and token-level stops."""

from __future__ import annotations

import random

import pytest

from dsv32.chat.textscan import held_suffix
from dsv32.engine.sampling_params import SamplingParams
from dsv32.engine.stop import StopChecker, check_token_stop


def reference(text: str, stops: list[str]) -> tuple[str, str | None]:
    """The text a client should see and the stop string, found by growing the text one character at a time:
    the first stop string to be complete wins (the longest if several complete at once)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            s = max(done, key=len)
            return text[: end - len(s)], s
    return text, None


def random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, len(text) - 1))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    parts = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    # sprinkle empty deltas (a token that decodes to nothing yet)
    for _ in range(rng.randint(0, 3)):
        parts.insert(rng.randint(0, len(parts)), "")
    return parts


def stream(parts: list[str], stops: list[str]) -> tuple[str, str | None]:
    """Feed the parts; check after every delta that what was emitted is a prefix of the final answer and
    that exactly the undecidable suffix is held back."""
    want, want_stop = reference("".join(parts), stops)
    checker = StopChecker(stops)
    shown, fed = "", ""
    for part in parts:
        fed += part
        text, matched = checker.feed(part)
        shown += text
        assert want.startswith(shown), (parts, stops, shown)  # nothing that will be cut was ever shown
        if matched is not None:
            assert matched == want_stop
            assert checker.feed("more text") == ("", None)
            assert checker.flush() == ""
            return shown, matched
        # held back: only the longest suffix that could still start a stop string
        assert checker.held == fed[len(fed) - held_suffix(fed, stops) :]
        assert shown + checker.held == fed
    shown += checker.flush()
    return shown, None


@pytest.mark.parametrize("seed", range(4))
def test_random_texts_and_splittings(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab\u00e9\u4e2d "
    for _ in range(150):
        stops = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))
        ]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        if rng.random() < 0.5:  # make a match likely
            text = text[: len(text) // 2] + rng.choice(stops) + text[len(text) // 2 :]
        want = reference(text, stops)
        for _ in range(5):
            assert stream(random_split(text, rng), stops) == want


def test_stop_string_spanning_many_deltas() -> None:
    stops = ["</answer>"]
    text = "The result is 42.</answer> and then junk"
    rng = random.Random(0)
    for _ in range(300):
        assert stream(random_split(text, rng), stops) == ("The result is 42.", "</answer>")


def test_partial_stop_is_held_then_released() -> None:
    c = StopChecker(["\n\nUser:"])
    assert c.feed("Hi.\n") == ("Hi.", None)
    assert c.feed("\nUs") == ("", None)
    assert c.held == "\n\nUs"
    assert c.feed("e") == ("", None)
    assert c.feed("d to it") == ("\n\nUsed to it", None)
    assert c.flush() == ""
    c = StopChecker(["STOP"])
    assert c.feed("abcST") == ("abc", None)
    assert c.flush() == "ST"  # generation ended for another reason: nothing is lost


def test_earliest_completed_match_wins_whatever_the_split() -> None:
    # "xabc" starts first but "ab" is complete first: a stream would have stopped there
    for parts in (["xabc"], ["x", "a", "b", "c"], ["xa", "bc"]):
        assert stream(parts, ["xabc", "ab"]) == ("x", "ab")
    # complete at the same character: the longer (earlier-starting) one
    assert stream(["zabc"], ["bc", "abc"]) == ("z", "abc")


def test_no_stop_strings_is_pass_through() -> None:
    c = StopChecker(None)
    assert c.feed("abc") == ("abc", None)
    assert c.flush() == ""
    assert StopChecker("x").stop == ["x"]


def test_stop_at_the_very_start() -> None:
    assert stream(["###", "rest"], ["###"]) == ("", "###")


def test_token_stop() -> None:
    p = SamplingParams(max_tokens=3, stop_token_ids=[7])
    assert check_token_stop(p, 5, 1, eos_token_ids={2}) is None
    assert check_token_stop(p, 2, 1, eos_token_ids={2}) == "stop"
    assert check_token_stop(p, 7, 1) == "stop"
    assert check_token_stop(p, 5, 3) == "length"
    assert check_token_stop(p, 7, 3) == "stop"  # the stop token wins on the last allowed token
    q = SamplingParams(ignore_eos=True, stop_token_ids=[7])
    assert check_token_stop(q, 2, 1, eos_token_ids={2}) is None
    assert check_token_stop(q, 7, 1, eos_token_ids={2}) == "stop"
    assert check_token_stop(SamplingParams(), 5, 10, max_output_tokens=10) == "length"
    assert check_token_stop(SamplingParams(max_tokens=50), 5, 10, max_output_tokens=10) == "length"
    assert check_token_stop(SamplingParams(), 5, 9, max_output_tokens=10) is None


def _earliest_from(text: str, markers: list[str], pos: int) -> tuple[int, str | None]:
    found = [(text.find(m, pos), -len(m), m) for m in markers if text.find(m, pos) >= 0]
    return (min(found)[0], min(found)[2]) if found else (-1, None)


def reference_exempt(
    text: str, stops: list[str], opens: list[str], closes: list[str]
) -> tuple[str, str | None]:
    """As ``reference``, with exempt blocks found on the whole text: from the whitespace before an opening
    marker through the first closing marker after it (or the end); a stop string must lie outside them."""
    regions, pos = [], 0
    while True:
        i, opener = _earliest_from(text, opens, pos)
        if opener is None:
            break
        start = i
        while start > pos and text[start - 1].isspace():
            start -= 1
        j, closer = _earliest_from(text, closes, i + len(opener))
        end = len(text) if closer is None else j + len(closer)
        regions.append((start, end))
        pos = end
    for end in range(1, len(text) + 1):
        done = [
            s for s in stops
            if text[:end].endswith(s) and all(end <= a or end - len(s) >= b for a, b in regions)
        ]  # fmt: skip
        if done:
            s = max(done, key=len)
            return text[: end - len(s)], s
    return text, None


@pytest.mark.parametrize("seed", range(4))
def test_stop_strings_never_match_inside_exempt_blocks_whatever_the_split(seed: int) -> None:
    """A tool-call block (opening marker, the whitespace before it, through its closing marker) is passed
    through: a stop string inside it, or across its edge, does not match; one in the content still does, and
    nothing a match will cut is ever shown."""
    rng = random.Random(seed)
    opens, closes = ["<O>", "<Q>"], ["</O>"]
    alphabet = ["a", "b", " ", "\n", "<", "O", ">", "/"]
    for _ in range(300):
        stops = [
            "".join(rng.choice("ab \n<O>") for _ in range(rng.randint(1, 3)))
            for _ in range(rng.randint(1, 3))
        ]
        pieces = [rng.choice(alphabet) for _ in range(rng.randint(0, 30))]
        for _ in range(rng.randint(0, 2)):
            pieces.insert(rng.randint(0, len(pieces)), rng.choice(["\n\n<O>", "<Q>", " </O>", "<O>a\nb</O>"]))
        text = "".join(pieces)
        want = reference_exempt(text, stops, opens, closes)
        for _ in range(4):
            checker, shown = StopChecker(stops, (opens, closes)), ""
            for part in random_split(text, rng):
                got, matched = checker.feed(part)
                shown += got
                assert want[0].startswith(shown), (text, stops, shown)
                if matched is not None:
                    break
            else:
                shown += checker.flush()
            assert (shown, checker.matched) == want, (text, stops)


def test_a_newline_stop_string_leaves_a_tool_call_block_whole() -> None:
    """The DSML block the model writes after content, with stop=["\\n"]: the block is not cut; a newline in the
    content before it still stops, and so does one after the block; a newline held as a possible start of a
    block stops at the end of the output."""
    from dsv32.chat.parser import tool_block_markers

    markers = tool_block_markers("v3.2")
    block = '\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n</｜DSML｜invoke>\n</｜DSML｜function_calls>'
    for text, want in [
        ("Sure." + block, ("Sure." + block, None)),
        ("Sure." + block + "\nmore", ("Sure." + block, "\n")),
        ("Sure.\nthen" + block, ("Sure.", "\n")),
        ("Sure.\n", ("Sure.", "\n")),
    ]:
        checker = StopChecker(["\n"], markers)
        shown = ""
        for ch in text:
            shown += checker.feed(ch).text
            if checker.stopped:
                break
        else:
            shown += checker.flush()
        assert (shown, checker.matched) == want


def test_before_min_tokens_a_block_is_tracked_though_nothing_matches() -> None:
    """Text fed with ``match`` off (before min_tokens) never stops, but a tool-call block opened in it stays
    exempt once matching starts; without blocks such text passes straight through."""
    opens, closes = ["<O>"], ["</O>"]
    checker = StopChecker(["\n"], (opens, closes))
    shown = checker.feed("a\n\n<O", match=False).text + checker.feed(">x\n", match=False).text
    shown += checker.feed("y\nz").text  # matching on: still inside the block
    assert not checker.stopped and checker.feed("</O>b\nc").text == "</O>b" and checker.matched == "\n"
    assert shown == "a\n\n<O>x\ny\nz"
    plain = StopChecker(["\n"])
    assert plain.feed("a\n", match=False) == ("a\n", None) and plain.feed("b\nc") == ("b", "\n")
