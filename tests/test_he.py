"""CKKS secure aggregation core: precision, keys, server-side reply checks, checkpoints, records."""

from __future__ import annotations

import dataclasses
import stat

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from safetensors.numpy import load_file

from privatune.common import he
from privatune.common.he.records import (
    META_KEY,
    arrayrecord_to_state,
    records_to_update,
    state_to_arrayrecord,
    update_to_records,
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> he.KeyPaths:
    return he.write_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def sctx(keys: he.KeyPaths) -> he.HEContext:
    return he.load_context(keys.secret, require_secret=True)


@pytest.fixture(scope="module")
def pctx(keys: he.KeyPaths) -> he.HEContext:
    return he.load_context(keys.public, require_secret=False)


def _state(rng: np.random.Generator, scale: float | None = None, n: int = 20_000) -> dict[str, np.ndarray]:
    """A small model-like state; ``scale`` None mixes magnitudes 1e-4..1 element-wise."""

    def vals(size: int) -> np.ndarray:
        mag = 10.0 ** rng.uniform(-4, 0, size) if scale is None else np.full(size, scale)
        return rng.choice([-1.0, 1.0], size) * mag * rng.uniform(0.5, 1.0, size)

    return {
        "encoder.weight": vals(n - 330).reshape(-1, 10).astype(np.float32),
        "encoder.bias": vals(10).astype(np.float32),
        "head.weight": vals(300).reshape(10, 30),
        "head.bias": vals(20).astype(np.float16).astype(np.float32),
    }


def _flat(state: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(v, np.float64).ravel() for v in state.values()])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _fedavg(states: list[dict[str, np.ndarray]], weights: list[float]) -> np.ndarray:
    return sum(w * _flat(s) for s, w in zip(states, weights, strict=True)) / sum(weights)


# ------------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize("scale", [1e-4, 1e-2, 1.0, None])
def test_he_fedavg_matches_plaintext_within_1e6(sctx, pctx, scale) -> None:
    rng = np.random.default_rng(7)
    weights = [1.0, 3.0, 0.5, 120.0, 7.25]  # K=5, unequal, spanning 2.4 decades
    states = [_state(rng, scale) for _ in weights]
    ups = [he.encrypt_update(sctx, s, w) for s, w in zip(states, weights, strict=True)]
    layout = ups[0].layout
    for u in ups:
        he.check_update(pctx, u, layout)
    out = he.decrypt_state(sctx, he.sum_updates(pctx, ups))
    assert list(out) == list(states[0])
    assert all(out[k].dtype == states[0][k].dtype and out[k].shape == states[0][k].shape for k in out)
    assert _rel(_flat(out), _fedavg(states, weights)) <= 1e-6


def test_he_error_itself_is_far_below_target_in_float64(sctx, pctx) -> None:
    rng = np.random.default_rng(1)
    weights = [0.05, 0.2, 0.1, 0.4, 0.25]  # fractions: the small-weight corner
    states = [{"w": rng.normal(size=30_000) * 1e-4} for _ in weights]
    ups = [he.encrypt_update(sctx, s, w) for s, w in zip(states, weights, strict=True)]
    out = he.decrypt_state(sctx, he.sum_updates(pctx, ups))
    assert out["w"].dtype == np.float64
    assert _rel(out["w"], _fedavg(states, weights)) < 1e-7


def test_server_encrypted_initial_state_decrypts(sctx, pctx) -> None:
    rng = np.random.default_rng(2)
    init = _state(rng, None, n=9_000)
    enc = he.encrypt_state(pctx, init)
    assert enc.num_summands == 1
    out = he.decrypt_state(sctx, enc)
    assert _rel(_flat(out), _flat(init)) <= 1e-6


