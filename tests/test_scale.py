"""Many simulated clients (issue 13): a federated evaluation sampled like training, one read-only copy of the
dataset per process, the participation panel, and the scale benchmark's pure parts."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, RecordDict

from privatune.common.config import ConfigError, RunConfig
from privatune.common.protocol import KEY_SERVER_ROUND
from privatune.server.plots import plot_rounds, rounds_trained
from privatune.server.run_record import RoundReport
from privatune.server.sampling import sample_clients
from privatune.server.strategy import PrivatuneFedAvg
from privatune.simulations.benchmarks.scale import (
    ScalePlan,
    cell_figures,
    growth,
    parse_clients,
    round_seconds,
    table,
)
from privatune.simulations.benchmarks.scale import rounds_trained as bench_rounds_trained


def test_fraction_evaluate_is_checked() -> None:
    assert RunConfig.create(preset="digits").fraction_evaluate == 1.0  # Flower's default: every client
    assert RunConfig.create(preset="digits", fraction_evaluate=0).fraction_evaluate == 0.0
    with pytest.raises(ConfigError, match=r"^fraction-evaluate: must be in \[0, 1\]"):
        RunConfig.create(preset="digits", fraction_evaluate=1.5)
    with pytest.raises(ConfigError, match=r"personalise-epochs > 0 .* fraction-evaluate=1"):
        RunConfig.create(preset="digits", fraction_evaluate=0.5, personalise_epochs=1)


def test_the_evaluation_sample_is_its_own_seeded_draw() -> None:
    nodes = list(range(1000, 2000))
    train = sample_clients(nodes, 100, seed=7, server_round=2)
    assert sample_clients(nodes, 100, seed=7, server_round=2, purpose="train") == train
    evaluate = sample_clients(nodes, 100, seed=7, server_round=2, purpose="evaluate")
    assert evaluate == sample_clients(list(reversed(nodes)), 100, seed=7, server_round=2, purpose="evaluate")
    assert evaluate != train and len(set(evaluate)) == 100


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _strategy(**keys: object) -> PrivatuneFedAvg:
    cfg = RunConfig.create(preset="digits", mode="head", **keys)
    return PrivatuneFedAvg(cfg, "run-1", {"w": (2,)})


def test_configure_evaluate_sends_fraction_evaluate_of_the_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    grid = FakeGrid(list(range(1, 1001)))
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})

    def sent_to(strategy: PrivatuneFedAvg, server_round: int) -> tuple[list[int], dict[str, object]]:
        seen: dict[str, object] = {}

        def capture(record: RecordDict, node_ids: list[int], message_type: str) -> list[int]:
            seen.update(config=record.config_records["config"], type=message_type)
            return list(node_ids)  # Flower's Message needs a running federation: the addressees are enough here

        monkeypatch.setattr(strategy, "_construct_messages", capture)
        return list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid)), seen  # type: ignore[arg-type]

    nodes, seen = sent_to(_strategy(fraction_train=0.1, fraction_evaluate=0.1, seed=3), 4)
    assert len(nodes) == 100  # not the 1,000 that exist
    assert sorted(nodes) == sample_clients(grid.nodes, 100, seed=3, server_round=4, purpose="evaluate")
    assert seen["type"] == MessageType.EVALUATE and seen["config"][KEY_SERVER_ROUND] == 4  # type: ignore[index]
    assert sent_to(_strategy(fraction_evaluate=0), 1)[0] == []
    assert len(sent_to(_strategy(), 1)[0]) == 1000  # the default: every client, as Flower's


def test_a_federation_pool_is_the_process_copy_and_images_still_encode(monkeypatch: pytest.MonkeyPatch) -> None:
    from privatune.common import datasets
    from privatune.common.models.image import encode_images

    monkeypatch.setitem(
        datasets._LOADERS,
        "digits",
        lambda: datasets.LabelledData("d", "image", np.ones((4, 1, 28, 28), np.float32), np.arange(4) % 2, ("0", "1")),
    )
    datasets._load_raw.cache_clear()
    try:
        shared = datasets.load_dataset("digits", shared=True)
        assert shared is datasets.load_dataset("digits", shared=True)  # one copy per process
        assert not shared.inputs.flags.writeable  # type: ignore[union-attr]
        own = datasets.load_dataset("digits")
        assert own is not shared and own.inputs.flags.writeable  # type: ignore[union-attr]
        assert len(datasets.load_dataset("digits", max_records=2, shared=True)) == 2  # a subsample is a copy
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch warns on a read-only array it would share
            (images,) = encode_images(shared.inputs)
        images += 1  # torch's own memory: the shared array is untouched
        assert float(shared.inputs[0, 0, 0, 0]) == 1.0  # type: ignore[index]
    finally:
        datasets._load_raw.cache_clear()


def test_fashion_mnist_is_normalised_in_place_to_the_same_values() -> None:
    from privatune.common import datasets
    from privatune.common.fashion_mnist import load_split

    try:
        pixels, _ = load_split("test")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST files not installed")
    got = datasets._fashion_mnist("test").inputs
    want = datasets.pixels_to_model_input(pixels.astype(np.float32) / np.float32(255.0))
    assert isinstance(got, np.ndarray) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)  # bit for bit: the same operations, in place


def test_the_participation_panel_counts_rounds_trained(tmp_path: Path) -> None:
    rounds = [
        RoundReport(round=0),
        RoundReport(round=1, clients={"a": {}, "b": {}}, sampled=2, aggregated=True),
        RoundReport(round=2, clients={"b": {}}, rejected_spends={"c": {}}, sampled=2, aggregated=True),
    ]
    assert rounds_trained(rounds) == {"a": 1, "b": 2, "c": 1}
    path = plot_rounds(rounds, tmp_path / "rounds.png", title="t", target_epsilon=4.0)
    assert path.stat().st_size > 10_000
    plot_rounds([RoundReport(round=0)], tmp_path / "none.png")  # nobody trained: the panel says so


def test_the_scale_plan_refuses_what_cannot_run() -> None:
    assert parse_clients("100, 300,1000") == (100, 300, 1000)
    with pytest.raises(ValueError, match="--clients"):
        parse_clients("100,lots")
    with pytest.raises(ValueError, match="--clients"):
        ScalePlan(clients=(1,)).checked()
    with pytest.raises(ValueError, match="--fraction"):
        ScalePlan(fraction=0).checked()
    with pytest.raises(ValueError, match="--run-config"):
        ScalePlan(run_config="batch-size").cell_config()
    rc = ScalePlan(run_config="batch-size=32").cell_config()
    assert rc["fraction-train"] == rc["fraction-evaluate"] == 0.1 and rc["batch-size"] == "32"
    RunConfig.from_flower(rc)  # every key the cells send is a run-config key


def test_a_cell_row_from_its_run_folder(tmp_path: Path) -> None:
    rows = [{"round": 0, "seconds": 5.0}, {"round": 1, "seconds": 15.0}, {"round": 2, "seconds": 27.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert round_seconds(tmp_path / "metrics.jsonl") == [10.0, 12.0]
    participation = {"client-0": [1, 2], "client-3": [2]}
    assert bench_rounds_trained(participation, 4) == [2, 0, 0, 1]
    summary = {"status": "completed", "participation": participation, "test_accuracy": 0.5, "max_client_epsilon": 3.9}
    child = {"tree_peak_rss_kib": 2048, "peak_kib_by_title": {"ray::ClientAppActor": 1024, "python": 4096}}
    cell = cell_figures(summary, child, 4, tmp_path)
    assert cell["seconds_per_round"] == 12.0 and cell["first_round_seconds"] == 10.0
    assert cell["peak_tree_mib"] == 2.0 and cell["peak_client_actor_mib"] == 1.0
    assert (cell["rounds_trained_min"], cell["rounds_trained_median"], cell["rounds_trained_max"]) == (0, 0.5, 2)
    assert cell["clients_trained"] == 2
    big = {**cell, "clients": 40, "seconds_per_round": 24.0, "peak_tree_mib": 3.0}
    assert growth([cell, big]) == {"seconds_per_round": 2.0, "peak_tree_memory": 1.5}
    lines = table([cell, big], 400).splitlines()
    assert len(lines) == 4 and "| 100 " in lines[2] and "0/0.5/2" in lines[2] and "2 of 4" in lines[2]
    empty = cell_figures({}, SimpleNamespace().__dict__, 4, tmp_path / "missing")
    assert empty["status"] == "failed" and empty["seconds_per_round"] is None
