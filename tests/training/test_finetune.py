"""Fine-tuning a plan's network: loss goes down, the checkpoint merges exactly, resume, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from dpcompress.cli import main
from dpcompress.errors import UserError
from dpcompress.training.finetune import FINETUNE_FORMAT, FinetuneSettings, finetune, load_finetuned, state_path_for
from dpcompress.graph.plan import Plan
from dpcompress.graph.rewrite import merge_reference, reference_model
from dpcompress.graph.trace import trace_model
from dpcompress.training.train import mean_loss
from tests.digits_helpers import INPUT_SHAPE, INPUT_SHAPE_ARG, TINY_SPEC, digits16, save_trained_tiny, trained_tiny


@pytest.fixture(scope="module")
def traced():
    return trace_model(trained_tiny(), INPUT_SHAPE, spec=TINY_SPEC)


def all_removed(chain) -> Plan:
    """No activation kept; one block per maximal valid run (greedy), so real merging happens."""
    boundaries, start = [0], 0
    while start < chain.num_positions:
        end = max(j for j in range(start + 1, chain.num_positions + 1) if chain.is_valid_block(start, j))
        boundaries.append(end)
        start = end
    return Plan(activations=[], boundaries=boundaries, num_positions=chain.num_positions,
                chain_fingerprint=chain.fingerprint())


SETTINGS = FinetuneSettings(epochs=2, lr=0.05, batch_size=32)


@pytest.fixture(scope="module")
def finetuned(traced, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "ckpt.pt"
    plan = all_removed(traced.chain)
    result = finetune(traced, plan, digits16(), out, SETTINGS, model_spec=TINY_SPEC)
    return plan, out, result


def test_finetune_reduces_the_loss_of_the_compressed_model(traced, finetuned):
    plan, out, result = finetuned
    data = digits16()
    before = mean_loss(reference_model(traced, plan), data.train)
    assert mean_loss(result.network, data.train) < 0.7 * before
    assert result.accuracy["holdout_after"] > result.accuracy["holdout_before"]
    assert not state_path_for(out).exists()  # training state is gone once the checkpoint is written


def test_checkpoint_format_loads_and_merges_exactly(traced, finetuned):
    plan, out, result = finetuned
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["format"] == FINETUNE_FORMAT and checkpoint["model"] == TINY_SPEC
    assert checkpoint["plan"]["boundaries"] == plan.boundaries and checkpoint["epoch"] == 2
    network = load_finetuned(out, traced, plan)
    x = torch.randn(5, *INPUT_SHAPE[1:])
    with torch.no_grad():
        expected = result.network.eval()(x)
        assert torch.allclose(network(x), expected, atol=1e-5)
        merged = merge_reference(network)
        assert torch.allclose(merged(x), expected, atol=1e-4)
    assert len([m for m in merged.modules() if isinstance(m, torch.nn.Conv2d)]) == len(plan.blocks)


def test_checkpoint_for_another_plan_or_model_is_rejected(traced, finetuned):
    plan, out, _ = finetuned
    chain = traced.chain
    other_plan = Plan(activations=list(chain.activation_positions), boundaries=list(range(chain.num_positions + 1)),
                      num_positions=chain.num_positions)
    with pytest.raises(UserError, match="another plan"):
        load_finetuned(out, traced, other_plan)
    from dpcompress import zoo

    other = trace_model(zoo.tiny_mobilenet_v2(width=1.5), INPUT_SHAPE)
    with pytest.raises(UserError, match="another model"):
        load_finetuned(out, other, all_removed(other.chain))


def test_interrupted_finetune_resumes_to_the_same_weights(traced, finetuned, tmp_path):
    plan, _, straight = finetuned

    class Stop(Exception):
        pass

    def stop(line: str) -> None:
        if line.startswith("epoch 1/"):
            raise Stop

    out = tmp_path / "ckpt.pt"
    with pytest.raises(Stop):
        finetune(traced, plan, digits16(), out, SETTINGS, progress=stop)
    assert state_path_for(out).exists() and not out.exists()
    lines = []
    resumed = finetune(traced, plan, digits16(), out, SETTINGS, progress=lines.append)
    assert any("resumed" in line for line in lines)
    for (name, a), b in zip(straight.network.state_dict().items(), resumed.network.state_dict().values()):
        assert torch.equal(a, b), name


def _cli(args):
    return CliRunner().invoke(main, ["finetune", "--model", TINY_SPEC, "--input-shape", INPUT_SHAPE_ARG, *args])


def test_cli_bad_inputs_exit_2_and_write_nothing(traced, tmp_path):
    weights = save_trained_tiny(tmp_path / "w.pt")
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(all_removed(traced.chain).to_json()))
    out = tmp_path / "out" / "ckpt.pt"
    base = ["--weights", str(weights), "--plan", str(plan_path), "--out", str(out)]

    result = _cli([*base, "--data", f"imagefolder:{tmp_path / 'missing'}"])
    assert result.exit_code == 2 and "does not exist" in result.output and "Traceback" not in result.output
    (tmp_path / "layout" / "train").mkdir(parents=True)
    result = _cli([*base, "--data", f"imagefolder:{tmp_path / 'layout'}"])
    assert result.exit_code == 2 and "val is missing" in result.output

    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"activations": [], "boundaries": [0, 3, 25]}))
    result = _cli(["--weights", str(weights), "--plan", str(foreign), "--out", str(out), "--data", "digits"])
    assert result.exit_code == 2 and "positions" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_finetune_writes_a_checkpoint(traced, tmp_path):
    weights = save_trained_tiny(tmp_path / "w.pt")
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps({"activations": [], "boundaries": all_removed(traced.chain).boundaries}))
    out = tmp_path / "ckpt.pt"
    result = _cli(["--weights", str(weights), "--plan", str(plan_path), "--out", str(out), "--data", "digits",
                   "--epochs", "1", "--distill", "0.3", "--batch-size", "32"])
    assert result.exit_code == 0, result.output
    assert "fine-tuned" in result.output
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["settings"]["distill"] == 0.3 and checkpoint["epoch"] == 1
    assert checkpoint["plan"]["boundaries"] == all_removed(traced.chain).boundaries
