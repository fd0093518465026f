"""privatune: federated, differentially private fine-tuning (Flower + Opacus + TenSEAL).

One installed namespace, four parts kept in the top-level folders of the source tree:

* ``privatune.common``      (``common/``)      what both sides share: config, wire protocol, privacy maths, ledgers, HE
* ``privatune.client``      (``client/``)      what runs at a partner site
* ``privatune.server``      (``server/``)      what runs at the coordinator
* ``privatune.simulations`` (``simulations/``) a whole federation on one machine, benchmarks, audits

An installed wheel holds them under ``privatune/`` (``pyproject.toml`` maps each folder to its subpackage). In a
source checkout (``PYTHONPATH=.``, ``flwr run .``, an editable install) they sit beside this folder instead, so the
checkout's root is added to this package's search path: ``privatune.server`` then imports ``server/``. Nothing
else is added, and an installed copy, which has its own subfolders, is left alone.
"""

from __future__ import annotations

from pathlib import Path

SUBPACKAGES = ("common", "client", "server", "simulations")

_here = Path(__file__).resolve().parent
_root = _here.parent
if not (_here / "common").is_dir() and all((_root / name / "__init__.py").is_file() for name in SUBPACKAGES):
    __path__.append(str(_root))  # a source checkout