def test_upload_is_seeded_and_small(sctx, pctx) -> None:
    n = 8 * sctx.values_per_chunk - 1  # exactly 8 full ciphertexts with the weight slot
    up = he.encrypt_update(sctx, {"w": np.ones(n, np.float32)}, 2.0)
    assert len(up.chunks) == 8
    assert up.num_bytes / n < 4.2 * 4  # ~4x float32 upload
    summed = he.sum_updates(pctx, [up, up])
    assert summed.num_bytes / n < 8.3 * 4  # ~8x float32 for the full summed state


# ------------------------------------------------------------------------------------------ keys


def test_keys_round_trip_and_fingerprint(keys, sctx, pctx) -> None:
    fp = keys.fingerprint.read_text().strip()
    assert sctx.fingerprint == pctx.fingerprint == fp
    assert sctx.has_secret_key and not pctx.has_secret_key
    assert stat.S_IMODE(keys.secret.stat().st_mode) == 0o600
    assert b"secret_key" not in keys.public.read_bytes()[:2000]
    again = he.load_context(sctx.public_context_bytes(), require_secret=False)
    assert again.fingerprint == fp
    other = he.generate_keys()
    assert other.fingerprint != fp
    with pytest.raises(FileExistsError):
        he.write_keys(keys.secret.parent)


def test_server_refuses_secret_context(keys) -> None:
    with pytest.raises(he.HEKeyError, match=r"holds a secret key; the server must get public.ctx"):
        he.load_context(keys.secret, require_secret=False)


def test_public_context_cannot_decrypt(keys, pctx, sctx) -> None:
    with pytest.raises(he.HEKeyError, match="without the secret key"):
        he.load_context(keys.public, require_secret=True)
    enc = he.encrypt_state(pctx, {"w": np.ones(10, np.float32)})
    with pytest.raises(he.HEKeyError, match="cannot decrypt"):
        he.decrypt_state(pctx, enc)


def test_client_refuses_state_of_another_key(pctx) -> None:
    enc = he.encrypt_state(pctx, {"w": np.ones(10, np.float32)})
    other = he.load_context(he.generate_keys().secret_context, require_secret=True)
    with pytest.raises(he.HEKeyError, match="another key"):
        he.decrypt_state(other, enc)


def test_corrupted_context_file_is_refused(keys, tmp_path) -> None:
    data = bytearray(keys.public.read_bytes())
    data[-100] ^= 0xFF
    with pytest.raises(he.HEFormatError):
        he.load_context(bytes(data))
    with pytest.raises(he.HEFormatError, match="not a privatune HE context"):
        he.load_context(b"garbage" * 10)
    with pytest.raises(he.HEKeyError, match="does not exist"):
        he.load_context(tmp_path / "missing.ctx")


def test_params_below_128_bit_security_are_refused() -> None:
    with pytest.raises(he.HEParamsError, match="security"):
        he.generate_keys(he.HEParams(coeff_mod_bit_sizes=(60, 60, 60, 60)))  # 240 > 218 bits at N=8192
    with pytest.raises(he.HEParamsError):
        he.HEParams(poly_modulus_degree=3000)


# ------------------------------------------------------------------------------------------ bad replies


@pytest.fixture(scope="module")
def good_update(sctx) -> he.EncryptedUpdate:
    rng = np.random.default_rng(3)
    return he.encrypt_update(sctx, _state(rng, None, n=20_000), 4.0)


def _reason(ctx, update, expected) -> str:
    with pytest.raises(he.HEReplyError) as info:
        he.check_update(ctx, update, expected)
    return info.value.reason


def test_good_update_passes(pctx, good_update) -> None:
    he.check_update(pctx, good_update, good_update.layout)
    he.check_update(pctx, good_update, good_update.layout.total)


def test_wrong_fingerprint_is_refused(pctx, good_update) -> None:
    bad = dataclasses.replace(good_update, fingerprint="0" * 64, digest="")
    assert "fingerprint mismatch" in _reason(pctx, bad, good_update.layout)
    other = he.load_context(he.generate_keys().secret_context)
    foreign = he.encrypt_update(other, {"w": np.ones(5, np.float32)}, 1.0)
    assert "fingerprint mismatch" in _reason(pctx, foreign, 5)


