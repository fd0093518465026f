"""The stop handler keeps SIGINT/SIGTERM during a run and gives back exactly what was there before."""

from __future__ import annotations

import signal

from privatune.simulations.stopping import StopOnSignal


def test_a_library_cannot_take_the_signal_and_restore_gives_back_the_pre_run_handlers(tmp_path):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stopper = StopOnSignal(tmp_path)
    stopper.install()
    try:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # what Ray or Flower may do during a run
        assert old == before[signal.SIGINT]
        assert signal.signal(signal.SIGINT, old) == signal.SIG_IGN  # the library's own bookkeeping still works
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGINT) == stopper.handle
        assert signal.getsignal(signal.SIGTERM) == stopper.handle
        # Other signals pass straight through.
        prev_usr1 = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        signal.signal(signal.SIGUSR1, prev_usr1)
    finally:
        stopper.restore()
    assert {sig: signal.getsignal(sig) for sig in before} == before  # no SIG_IGN left for later children
    assert signal.signal.__module__ in ("signal", "_signal")
