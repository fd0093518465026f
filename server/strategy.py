"""PrivatuneFedAvg: FedAvg over trainable weights, with privacy reports and optional HE.

One class, Flower's hooks; the federation loop stays in ``Strategy.start``. What it adds to FedAvg:

- every train message carries the whole run config, so clients need nothing else;
- replies are screened one by one (errors, refusals, budget exhaustion, malformed or encrypted
  updates that fail their checks) and dropped with a logged reason instead of failing the round;
- each client's reported spend goes to the server ledger and the run record;
- under HE the "arrays" passed between rounds are ciphertexts: the strategy only adds them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.config import RunConfig
from common.protocol import STATUS_BUDGET, STATUS_TRAINED
from server.aggregation import UpdateRejected, check_plain_update, weighted_mean
from server.reasons import one_line
from server.run_record import RoundReport

log = logging.getLogger("privatune.server")


class FederationStopped(RuntimeError):
    """Raised from a hook to end the run cleanly (e.g. too few clients have budget left)."""


class PrivatuneFedAvg(FedAvg):
    def __init__(
        self,
        cfg: RunConfig,
        run_id: str,
        expected_shapes: dict[str, tuple[int, ...]],
        he_context: Any = None,
        ledger: Any = None,
    ) -> None:
        super().__init__(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=1.0,
            min_train_nodes=cfg.min_clients,
            min_evaluate_nodes=cfg.min_clients,
            min_available_nodes=cfg.min_clients,
        )
        self.cfg = cfg
        self.run_id = run_id
        self.expected_shapes = expected_shapes
        self.expected_length = int(sum(int(np.prod(s)) for s in expected_shapes.values()))
        self.he_context = he_context
        self.ledger = ledger
        self.current: RoundReport = RoundReport(round=0)
        self._round_started = time.perf_counter()

    # ----------------------------------------------------------------- configure
    def _run_config_record(self) -> ConfigRecord:
        values = {k: v for k, v in self.cfg.to_flower().items()}
        values["run-id"] = self.run_id
        return ConfigRecord(values)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = RoundReport(round=server_round)
        self._round_started = time.perf_counter()
        return super().configure_train(server_round, arrays, self._run_config_record(), grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_evaluate(server_round, arrays, self._run_config_record(), grid)

    # ----------------------------------------------------------------- aggregate
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self.he_context is not None:
            from common import he

            # Check and add each encrypted reply in one pass: every ciphertext is parsed once.
            self._accumulator = he.HEAccumulator(self.he_context, self.expected_length)
        accepted: list[tuple[str, Message]] = []
        exhausted: list[str] = []
        for msg in replies:
            cid, status, reason = self._identify(msg)
            if status is None:
                self._drop(server_round, cid, reason, msg)
                continue
            if status == STATUS_BUDGET:
                exhausted.append(cid)
                self._drop(server_round, cid, reason, msg, status=STATUS_BUDGET)
                continue
            if status != STATUS_TRAINED:
                self._drop(server_round, cid, f"{status}: {reason}", msg, status=status)
                continue
            try:
                self._check_update(msg)
            except UpdateRejected as err:
                self._drop(server_round, cid, f"update rejected: {err}", msg, status="dropped")
                continue
            accepted.append((cid, msg))
            self._record_trained(server_round, cid, msg)

        can_still_train = len(replies) - len(exhausted)
        if exhausted and can_still_train < self.cfg.min_clients:
            raise FederationStopped(
                f"round {server_round}: {len(exhausted)} client(s) have exhausted their privacy budget "
                f"({', '.join(sorted(exhausted))}); only {max(can_still_train, 0)} can still train and "
                f"min-clients is {self.cfg.min_clients}. The run ends here; the last global model stands."
            )
        if len(accepted) < self.cfg.min_clients:
            log.warning(
                "round %d: only %d valid update(s), fewer than min-clients=%d; the global model is kept",
                server_round, len(accepted), self.cfg.min_clients,
            )
            return None, None
        contents = [m.content for _, m in accepted]
        if self.he_context is not None:
            from common.he_records import state_to_arrayrecord

            arrays = state_to_arrayrecord(self._accumulator.result())
        else:
            arrays = aggregate_arrayrecords(contents, self.weighted_by_key)
        self.current.aggregated = True
        metrics = MetricRecord(
            {
                "train-loss": weighted_mean(
                    [(float(c["metrics"]["train-loss"]), float(c["metrics"]["num-examples"])) for c in contents]
                ),
                "num-clients": len(contents),
            }
        )
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        pairs: dict[str, list[tuple[float, float]]] = {}
        for msg in replies:
            if msg.has_error() or "metrics" not in msg.content:
                continue
            m = msg.content["metrics"]
            n = float(m.get("num-examples", 0))
            if n <= 0:
                continue
            for key in ("eval-loss", "eval-accuracy", "eval-macro-f1"):
                if key in m:
                    pairs.setdefault(key, []).append((float(m[key]), n))
        if not pairs:
            return None
        result = {k: weighted_mean(v) for k, v in pairs.items()}
        self.current.federated = result
        return MetricRecord(result)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _identify(msg: Message) -> tuple[str, str | None, str]:
        node = f"node-{msg.metadata.src_node_id}"
        if msg.has_error():
            return node, None, f"client error: {one_line(msg.error.reason)}"
        content = msg.content
        if "status" not in content:
            return node, None, "reply has no status record"
        st = content["status"]
        cid = str(st.get("client-id", node)) or node
        return cid, str(st.get("status", "")), str(st.get("reason", ""))

    def _check_update(self, msg: Message) -> None:
        content = msg.content
        if "arrays" not in content or "metrics" not in content:
            raise UpdateRejected("a 'trained' reply without arrays or metrics")
        n = content["metrics"].get("num-examples", 0)
        if not isinstance(n, (int, float)) or n <= 0:
            raise UpdateRejected(f"num-examples must be positive, got {n!r}")
        if self.he_context is not None:
            from common import he
            from common.he_records import arrayrecord_to_update

            try:
                self._accumulator.add(arrayrecord_to_update(content["arrays"]))
            except (he.HEError, ValueError, KeyError) as err:
                raise UpdateRejected(str(err)) from None
        else:
            state = {k: v.numpy() for k, v in content["arrays"].items()}
            check_plain_update(state, self.expected_shapes)

    def _record_trained(self, server_round: int, cid: str, msg: Message) -> None:
        m = msg.content["metrics"]
        st = msg.content["status"]
        report = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in m.items()}
        report["node-id"] = int(msg.metadata.src_node_id)
        self.current.clients[cid] = report
        if self.ledger is not None:
            def num(key: str) -> float | None:
                v = m.get(key)
                return float(v) if isinstance(v, (int, float)) else None

            steps = m.get("steps")
            self.ledger.record_report(
                run_id=self.run_id,
                round=server_round,
                client_id=cid,
                node_id=int(msg.metadata.src_node_id),
                noise_multiplier=num("noise-multiplier"),
                sample_rate=num("sample-rate"),
                steps=int(steps) if isinstance(steps, (int, float)) else None,
                max_grad_norm=num("max-grad-norm"),
                delta=num("delta"),
                accountant=str(st.get("accountant", self.cfg.accountant)),
                epsilon_reported=num("epsilon"),
                epsilon_dataset_reported=num("epsilon-dataset"),
                dataset_fingerprint=str(st.get("dataset-fingerprint", "")) or None,
                status=STATUS_TRAINED,
            )

    def _drop(self, server_round: int, cid: str, reason: str, msg: Message, status: str = "dropped") -> None:
        reason = one_line(reason)
        log.warning("round %d: %s not aggregated: %s", server_round, cid, reason)
        self.current.dropped[cid] = reason
        if self.ledger is not None:
            ledger_status = STATUS_BUDGET if status == STATUS_BUDGET else "dropped"
            self.ledger.record_report(
                run_id=self.run_id,
                round=server_round,
                client_id=cid,
                node_id=int(msg.metadata.src_node_id),
                status=ledger_status,
                reason=reason[:500],
            )