def test_truncated_ciphertext_is_refused(pctx, good_update) -> None:
    chunks = list(good_update.chunks)
    chunks[1] = chunks[1][: len(chunks[1]) // 2]
    in_transit = dataclasses.replace(good_update, chunks=chunks)  # digest kept: damaged on the way
    assert "digest mismatch" in _reason(pctx, in_transit, good_update.layout)
    at_source = dataclasses.replace(good_update, chunks=chunks, digest="")  # digest made over bad bytes
    reason = _reason(pctx, at_source, good_update.layout)
    assert "ciphertext 1" in reason and "does not decode" in reason


@pytest.mark.parametrize("where", ["header", "parms_id", "middle"])
def test_corrupted_ciphertext_is_refused(pctx, good_update, where) -> None:
    chunks = list(good_update.chunks)
    b = bytearray(chunks[0])
    pos = {"header": 2, "parms_id": 20, "middle": len(b) // 2}[where]
    b[pos : pos + 8] = bytes(x ^ 0xA5 for x in b[pos : pos + 8])
    chunks[0] = bytes(b)
    assert "digest mismatch" in _reason(pctx, dataclasses.replace(good_update, chunks=chunks), good_update.layout)
    if where != "middle":  # a flip inside uniformly random coefficients is only caught by the digest
        reason = _reason(pctx, dataclasses.replace(good_update, chunks=chunks, digest=""), good_update.layout)
        assert "ciphertext 0" in reason


def test_random_bytes_and_oversized_chunks_are_refused(pctx, good_update) -> None:
    rng = np.random.default_rng(4)
    for blob in (rng.bytes(len(good_update.chunks[0])), rng.bytes(pctx.max_chunk_bytes() + 1), b""):
        chunks = [blob, *good_update.chunks[1:]]
        assert "ciphertext 0" in _reason(
            pctx, dataclasses.replace(good_update, chunks=chunks, digest=""), good_update.layout
        )


def test_wrong_number_of_ciphertexts_is_refused(pctx, good_update) -> None:
    fewer = dataclasses.replace(good_update, chunks=good_update.chunks[:-1], digest="")
    assert "wrong number of ciphertexts" in _reason(pctx, fewer, good_update.layout)
    more = dataclasses.replace(good_update, chunks=good_update.chunks + good_update.chunks[:1], digest="")
    assert "wrong number of ciphertexts" in _reason(pctx, more, good_update.layout)


def test_wrong_layout_is_refused(pctx, sctx, good_update) -> None:
    lay = good_update.layout
    shapes = list(lay.shapes)
    shapes[0] = (shapes[0][0] - 1, shapes[0][1])
    reason = _reason(pctx, good_update, dataclasses.replace(lay, shapes=tuple(shapes)))
    assert "layout mismatch" in reason and "encoder.weight" in reason
    assert "layout mismatch" in _reason(pctx, good_update, lay.total + 1)


def test_ciphertext_at_wrong_scale_or_summed_is_refused(pctx, sctx) -> None:
    up = he.encrypt_update(sctx, {"w": np.ones(10, np.float32)}, 1.0)
    summed = he.sum_updates(pctx, [up, up])
    as_reply = he.EncryptedUpdate(summed.fingerprint, summed.layout, summed.chunks)
    he.check_update(pctx, as_reply, 10)  # a sum is still a valid fresh-level ciphertext ...
    assert "one update" in _reason(pctx, summed, 10)  # ... but a state claiming 2 summands is not a reply


def test_non_finite_update_is_refused(sctx) -> None:
    state = {"a": np.ones(5, np.float32), "layer.bias": np.array([0.0, np.nan, np.inf], np.float32)}
    with pytest.raises(he.HEInputError, match=r"'layer.bias' has 2 non-finite"):
        he.encrypt_update(sctx, state, 1.0)
    with pytest.raises(he.HEInputError, match="weight"):
        he.encrypt_update(sctx, {"a": np.ones(3)}, float("nan"))
    with pytest.raises(he.HEInputError, match="weight"):
        he.encrypt_update(sctx, {"a": np.ones(3)}, 0.0)
    with pytest.raises(he.HEInputError, match=r"'big'.*overflow"):
        he.encrypt_update(sctx, {"big": np.full(3, 1e12)}, 1e4)
    with pytest.raises(he.HEInputError, match="dtype int64"):
        he.encrypt_update(sctx, {"steps": np.arange(3)}, 1.0)


def test_sum_refuses_mixed_layouts(pctx, sctx) -> None:
    a = he.encrypt_update(sctx, {"w": np.ones(10, np.float32)}, 1.0)
    b = he.encrypt_update(sctx, {"v": np.ones(10, np.float32)}, 1.0)
    with pytest.raises(he.HEReplyError, match="update 1"):
        he.sum_updates(pctx, [a, b])
    with pytest.raises(he.HEReplyError, match="no updates"):
        he.sum_updates(pctx, [])


# ------------------------------------------------------------------------------------------ packing


def test_flatten_unflatten_round_trip() -> None:
    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array(2.5), "c": np.zeros((0, 4))}
    vec, layout = he.flatten_state(state)
    assert vec.dtype == np.float64 and vec.size == layout.total == 7
    back = he.unflatten(vec, he.Layout.from_json(layout.to_json()))
    assert list(back) == ["a", "b", "c"]
    for k in state:
        assert back[k].dtype == state[k].dtype and back[k].shape == state[k].shape
        np.testing.assert_array_equal(back[k], state[k])
    with pytest.raises(he.HEInputError):
        he.unflatten(vec[:-1], layout)
    with pytest.raises(he.HEFormatError):
        he.Layout.from_json('{"names": ["a"], "shapes": [[2]], "dtypes": ["int8"]}')


# ------------------------------------------------------------------------------------------ checkpoint


def test_checkpoint_round_trip_and_decrypt_to_safetensors(keys, sctx, pctx, tmp_path) -> None:
    rng = np.random.default_rng(5)
    states = [_state(rng, None, n=5_000) for _ in range(3)]
    summed = he.sum_updates(pctx, [he.encrypt_update(sctx, s, w) for s, w in zip(states, [1, 2, 3], strict=True)])
    path = he.save_checkpoint(tmp_path / "ckpt" / "global.he", summed)
    loaded = he.load_checkpoint(path)
    assert loaded.chunks == summed.chunks and loaded.layout == summed.layout and loaded.num_summands == 3
    out = he.decrypt_checkpoint_to_safetensors(keys.secret, path, tmp_path / "model.safetensors")
    tensors = load_file(str(out))
    assert set(tensors) == set(states[0])
    assert _rel(_flat({k: tensors[k] for k in states[0]}), _fedavg(states, [1, 2, 3])) <= 1e-6
    with pytest.raises(he.HEKeyError):
        he.decrypt_checkpoint_to_safetensors(keys.public, path, tmp_path / "x.safetensors")
    data = bytearray(path.read_bytes())
    data[-10] ^= 1
    (tmp_path / "bad.he").write_bytes(bytes(data))
    with pytest.raises(he.HEFormatError, match="corrupted"):
        he.load_checkpoint(tmp_path / "bad.he")
    (tmp_path / "short.he").write_bytes(bytes(data[:-10]))
    with pytest.raises(he.HEFormatError, match="truncated"):
        he.load_checkpoint(tmp_path / "short.he")


# ------------------------------------------------------------------------------------------ records


def test_update_records_round_trip(sctx, pctx, good_update) -> None:
    records = update_to_records(good_update)
    assert set(records) == {"arrays"}
    reply = RecordDict({**records, "metrics": MetricRecord({"num-examples": 4})})
    assert len(reply.array_records) == 1 and len(reply.metric_records) == 1
    back = records_to_update(reply)
    assert back.chunks == good_update.chunks and back.layout == good_update.layout
    he.check_update(pctx, back, good_update.layout)


def _through_the_wire(obj):
    """Deflate and inflate a record the way Flower ships it (arrays travel as ArrayChunks)."""
    children = {cid: _through_the_wire(c) for cid, c in obj.children.items()} if obj.children else None
    return type(obj).inflate(obj.deflate(), children) if children is not None else type(obj).inflate(obj.deflate())


def test_state_arrayrecord_round_trip(sctx, pctx) -> None:
    enc = he.encrypt_state(pctx, {"w": np.linspace(-1, 1, 100).astype(np.float32)})
    rec = state_to_arrayrecord(enc)
    assert isinstance(rec, ArrayRecord)
    back = arrayrecord_to_state(_through_the_wire(rec))
    assert back.chunks == enc.chunks and back.digest == enc.digest
    np.testing.assert_allclose(he.decrypt_state(sctx, back)["w"], np.linspace(-1, 1, 100), atol=1e-6)
    with pytest.raises(he.HEFormatError, match="kind"):
        records_to_update({"arrays": rec})


def test_malformed_reply_records_are_refused(good_update) -> None:
    rec = update_to_records(good_update)["arrays"]
    missing = ArrayRecord({k: v for k, v in rec.items() if k != "he.ct.00001"})
    with pytest.raises(he.HEReplyError, match="announces 3 ciphertexts, the record holds 2"):
        records_to_update({"arrays": missing})
    with pytest.raises(he.HEReplyError, match="not an HE payload"):
        records_to_update({"arrays": ArrayRecord({"w": Array(np.ones(3, np.float32))})})
    bad_meta = ArrayRecord({**rec, META_KEY: Array(np.frombuffer(b"{not json", np.uint8))})
    with pytest.raises(he.HEReplyError, match="malformed metadata"):
        records_to_update({"arrays": bad_meta})
    wrong_dtype = ArrayRecord({**rec, "he.ct.00000": Array(np.ones(3, np.float32))})
    with pytest.raises(he.HEReplyError, match="uint8"):
        records_to_update({"arrays": wrong_dtype})
    with pytest.raises(he.HEReplyError, match="expected one ArrayRecord"):
        records_to_update({"metrics": MetricRecord({"a": 1})})


def test_accumulator_drops_bad_reply_and_keeps_the_rest(sctx, pctx) -> None:
    rng = np.random.default_rng(6)
    weights = [2.0, 5.0, 1.0]
    states = [_state(rng, None, n=10_000) for _ in weights]
    ups = [he.encrypt_update(sctx, s, w) for s, w in zip(states, weights, strict=True)]
    broken = dataclasses.replace(ups[1], chunks=ups[1].chunks[:-1], digest="")
    acc = he.HEAccumulator(pctx, ups[0].layout)
    acc.add(ups[0])
    with pytest.raises(he.HEReplyError, match="wrong number of ciphertexts"):
        acc.add(broken)
    acc.add(ups[2])
    state = acc.result()
    assert state.num_summands == 2
    out = he.decrypt_state(sctx, state)
    assert _rel(_flat(out), _fedavg([states[0], states[2]], [2.0, 1.0])) <= 1e-6


def test_accumulator_enforces_max_summands() -> None:
    kp = he.generate_keys(dataclasses.replace(he.HEParams(), max_summands=2))
    s = he.load_context(kp.secret_context, require_secret=True)
    p = he.load_context(kp.public_context, require_secret=False)
    up = he.encrypt_update(s, {"w": np.ones(4, np.float32)}, 1.0)
    acc = he.HEAccumulator(p, 4)
    acc.add(up)
    acc.add(up)
    with pytest.raises(he.HEReplyError, match="max_summands"):
        acc.add(up)
    with pytest.raises(he.HEReplyError, match="no valid updates"):
        he.HEAccumulator(p, 4).result()
