"""Plan JSON: loading (with clear errors), saving, and checking against a chain."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from dpcompress.graph.chain import Chain, ConvUnit, Residual
from dpcompress.errors import UserError
from dpcompress.graph.plan import (
    PLAN_FORMAT,
    Plan,
    check_plan_against_chain,
    load_plan,
    save_plan,
)


def unit(position, linked=True, activation="ReLU"):
    return ConvUnit(position=position, name=f"c{position}", in_channels=4, out_channels=4, kernel=(3, 3),
                    stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, bias=False,
                    in_shape=(1, 4, 8, 8), out_shape=(1, 4, 8, 8), activation=activation, linked=linked)


def small_chain():
    # Five convs; a barrier before conv 4; an identity residual from 1 to 3; no activation at 2.
    units = [unit(1), unit(2, activation=None), unit(3), unit(4, linked=False), unit(5)]
    return Chain(model="test:net", input_shape=(1, 4, 8, 8), units=units, residuals=[Residual(1, 3)])


def test_round_trip(tmp_path):
    chain = small_chain()
    plan = Plan(activations=[1], boundaries=[0, 1, 3, 5], num_positions=5, model="test:net",
                chain_fingerprint=chain.fingerprint(), budget_ms=2.0, latency_ms=1.5, importance=0.25,
                original_latency_ms=3.0, solve_seconds=0.001)
    path = tmp_path / "plan.json"
    save_plan(path, plan)
    assert json.loads(path.read_text())["format"] == PLAN_FORMAT
    assert load_plan(path) == plan


def test_hand_written_plan_with_only_activations_and_boundaries(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"activations": [1, 3], "boundaries": [0, 1, 3, 5]}))
    plan = load_plan(path)
    assert plan.num_positions == 5 and plan.model is None and plan.chain_fingerprint is None
    assert plan.latency_ms is None and plan.solve_seconds == 0.0
    assert plan.segments == [(0, 1), (1, 3), (3, 5)]
    check_plan_against_chain(plan, small_chain())


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"boundaries": [0, 5]}', "missing key 'activations'"),
    ('{"activations": []}', "missing key 'boundaries'"),
    ('{"activations": [1.5], "boundaries": [0, 5]}', "list of integer positions"),
    ('{"activations": "1", "boundaries": [0, 5]}', "list of integer positions"),
    ('{"activations": [], "boundaries": [0, 5], "num_positions": "5"}', "'num_positions' must be an integer"),
    ('{"activations": [], "boundaries": [0, 5], "model": 3}', "'model' must be a string"),
    ('{"activations": [], "boundaries": [0, 5], "latency_ms": "fast"}', "'latency_ms' must be a finite number"),
    ('{"activations": [], "boundaries": [0, 5], "format": "other/2"}', "unknown plan format"),
    ('{"activations": [], "boundaries": [1, 5]}', "start at 0"),
    ('{"activations": [], "boundaries": [0, 3, 2, 5]}', "strictly increasing"),
    ('{"activations": [2], "boundaries": [0, 1, 5]}', "not a block boundary"),
    ('{"activations": [5], "boundaries": [0, 5]}', "strictly between"),
])
def test_malformed_plans(tmp_path, content, message):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_plan(path)


def test_missing_plan_file(tmp_path):
    with pytest.raises(UserError, match="cannot read plan"):
        load_plan(tmp_path / "missing.json")


def test_check_against_chain():
    chain = small_chain()
    good = Plan(activations=[1], boundaries=[0, 1, 3, 5], num_positions=5, chain_fingerprint=chain.fingerprint())
    check_plan_against_chain(good, chain)
    cases = [
        (replace(good, chain_fingerprint="0" * 16), "another model"),
        (replace(good, num_positions=4, boundaries=[0, 1, 3, 4]), "4 positions but the model has 5"),
        (replace(good, boundaries=[0, 1, 3, 4]), "end at num_positions=5"),
        (replace(good, boundaries=[0, 1, 5]), r"block \(1, 5\) cannot be merged"),  # crosses the barrier
        (replace(good, activations=[], boundaries=[0, 2, 3, 5]), r"block \(0, 2\) cannot be merged"),  # cuts the residual
        (replace(good, activations=[2], boundaries=[0, 2, 3, 5]), r"block \(0, 2\)"),
        (replace(good, activations=[3], boundaries=[0, 1, 3, 5]), None),
        (replace(good, activations=[1, 3, 4], boundaries=[0, 1, 3, 4, 5]), None),
        (replace(good, activations=[4], boundaries=[0, 1, 3, 5]), "not a block boundary"),
    ]
    for plan, message in cases:
        if message is None:
            check_plan_against_chain(plan, chain)
        else:
            with pytest.raises(UserError, match=message):
                check_plan_against_chain(plan, chain)


def test_activation_that_the_chain_does_not_have():
    chain = Chain(model=None, input_shape=(1, 4, 8, 8), units=[unit(1), unit(2, activation=None), unit(3)])
    plan = Plan(activations=[2], boundaries=[0, 2, 3], num_positions=3)
    with pytest.raises(UserError, match="position 2 holds no removable activation"):
        check_plan_against_chain(plan, chain)


def test_pruned_round_trip_and_default(tmp_path):
    plan = Plan(activations=[1], boundaries=[0, 1, 3, 5], num_positions=5, pruned=[2, 3])
    path = tmp_path / "plan.json"
    save_plan(path, plan)
    data = json.loads(path.read_text())
    assert data["pruned"] == [2, 3] and list(data)[:6] == ["format", "model", "chain_fingerprint", "num_positions",
                                                           "activations", "boundaries"]
    assert load_plan(path) == plan
    assert plan.pruned_in(1, 3) == (2, 3) and plan.pruned_in(0, 1) == () and plan.pruned_in(3, 5) == ()
    path.write_text(json.dumps({"activations": [], "boundaries": [0, 5]}))
    assert load_plan(path).pruned == []


@pytest.mark.parametrize("content, message", [
    ('{"activations": [], "boundaries": [0, 5], "pruned": [3, 2]}', "pruned positions must be strictly increasing"),
    ('{"activations": [], "boundaries": [0, 5], "pruned": [2, 2]}', "pruned positions must be strictly increasing"),
    ('{"activations": [], "boundaries": [0, 5], "pruned": [0]}', "pruned position 0 lies in no block; the convs are "
                                                                 r"at positions 1..5"),
    ('{"activations": [], "boundaries": [0, 5], "pruned": [6]}', "pruned position 6 lies in no block"),
    ('{"activations": [], "boundaries": [0, 5], "pruned": "2"}', "'pruned' must be a list of integer positions"),
])
def test_malformed_pruned(tmp_path, content, message):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_plan(path)


def test_pruned_convs_must_be_reducible():
    # conv 1 widens 3 -> 4 channels, conv 2 keeps its shape, conv 3 has stride 2, conv 4 (no padding)
    # shrinks the map, conv 5 is depthwise and keeps its shape.
    units = [replace(unit(1), in_channels=3, in_shape=(1, 3, 8, 8)), unit(2),
             replace(unit(3), stride=(2, 2), out_shape=(1, 4, 4, 4)),
             replace(unit(4), padding=(0, 0), in_shape=(1, 4, 4, 4), out_shape=(1, 4, 2, 2)),
             replace(unit(5), groups=4, in_shape=(1, 4, 2, 2), out_shape=(1, 4, 2, 2))]
    chain = Chain(model=None, input_shape=(1, 3, 8, 8), units=units)
    assert chain.reducible_positions() == [2, 5]
    assert [u.reducible for u in units] == [False, True, False, False, True]
    plan = Plan(activations=[], boundaries=[0, 5], num_positions=5, pruned=[2, 5])
    check_plan_against_chain(plan, chain)
    for position, why in [(1, r"stride 1x1, input 3x8x8, output 4x8x8"), (3, r"stride 2x2, input 4x8x8, output 4x4x4"),
                          (4, r"stride 1x1, input 4x4x4, output 4x2x2")]:
        with pytest.raises(UserError, match=rf"conv {position} \(c{position}\) cannot be pruned: .*{why}$"):
            check_plan_against_chain(replace(plan, pruned=[position]), chain)
