"""A reproducible-noise simulation derives its sites' keys from the seed too, so a rerun is the same run."""

from __future__ import annotations

import stat

from privatune.client.site_secret import KEY_BYTES, default_key_path, key_for_ledger
from privatune.common.config import RunConfig
from privatune.common.ledger import site_ledger_filename
from privatune.simulations.simulate import prepare_config, seeded_site_key


def _keys(out, num_clients=3, **kw):
    prepare_config(RunConfig.create(preset="digits", **kw), num_clients, out)
    return {
        pid: default_key_path(out / "ledgers" / site_ledger_filename(f"client-{pid}")) for pid in range(num_clients)
    }


def test_seeded_keys_follow_the_seed_and_differ_per_site(tmp_path):
    a = _keys(tmp_path / "a", reproducible_noise=True, seed=7)
    b = _keys(tmp_path / "b", reproducible_noise=True, seed=7)
    c = _keys(tmp_path / "c", reproducible_noise=True, seed=8)
    read = {name: {pid: p.read_bytes() for pid, p in keys.items()} for name, keys in (("a", a), ("b", b), ("c", c))}
    assert read["a"] == read["b"]
    assert all(read["a"][pid] != read["c"][pid] for pid in a)
    assert len(set(read["a"].values())) == 3 and all(len(k) == KEY_BYTES for k in read["a"].values())
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in a.values())
    # The client then uses that key as its own (it creates none of its own).
    ledger = tmp_path / "a" / "ledgers" / site_ledger_filename("client-0")
    assert key_for_ledger(a[0], ledger) == seeded_site_key(7, "client-0")


def test_site_csprng_runs_write_no_key(tmp_path):
    keys = _keys(tmp_path / "a", reproducible_noise=False)
    assert not any(p.exists() for p in keys.values())
