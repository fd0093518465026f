"""PrivatuneFedAvg: FedAvg over trainable weights, with privacy reports and optional HE.

One class, Flower's hooks; the federation loop stays in ``Strategy.start``. What it adds to FedAvg:

- every train message carries the whole run config, so clients need nothing else;
- replies are screened one by one (errors, refusals, budget exhaustion, duplicates and replays,
  malformed, mistyped, non-finite or out-of-bound updates: ``privatune.server.screening``) and dropped with a
  one-line reason (``privatune.server.reasons``) instead of failing the round;
- each client's reported spend goes to the server ledger and the run record, also when its update
  was rejected (the site spent it);
- plaintext runs aggregate with the run's ``aggregator`` (``privatune.server.aggregation``: FedAvg by default,
  or Flower's FedMedian, FedTrimmedAvg, Krum);
- under HE the "arrays" passed between rounds are ciphertexts: the strategy only adds them, and the
  FedAvg weight stays inside them (no plaintext example count reaches the server);
- federated evaluation figures exist only when the sites release noised sums (release-metrics).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from privatune.common.config import ACCOUNTANTS, RunConfig
from privatune.common.protocol import (
    EVAL_RELEASE_KEYS,
    KEY_EVAL_CORRECT,
    KEY_EVAL_COUNT,
    KEY_EVAL_LOSS_SUM,
    KEY_METRICS_EPSILON,
    KEY_METRICS_NOISE,
    KEY_NOISE_SOURCE,
    KEY_NUM_EXAMPLES,
    NOISE_SOURCES,
    STATUS_BUDGET,
    STATUS_EVALUATED,
    STATUS_TRAINED,
    allowed_train_metric_keys,
)
from privatune.server.aggregation import UpdateRejected, aggregate_plain, pool_noised_eval
from privatune.server.reasons import one_line
from privatune.server.run_record import RoundReport
from privatune.server.screening import (
    ReplyGuard,
    check_mechanism,
    check_num_examples,
    check_plain_arrays,
    check_values,
    dp_change_bound,
    reported_mechanism,
    update_digest,
)

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
        self.report_keys = allowed_train_metric_keys(cfg.secure_aggregation, cfg.weighting)
        self.weights_by_count = KEY_NUM_EXAMPLES in self.report_keys
        self.current: RoundReport = RoundReport(round=0)
        self._round_started = time.perf_counter()
        self._guard = ReplyGuard()  # duplicates and replays, across the whole run
        self._sent: list[Message] = []  # this round's train messages (the grid stamps their ids)
        self._sent_round = 0
        self._global: dict[str, np.ndarray] | None = None  # this round's plaintext global weights

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
        if self.he_context is None:
            self._global = {k: v.numpy() for k, v in arrays.items()}
        self._sent = list(super().configure_train(server_round, arrays, self._run_config_record(), grid))
        self._sent_round = server_round
        return self._sent

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
            from privatune.common import he

            # Check and add each encrypted reply in one pass: every ciphertext is parsed once.
            self._accumulator = he.HEAccumulator(self.he_context, self.expected_length)
        sent = self._sent if self._sent_round == server_round else []
        self._guard.start_round(server_round, [(m.metadata.message_id, m.metadata.dst_node_id) for m in sent])
        accepted: list[tuple[str, Message]] = []
        exhausted: list[str] = []
        for msg in replies:
            cid, status, reason = self._identify(msg)
            if status is None:  # an error reply (e.g. Flower's "Node Unavailable", made by the SuperLink): no update
                self._drop(server_round, cid, reason, msg)
                continue
            node = int(msg.metadata.src_node_id)
            why = self._guard.check_identity(node, cid, msg.metadata.reply_to_message_id)
            if why is not None:
                self._drop(server_round, cid, why, msg)
                continue
            if status == STATUS_BUDGET:
                exhausted.append(cid)
                self._drop(server_round, cid, reason, msg, status=STATUS_BUDGET)
                continue
            if status != STATUS_TRAINED:
                self._drop(server_round, cid, f"{status}: {reason}", msg, status=status)
                continue
            if "arrays" in msg.content and isinstance(msg.content["arrays"], ArrayRecord):
                why = self._guard.check_update(update_digest(msg.content["arrays"]), cid)
                if why is not None:  # a copy of an update already counted: no new spend
                    self._drop(server_round, cid, why, msg)
                    continue
            try:
                self._check_update(msg)
            except UpdateRejected as err:
                # The site trained (and recorded the spend) even though its update is refused.
                self._drop(server_round, cid, f"update rejected: {err}", msg, status="dropped", spent=True)
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
                server_round,
                len(accepted),
                self.cfg.min_clients,
            )
            return None, None
        contents = [m.content for _, m in accepted]
        if self.he_context is not None:
            from privatune.common.he.records import state_to_arrayrecord

            arrays = state_to_arrayrecord(self._accumulator.result())
        else:
            arrays = aggregate_plain(
                contents,
                self.cfg.aggregator,
                trim_beta=self.cfg.trim_beta,
                krum_byzantine=self.cfg.krum_byzantine,
                krum_select=self.cfg.krum_select,
                weighted=self.weights_by_count,
            )
        self.current.aggregated = True
        # No training loss leaves a site (it is not DP-noised): the round's metrics are its size only.
        return arrays, MetricRecord({"num-clients": len(contents)})

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Pool the noised validation sums the sites released (release-metrics); anything else -- an
        'evaluated' reply without a release, 'no-validation-data', a refusal -- adds nothing."""
        sums: list[tuple[float, float, float]] = []
        epsilons: list[float] = []
        for msg in replies:
            if msg.has_error() or "status" not in msg.content or "metrics" not in msg.content:
                continue
            if str(msg.content["status"].get("status", "")) != STATUS_EVALUATED:
                continue
            m = msg.content["metrics"]
            if not all(isinstance(m.get(k), (int, float)) and math.isfinite(m[k]) for k in EVAL_RELEASE_KEYS):
                continue  # not a (well-formed) release
            sums.append((float(m[KEY_EVAL_CORRECT]), float(m[KEY_EVAL_LOSS_SUM]), float(m[KEY_EVAL_COUNT])))
            epsilons.append(float(m[KEY_METRICS_EPSILON]))
            cid = self._identify(msg)[0]
            self.current.released[cid] = float(m[KEY_METRICS_EPSILON])
            noise = float(m[KEY_METRICS_NOISE])
        pooled = pool_noised_eval(sums)
        if pooled is None:
            return None
        result = {
            **pooled,
            "noised": 1.0,  # 1.0 = these figures come from DP-noised site releases
            "num-sites": float(len(sums)),
            "metrics-noise-multiplier": noise,
            "max-site-epsilon": max(epsilons),  # each site's run epsilon after the release, training included
        }
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
        """Screen one trained reply (server.screening); under HE, add it to the running sum if it passes."""
        content = msg.content
        if "arrays" not in content or "metrics" not in content:
            raise UpdateRejected("a 'trained' reply without arrays or metrics")
        metrics = content["metrics"]
        mech = check_mechanism(metrics)
        if self.weights_by_count:  # plaintext FedAvg by example count; under HE the weight is encrypted
            n = check_num_examples(metrics.get(KEY_NUM_EXAMPLES))
        else:  # no count is sent: q = 1/ceil(n/B) bounds n by B/q, enough for the magnitude bound below
            n = max(1, math.ceil(self.cfg.batch_size / float(mech["sample_rate"] or 1.0)))
        accountant = str(content["status"].get("accountant", self.cfg.accountant))
        if accountant not in ACCOUNTANTS:
            raise UpdateRejected(f"accountant {accountant!r} is not one of {ACCOUNTANTS}")
        if self.he_context is not None:
            from privatune.common import he
            from privatune.common.he.records import arrayrecord_to_update

            try:
                self._accumulator.add(arrayrecord_to_update(content["arrays"]))
            except (he.HEError, ValueError, KeyError) as err:
                raise UpdateRejected(str(err)) from None
            return
        arrays = content["arrays"]
        check_plain_arrays(arrays, self.expected_shapes)
        state = {k: v.numpy() for k, v in arrays.items()}
        if self.cfg.private and self._global is not None:
            bound = dp_change_bound(
                num_examples=n,
                batch_size=self.cfg.batch_size,
                epochs=self.cfg.local_epochs,
                lr=self.cfg.lr * max(1.0, self.cfg.backbone_lr_scale),
                max_grad_norm=self.cfg.max_grad_norm,
                noise_multiplier=float(mech["noise_multiplier"] or 0.0),
                num_params=self.expected_length,
            )
            check_values(state, reference=self._global, max_change_l2=bound)
        else:
            check_values(state)

    def _record_trained(self, server_round: int, cid: str, msg: Message) -> None:
        m = msg.content["metrics"]
        st = msg.content["status"]
        # Only the keys this mode allows (common.protocol): anything else a client adds is not kept.
        report = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in m.items() if k in self.report_keys}
        report["node-id"] = int(msg.metadata.src_node_id)
        noise_source = str(st.get(KEY_NOISE_SOURCE, ""))
        noise_source = noise_source if noise_source in NOISE_SOURCES else None  # the ledger takes known values only
        report[KEY_NOISE_SOURCE] = noise_source or "not reported"
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
                noise_source=noise_source,
                status=STATUS_TRAINED,
            )

    def _drop(
        self, server_round: int, cid: str, reason: str, msg: Message, status: str = "dropped", spent: bool = False
    ) -> None:
        """Log and record a reply that is not aggregated. ``spent``: the site trained for it, so the mechanism
        and epsilon it reports are recorded (status dropped) and count in the run record's epsilons."""
        reason = one_line(reason)
        log.warning("round %d: %s not aggregated: %s", server_round, cid, reason)
        key = cid
        if key in self.current.dropped or key in self.current.clients:  # a second reply claiming this id
            key = base = f"{cid}@node-{msg.metadata.src_node_id}"
            k = 1
            while key in self.current.dropped or key in self.current.clients:
                k += 1
                key = f"{base}#{k}"
        self.current.dropped[key] = reason
        mech: dict[str, Any] = {}
        if spent and "metrics" in msg.content:
            mech = reported_mechanism(msg.content["metrics"])
            if mech.get("epsilon_reported") is not None:
                self.current.rejected_spends[key] = {
                    "epsilon": mech["epsilon_reported"],
                    "node-id": int(msg.metadata.src_node_id),
                }
        if self.ledger is not None:
            ledger_status = STATUS_BUDGET if status == STATUS_BUDGET else "dropped"
            st = msg.content["status"] if msg.has_content() and "status" in msg.content else {}
            accountant = str(st.get("accountant", "")) if mech else ""
            fingerprint = str(st.get("dataset-fingerprint", "")) if mech else ""
            fingerprint = fingerprint if len(fingerprint) <= 128 else ""  # a hex digest, nothing longer
            self.ledger.record_report(
                run_id=self.run_id,
                round=server_round,
                client_id=cid,
                node_id=int(msg.metadata.src_node_id),
                status=ledger_status,
                reason=reason,
                accountant=accountant if accountant in ACCOUNTANTS else None,
                dataset_fingerprint=fingerprint or None,
                **mech,
            )
