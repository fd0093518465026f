"""PrivatuneFedAvg: FedAvg over trainable weights, with privacy reports and optional HE.

One class, Flower's hooks; the federation loop stays in ``Strategy.start``. Each hook is short and calls
the module that holds its rule:

- every train message carries the whole run config, so clients need nothing else;
- replies are screened one by one (``privatune.server.replies`` running the checks of
  ``privatune.server.screening``: errors, refusals, budget exhaustion, duplicates and replays, malformed,
  mistyped, non-finite or out-of-bound updates) and dropped with a one-line reason instead of failing the round;
- each client's reported spend goes to the server ledger and the run record (``privatune.server.recording``),
  also when its update was rejected (the site spent it);
- when the run stops, or a round keeps the global model: ``privatune.server.stop_policy``;
- plaintext runs aggregate with the run's ``aggregator`` (``privatune.server.aggregation``: FedAvg by default,
  or Flower's FedMedian, FedTrimmedAvg, Krum);
- plaintext runs then take the ``server-optimiser``'s step from the aggregate (``privatune.server.optimisers``:
  FedAvg by default, or Flower's FedAvgM, FedAdam, FedYogi maths), its state in ``server_state``;
- under HE the "arrays" passed between rounds are ciphertexts: the strategy only adds them, and the
  FedAvg weight stays inside them (no plaintext example count reaches the server);
- federated evaluation figures exist only when the sites release noised sums (``privatune.server.releases``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from privatune.common.config import RunConfig
from privatune.common.ledger import ServerLedger
from privatune.common.protocol import (
    KEY_BACKBONE_FINGERPRINT,
    KEY_NUM_CLIENTS,
    KEY_NUM_EXAMPLES,
    KEY_RUN_ID,
    KEY_SERVER_ROUND,
    allowed_train_metric_keys,
)
from privatune.server.aggregation import aggregate_plain
from privatune.server.optimisers import ServerOptimiser, State
from privatune.server.recording import record_dropped, record_trained
from privatune.server.releases import federated_figures, read_release
from privatune.server.replies import Accepted, ScreeningRules, screen_train_reply
from privatune.server.run_record import RoundReport
from privatune.server.sampling import sample_clients, sample_size
from privatune.server.screening import ReplyGuard
from privatune.server.stop_policy import FederationStopped, check_budgets, enough_updates

if TYPE_CHECKING:
    from privatune.common.he import HEAccumulator

__all__ = ["FederationStopped", "PrivatuneFedAvg"]

log = logging.getLogger("privatune.server")


class PrivatuneFedAvg(FedAvg):
    def __init__(
        self,
        cfg: RunConfig,
        run_id: str,
        expected_shapes: dict[str, tuple[int, ...]],
        he_context: Any = None,
        ledger: ServerLedger | None = None,
        backbone_fingerprint: str = "",
    ) -> None:
        super().__init__(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=cfg.fraction_evaluate,
            min_train_nodes=cfg.min_clients,
            min_evaluate_nodes=cfg.min_clients,
            min_available_nodes=cfg.min_clients,
        )
        self.cfg = cfg
        self.run_id = run_id
        self.expected_shapes = expected_shapes
        self.he_context = he_context
        self.ledger = ledger
        self.backbone_fingerprint = backbone_fingerprint  # sent with every instruction; sites compare their own
        self.report_keys = allowed_train_metric_keys(cfg.secure_aggregation, cfg.weighting)
        self.weights_by_count = KEY_NUM_EXAMPLES in self.report_keys
        self.rules = ScreeningRules.for_run(cfg, expected_shapes, self.weights_by_count)
        self.expected_length = self.rules.expected_length
        self.current: RoundReport = RoundReport(round=0)
        self._round_started = time.perf_counter()
        self._guard = ReplyGuard()  # duplicates and replays, across the whole run
        self._sent: list[Message] = []  # this round's train messages (the grid stamps their ids)
        self._sent_round = 0
        self._global: dict[str, np.ndarray] | None = None  # this round's plaintext global weights
        self.server_optimiser = ServerOptimiser.from_config(cfg)
        self.server_state: State = {}  # the server optimiser's moments: arrays only, a checkpoint can save them
        opt = self.server_optimiser
        if opt.name == "fedavgm" and opt.momentum == 0.0 and opt.lr == 1.0:  # Flower's defaults
            log.warning(
                "server-optimiser=fedavgm with server-momentum=0 and server-lr=1 is FedAvg; set server-momentum"
            )
        # A resumed run (server/resume.py) continues its round numbers: Flower counts from 1, the run from here + 1.
        self.round_offset = 0

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The server optimiser's moments for the round checkpoint (server/checkpoint.py); empty for FedAvg."""
        return dict(self.server_state)

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore ``optimizer_state()`` from a checkpoint (a resumed FedAdam keeps its moments)."""
        self.server_state = dict(state)

    # ----------------------------------------------------------------- configure
    def _run_config_record(self) -> ConfigRecord:
        values = dict(self.cfg.to_flower())
        values[KEY_RUN_ID] = self.run_id
        if self.backbone_fingerprint:
            values[KEY_BACKBONE_FINGERPRINT] = self.backbone_fingerprint
        return ConfigRecord(values)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        self.current = RoundReport(round=server_round)
        self._round_started = time.perf_counter()
        if self.he_context is None:
            self._global = {k: v.numpy() for k, v in arrays.items()}
        self._sent = self._train_messages(server_round, arrays, grid)
        self._sent_round = server_round
        return self._sent

    def _train_messages(self, server_round: int, arrays: ArrayRecord, grid: Grid) -> list[Message]:
        """FedAvg's train messages to a sample drawn from the run's seed and the round (server/sampling.py)."""
        _, connected = sample_nodes(grid, self.min_available_nodes, 0)  # waits for min-clients to connect
        count = sample_size(len(connected), self.cfg.fraction_train, self.cfg.clients_per_round, self.cfg.min_clients)
        node_ids = sample_clients(connected, count, self.cfg.seed, server_round)
        self.current.sampled = len(node_ids)
        log.info("round %d: %d of %d connected clients sampled to train", server_round, len(node_ids), len(connected))
        config = self._run_config_record()
        config[KEY_SERVER_ROUND] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return list(self._construct_messages(record, node_ids, MessageType.TRAIN))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation on ``fraction-evaluate`` of the connected clients, drawn like the training sample
        (seeded, its own draw); none at 0. With 1,000 clients, evaluating all of them each round would make the
        round's time grow with the clients that exist rather than those sampled (docs/scale.md)."""
        server_round += self.round_offset
        if self.cfg.fraction_evaluate == 0:
            return []
        _, connected = sample_nodes(grid, self.min_available_nodes, 0)
        count = sample_size(len(connected), self.cfg.fraction_evaluate, 0, self.cfg.min_clients)
        node_ids = sample_clients(connected, count, self.cfg.seed, server_round, purpose="evaluate")
        config = self._run_config_record()
        config[KEY_SERVER_ROUND] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return list(self._construct_messages(record, node_ids, MessageType.EVALUATE))

    # ----------------------------------------------------------------- aggregate
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = list(replies)
        accumulator = self._new_accumulator()
        sent = self._sent if self._sent_round == server_round else []
        self._guard.start_round(server_round, [(m.metadata.message_id, m.metadata.dst_node_id) for m in sent])
        accepted: list[Message] = []
        exhausted: list[str] = []
        for msg in replies:
            verdict = screen_train_reply(msg, self._guard, self.rules, self._global, accumulator)
            if isinstance(verdict, Accepted):
                accepted.append(msg)
                record_trained(self.current, self.ledger, self.run_id, server_round, msg, verdict)
                continue
            if verdict.budget:
                exhausted.append(verdict.client_id)
            record_dropped(self.current, self.ledger, self.run_id, server_round, msg, verdict)

        check_budgets(server_round, len(replies), exhausted, self.cfg.min_clients)
        if not enough_updates(len(accepted), self.cfg.min_clients):
            log.warning(
                "round %d: only %d valid update(s), fewer than min-clients=%d; the global model is kept",
                server_round,
                len(accepted),
                self.cfg.min_clients,
            )
            return None, None
        contents = [m.content for m in accepted]
        arrays = self._aggregate(contents, accumulator)
        if accumulator is None and self.server_optimiser.name != "fedavg":
            arrays = self._server_step(server_round, arrays)
        self.current.aggregated = True
        # No training loss leaves a site (it is not DP-noised): the round's metrics are its size only.
        return arrays, MetricRecord({KEY_NUM_CLIENTS: len(contents)})

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Pool the noised validation sums the sites released (release-metrics); anything else -- an
        'evaluated' reply without a release, 'no-validation-data', a refusal -- adds nothing."""
        releases = [r for r in map(read_release, replies) if r is not None]
        for release in releases:
            self.current.released[release.client_id] = release.epsilon
        figures = federated_figures(releases)
        if figures is None:
            return None
        self.current.federated = figures
        return MetricRecord({key: value for key, value in figures.items()})

    # ------------------------------------------------------------------ helpers
    def _new_accumulator(self) -> HEAccumulator | None:
        """Under HE, the round's running sum: each encrypted reply is checked and added in one pass."""
        if self.he_context is None:
            return None
        from privatune.common import he

        return he.HEAccumulator(self.he_context, self.expected_length)

    def _server_step(self, server_round: int, aggregated: ArrayRecord) -> ArrayRecord:
        """The server optimiser's step from this round's global weights to the aggregate (plaintext only)."""
        if self._global is None:
            raise RuntimeError("the server optimiser needs this round's global weights: configure_train sets them")
        new, self.server_state = self.server_optimiser.step(
            self._global, {k: v.numpy() for k, v in aggregated.items()}, self.server_state, server_round
        )
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in new.items()})

    def _aggregate(self, contents: list[RecordDict], accumulator: HEAccumulator | None) -> ArrayRecord:
        if accumulator is not None:
            from privatune.common.he.records import state_to_arrayrecord

            return state_to_arrayrecord(accumulator.result())
        return aggregate_plain(
            contents,
            self.cfg.aggregator,
            trim_beta=self.cfg.trim_beta,
            krum_byzantine=self.cfg.krum_byzantine,
            krum_select=self.cfg.krum_select,
            weighted=self.weights_by_count,
        )
