from __future__ import annotations

import json

import pytest

from boostserve.cli import main
from models.build import build_model
from models.config import get_preset
from models.macs import count_exit_costs

PAPER = {
    "msdnet-cifar100-anytime": [15.14, 25.51, 37.79, 52.06, 62.18, 74.07, 87.73, 100.04, 110.12, 121.68],
    "msdnet-cifar100-budgeted": [15.14, 25.75, 33.66, 43.34, 51.82, 60.31],
}
PAPER_PARAMS_ANYTIME = [0.43, 0.88, 1.38, 1.83, 2.28, 2.79, 3.37, 3.87, 4.38, 4.96]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_msdnet_cumulative_macs_match_the_paper(name: str) -> None:
    costs = count_exit_costs(build_model(get_preset(name)))
    got = [c.cumulative_macs / 1e6 for c in costs]
    assert got == pytest.approx(PAPER[name], rel=0.01)
    assert [c.exit for c in costs] == list(range(1, len(got) + 1))
    assert sum(c.macs for c in costs) == costs[-1].cumulative_macs


def test_msdnet_cumulative_params_match_the_paper() -> None:
    costs = count_exit_costs(build_model(get_preset("msdnet-cifar100-anytime")))
    assert [c.cumulative_params / 1e6 for c in costs] == pytest.approx(PAPER_PARAMS_ANYTIME, abs=0.006)


def test_compact_first_exit_is_cheap() -> None:
    costs = count_exit_costs(build_model(get_preset("compact-fashion-mnist")))
    assert costs[0].cumulative_macs <= 0.15 * costs[-1].cumulative_macs


def test_cli_macs_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["macs", "--config", "msdnet-cifar100-anytime", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"] == "msdnet-cifar100-anytime"
    assert len(data["exits"]) == 10
    first = data["exits"][0]
    assert set(first) == {"exit", "macs", "cumulative_macs", "params", "cumulative_params"}
    assert first["exit"] == 1 and isinstance(first["macs"], int)
    assert data["exits"][-1]["cumulative_macs"] / 1e6 == pytest.approx(121.68, rel=0.01)


def test_cli_macs_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["macs", "--config", "compact-fashion-mnist"]) == 0
    assert "cum MMACs" in capsys.readouterr().out


def test_module_macs_follow_the_paper_convention() -> None:
    import torch
    from torch import nn

    from models.macs import module_macs

    x = torch.zeros(1, 3, 8, 8)
    conv = nn.Conv2d(3, 4, 3, 2, 1, bias=True)
    assert module_macs(conv, (x,), conv(x)) == 3 * 4 * 9 * 4 * 4
    grouped = nn.Conv2d(4, 8, 3, 1, 1, groups=2)
    y = torch.zeros(1, 4, 8, 8)
    assert module_macs(grouped, (y,), grouped(y)) == 4 * 8 * 9 * 64 // 2
    assert module_macs(nn.ReLU(), (x,), x) == 3 * 64
    pool = nn.AvgPool2d(2)
    assert module_macs(pool, (x,), pool(x)) == 3 * 4 * 4 * 4
    lin = nn.Linear(10, 3)
    assert module_macs(lin, (torch.zeros(1, 10),), lin(torch.zeros(1, 10))) == 33
    assert module_macs(nn.BatchNorm2d(3), (x,), x) == 0
    gap = nn.AdaptiveAvgPool2d(1)
    assert module_macs(gap, (x,), gap(x)) == 3 * 64
