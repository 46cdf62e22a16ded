"""The foresight format: render -> parse is the identity, the strict parser says what is wrong
and where, the lenient one never raises; and the calibration / fidelity scores against hand
calculations."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_foresight.foresight.action import Action, FormatError
from megatron_foresight.foresight.format import (
    AgentTurn, Foresight, parse_turn, parse_turn_lenient, render_turn,
)
from megatron_foresight.foresight.scores import (
    auroc, brier, calibration_bins, expected_calibration_error, format_validity, log_score,
    names_gold_document, rollout_fidelity,
)
from megatron_foresight.foresight.tags import ACTION_TAGS, symbols

TAG_TEXT = st.sampled_from(symbols())
# Block contents: any text, tags of the format included, stripped like the parser strips.
content = st.text(st.characters(codec="utf-8", exclude_characters="<"), max_size=60).map(
    str.strip) | st.lists(st.sampled_from(["word", " ", "<", ">", "<b>", "\n", "0.5"]),
                          max_size=8).map("".join).map(str.strip)


def _no_tag(text: str) -> bool:
    return not any(s in text for s in symbols())


turns = st.builds(
    AgentTurn,
    action=st.builds(Action, kind=st.sampled_from(ACTION_TAGS),
                     argument=content.filter(lambda s: s and _no_tag(s)), offset=st.just(0)),
    foresight=st.none() | st.builds(Foresight, plan=content.filter(_no_tag),
                                    rollout=content.filter(_no_tag),
                                    value=st.integers(0, 100).map(lambda i: i / 100)),
    think=st.none() | content.filter(_no_tag),
)


@settings(max_examples=300, deadline=None)
@given(turns)
def test_render_then_parse_is_the_identity(turn):
    text = render_turn(turn)
    parsed = parse_turn(text, require_foresight=False)
    assert isinstance(parsed, AgentTurn), (text, parsed)
    assert parsed.action.offset == text.index(f"<{turn.action.kind}>")
    assert parsed == AgentTurn(Action(turn.action.kind, turn.action.argument,
                                      parsed.action.offset), turn.foresight, turn.think)
    if turn.foresight is not None:
        assert parse_turn(text) == parsed


@settings(max_examples=500, deadline=None)
@given(st.lists(st.text(max_size=20) | TAG_TEXT, max_size=12).map("".join))
def test_lenient_parser_never_raises_and_agrees_with_the_strict_one(text):
    lenient = parse_turn_lenient(text)
    strict = parse_turn(text)
    assert (lenient.errors == ()) == isinstance(strict, AgentTurn)
    if lenient.value is not None:
        assert 0.0 <= lenient.value <= 1.0


GOOD = ("<think>Kalo first.</think>\n<foresight>\n<plan>search Kalo, then answer</plan>\n"
        "<rollout>Doc 1 (Title: Kalo) Kalo lies in Mirten.</rollout>\n<value>0.80</value>\n"
        "</foresight>\n<search>Kalo region</search>")


@pytest.mark.parametrize("text, words, at", [  # at: where the error must point (None: end)
    ("<search>x</search>", "expected <foresight>", "<search>"),
    (GOOD.replace("<plan>", "<plan>a <rollout>"), "<rollout> inside <plan>", "<rollout>search"),
    (GOOD.replace("</rollout>", ""), "<rollout> is never closed", "<rollout>Doc"),
    (GOOD.replace("0.80", "80%"), "number from 0 to 1", "<value>"),
    (GOOD.replace("0.80", "1.5"), "number from 0 to 1", "<value>"),
    (GOOD.replace("</foresight>", ""), "expected </foresight>", "<search>"),
    (GOOD.replace("<search>Kalo region</search>", ""), "expected the action", None),
    (GOOD.replace("<search>", "<calc>").replace("</search>", "</calc>"), "not available",
     "<calc>"),
    (GOOD + " and more", "text after the action", "and more"),
    (GOOD.replace("Kalo region", " "), "is empty", "<search>"),
    (GOOD.replace("<think>Kalo first.</think>", "<think>open"), "never closed", "<think>"),
])
def test_strict_parser_errors_say_what_and_where(text, words, at):
    error = parse_turn(text, allowed=("search", "answer"))
    assert isinstance(error, FormatError) and words in error.message, error
    assert error.offset == (len(text) if at is None else text.index(at)), error


def test_strict_parse_of_a_good_turn_and_lenient_recovery():
    turn = parse_turn(GOOD)
    assert turn == AgentTurn(Action("search", "Kalo region", GOOD.index("<search>")),
                             Foresight("search Kalo, then answer",
                                       "Doc 1 (Title: Kalo) Kalo lies in Mirten.", 0.8),
                             "Kalo first.")
    broken = GOOD.replace("</foresight>", "").replace("0.80", "0.8")
    lenient = parse_turn_lenient(broken)
    assert lenient.value == 0.8 and lenient.plan == "search Kalo, then answer"
    assert lenient.action.argument == "Kalo region" and len(lenient.errors) == 1


def test_calibration_scores_match_hand_calculation():
    values, outcomes = [0.9, 0.8, 0.3, 0.2, 0.6], [True, True, False, True, False]
    # (0.01 + 0.04 + 0.09 + 0.64 + 0.36) / 5
    assert brier(values, outcomes) == pytest.approx(0.228)
    expected = (math.log(0.9) + math.log(0.8) + math.log(0.7) + math.log(0.2) + math.log(0.4)) / 5
    assert log_score(values, outcomes) == pytest.approx(expected)
    # width bins of 0.5: [0.3, 0.2] -> mean 0.25, rate 0.5; [0.9, 0.8, 0.6] -> 0.7667, 0.6667
    assert calibration_bins(values, outcomes, bins=2) == [
        pytest.approx((0.25, 0.5, 2)), pytest.approx((2.3 / 3, 2 / 3, 3))]
    assert expected_calibration_error(values, outcomes, bins=2) == pytest.approx(
        (2 * 0.25 + 3 * 0.1) / 5)
    # mass bins of 2/3 values after sorting: [0.2, 0.3] and [0.6, 0.8, 0.9]
    mass = calibration_bins(values, outcomes, bins=2, strategy="mass")
    assert [pytest.approx(row) for row in calibration_bins(values, outcomes, bins=2)] == mass
    # successes 0.9, 0.8, 0.2 vs failures 0.3, 0.6: pairs won 2 + 2 + 0 of 6
    assert auroc(values, outcomes) == pytest.approx(4 / 6)
    assert auroc([0.5, 0.5], [True, False]) == 0.5 and auroc([0.1], [True]) is None
    assert brier([1.0, 0.0], [True, False]) == 0.0
    with pytest.raises(ValueError, match="probabilities"):
        brier([1.2], [True])


def test_fidelity_gold_naming_and_validity():
    assert rollout_fidelity("Kalo lies in Mirten", "Doc 1 (Title: Kalo) Kalo lies in Mirten.") \
        == pytest.approx(2 * (4 / 4) * (4 / 8) / (1 + 4 / 8))
    assert rollout_fidelity("nothing alike", "Kalo lies in Mirten") == 0.0
    assert names_gold_document("Doc 1 (Title: Kalo) ...", ["Kalo"])
    assert not names_gold_document("Kalopolis is far", ["Kalo"])
    assert format_validity([GOOD, "no action", GOOD]) == pytest.approx(2 / 3)
