"""CKKS homomorphic encryption for secure aggregation: keys, packing, encrypt, sum, decrypt.

Pure numpy + TenSEAL's SEAL bindings, no Flower; the Flower record conversion is ``records.py``, which this
``__init__`` does not import (import ``privatune.common.he.records`` where records are needed).

Modules (each says why it is apart): ``errors`` (the ``HEError`` family), ``params`` (``HEParams``, presets,
the bit budget and why), ``seal_io`` (SEAL objects <-> bytes), ``framing`` (format version, file headers),
``context_file`` (the ``.ctx`` format, fingerprints), ``context`` (``HEContext``, per-ciphertext operations),
``keys`` (keygen, key files, ``load_context``), ``packing`` (``Layout``, state <-> vector <-> slots),
``payloads`` (``EncryptedUpdate``/``EncryptedState``), ``aggregation`` (encrypt, check, sum, decrypt),
``checkpoints`` (the server's checkpoint file, ``privatune decrypt``), ``records`` (Flower ArrayRecords).

Protocol
--------
* Key holders (the clients) share one CKKS secret key (``secret.ctx``); the server gets ``public.ctx``
  (parameters + public key, no secret key). Both files carry the same *fingerprint*: sha256 over the
  parameters, the SEAL encryption parameters and the public key bytes.
* A client flattens its trainable state into one float64 vector ``v`` (``flatten_state``), multiplies it
  by its aggregation weight ``w`` and appends ``w`` itself in one extra slot: ``[w*v, w]``. The server
  only adds ciphertexts, so it learns neither an update nor a weight; the decrypting client divides the
  summed vector by the summed weight slot, which gives FedAvg ``sum_k w_k v_k / sum_k w_k``.
* The server encrypts the *initial* global state with the public key (weight 1), and afterwards sends
  the encrypted sum of the last round back (a state, not a delta): a late client decrypts the same model.

Server flow: ``HEAccumulator(ctx, layout)``; ``add`` each parsed reply (``HEReplyError`` -> log the
reason, drop it, go on); ``result()`` is the next global state. ``check_update`` + ``sum_updates`` do
the same in two passes.

What this does not protect: a key holder who gives the server the secret key; malicious clients (they
can encrypt anything, including huge values that spoil the sum); the final model once decrypted.
The integrity digest only detects accidental corruption or malformed replies, not forgery.
"""

from __future__ import annotations

from privatune.common.he.aggregation import (
    HEAccumulator,
    check_update,
    decrypt_state,
    encrypt_state,
    encrypt_update,
    sum_updates,
)
from privatune.common.he.checkpoints import (
    checkpoint_metadata,
    decrypt_checkpoint_to_safetensors,
    load_checkpoint,
    save_checkpoint,
)
from privatune.common.he.context import HEContext
from privatune.common.he.errors import (
    HEError,
    HEFormatError,
    HEInputError,
    HEKeyError,
    HEParamsError,
    HEReplyError,
)
from privatune.common.he.keys import KeyPair, KeyPaths, generate_keys, load_context, write_keys
from privatune.common.he.packing import Layout, flatten_state, unflatten
from privatune.common.he.params import HEParams, compact_params
from privatune.common.he.payloads import EncryptedState, EncryptedUpdate

__all__ = [
    "EncryptedState",
    "EncryptedUpdate",
    "HEAccumulator",
    "HEContext",
    "HEError",
    "HEFormatError",
    "HEInputError",
    "HEKeyError",
    "HEParams",
    "HEParamsError",
    "HEReplyError",
    "KeyPair",
    "KeyPaths",
    "Layout",
    "check_update",
    "checkpoint_metadata",
    "compact_params",
    "decrypt_checkpoint_to_safetensors",
    "decrypt_state",
    "encrypt_state",
    "encrypt_update",
    "flatten_state",
    "generate_keys",
    "load_checkpoint",
    "load_context",
    "save_checkpoint",
    "sum_updates",
    "unflatten",
    "write_keys",
]
