"""Tracing: trunk convs, residuals, barriers, valid blocks; torchvision models without model-specific code."""

import pytest
import torch
import torch.nn as nn

from dpcompress.graph.chain import Chain
from dpcompress.graph.trace import trace_model
from tests.models_for_tests import TORCHVISION_MODELS, TinyResidual


def brute_force_valid(chain: Chain, start: int, end: int) -> bool:
    """Independent statement of validity: a linked run, and no residual with exactly one end strictly inside."""
    if any(not chain.unit(p).linked for p in range(start + 2, end + 1)):
        return False
    for r in chain.residuals:
        inside = start <= r.start and r.end <= end
        ends_outside = (r.start <= start or r.start >= end) and (r.end <= start or r.end >= end)
        if not (inside or ends_outside):
            return False
    return True


class Branchy(nn.Module):
    """conv1 -> relu -> [conv2, conv3 in parallel] -> cat -> conv4 -> unknown op -> conv5 -> relu -> conv6"""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 1)
        self.c3 = nn.Conv2d(8, 4, 3, padding=1)
        self.c4 = nn.Conv2d(8, 8, 3, padding=1)
        self.c5 = nn.Conv2d(8, 8, 3, padding=1)
        self.c6 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.cat([self.c2(x), self.c3(x)], dim=1)
        x = self.c4(x)
        x = torch.sin(x)  # an op the tracer does not know
        return self.c6(torch.relu(self.c5(x))).mean((2, 3))


def test_branch_concat_and_unknown_op_are_barriers():
    chain = trace_model(Branchy(), (1, 3, 16, 16)).chain
    assert [u.name for u in chain.units] == ["c1", "c2", "c3", "c4", "c5", "c6"]
    linked = {u.position: u.linked for u in chain.units}
    # c2 reads position 1 but position 1 is also read by c3: no merge across it.
    assert not linked[2] and "also read" in chain.unit(2).barrier
    assert not linked[3] and "reads position 1" in chain.unit(3).barrier
    assert not linked[4] and "cat" in chain.unit(4).barrier
    assert not linked[5] and "sin" in chain.unit(5).barrier
    assert linked[6]
    assert chain.valid_blocks() == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (4, 6), (5, 6)]
    assert chain.activation_positions == [1, 5]


def test_identity_residual_and_gate():
    chain = trace_model(TinyResidual(), (1, 3, 16, 16)).chain
    assert [u.name for u in chain.units] == ["stem.0", "a.0", "b.0", "c.0", "d"]
    assert [(r.start, r.end) for r in chain.residuals] == [(1, 4)]
    assert chain.unit(2).batchnorm == "a.1" and chain.unit(2).activation == "ReLU6"
    assert not chain.unit(5).linked and "squeeze-excitation" in chain.unit(5).barrier
    # A block holds the residual whole, lies inside its branch, or leaves its ends as boundaries;
    # (0, 2) and (0, 3) would need the shortcut's source, position 1, inside them.
    assert {(1, 4), (0, 4), (2, 4), (1, 3)} <= set(chain.valid_blocks())
    assert (0, 2) not in chain.valid_blocks() and (0, 3) not in chain.valid_blocks()
    for i in range(chain.num_positions):
        for j in range(i + 1, chain.num_positions + 1):
            assert chain.is_valid_block(i, j) == brute_force_valid(chain, i, j), (i, j)


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_models_trace(name, torchvision_chain):
    chain = torchvision_chain(name)
    assert chain.num_positions > 5
    blocks = chain.valid_blocks()
    assert all(chain.is_valid_block(i, j) for i, j in blocks)
    assert all((p - 1, p) in blocks for p in range(1, chain.num_positions + 1))  # every conv alone is a block
    assert len(blocks) > chain.num_positions  # something merges
    for i, j in blocks[:200]:
        assert brute_force_valid(chain, i, j)
    round_trip = Chain.from_json(chain.to_json())
    assert round_trip.fingerprint() == chain.fingerprint() and round_trip.valid_blocks() == blocks


def test_expected_structure_of_known_models(torchvision_chain):
    vgg = torchvision_chain("vgg19_bn")
    assert vgg.num_positions == 16 and not vgg.residuals
    assert [u.position for u in vgg.units if not u.linked] == [1, 3, 5, 9, 13]  # after each max-pool
    resnet = torchvision_chain("resnet18")
    assert resnet.num_positions == 20 and len(resnet.residuals) == 5  # 8 blocks, 3 with a conv shortcut
    mbv2 = torchvision_chain("mobilenet_v2")
    assert mbv2.num_positions == 52 and len(mbv2.residuals) == 10 and len(mbv2.activation_positions) == 34
    effnet = torchvision_chain("efficientnet_b0")
    assert effnet.num_positions == 49  # the 32 squeeze-excitation convs are not trunk convs


def test_reducible_convs_of_known_models(torchvision_chain):
    """Reducible convs keep their input's shape at stride 1: resnet18's 3x3 convs outside the first
    conv of a stage, mobilenet_v2's stride-1 depthwise convs; JSON lists them."""
    resnet = torchvision_chain("resnet18")
    assert resnet.reducible_positions() == [2, 3, 4, 5, 7, 9, 10, 12, 14, 15, 17, 19, 20]
    mbv2 = torchvision_chain("mobilenet_v2")
    reducible = mbv2.reducible_positions()
    assert len(reducible) == 13 and all(mbv2.unit(p).groups == mbv2.unit(p).in_channels for p in reducible)
    for chain in (resnet, mbv2):
        assert chain.to_json()["reducible_positions"] == chain.reducible_positions()
        for u in chain.units:
            assert u.reducible == (u.stride == (1, 1) and u.in_shape[1:] == u.out_shape[1:])


def test_a_model_that_cannot_run_at_the_input_size_is_one_line_naming_the_op_error(capfd):
    import pytest
    from torch import nn

    from dpcompress.errors import UserError
    from dpcompress.graph.trace import trace_model

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 5))
    with pytest.raises(UserError) as caught:
        trace_model(model, (1, 3, 5, 5))
    message = str(caught.value)
    assert "input shape (1, 3, 5, 5)" in message and "Kernel size" in message and "\n" not in message
    assert "Traceback" not in capfd.readouterr().err
