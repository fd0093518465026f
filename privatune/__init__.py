"""privatune: federated, differentially private fine-tuning (Flower + Opacus + TenSEAL).

One installed namespace, four parts kept in the top-level folders of the source tree:

* ``privatune.common``      (``common/``)      what both sides share: config, wire protocol, privacy maths, ledgers, HE
* ``privatune.client``      (``client/``)      what runs at a partner site
* ``privatune.server``      (``server/``)      what runs at the coordinator
* ``privatune.simulations`` (``simulations/``) a whole federation on one machine, benchmarks, audits

In the checkout, ``privatune/common`` and its siblings are relative symlinks to those folders, so every tool sees
the same module names; an installed wheel holds them as real folders, and a Flower App bundle, which drops
symlinks, gets the bundle's root on this package's path instead (below). ``docs/architecture.md`` is the map.
"""

from pathlib import Path as _Path

_SUBPACKAGES = ("common", "client", "server", "simulations")
_here = _Path(__file__).resolve().parent
_root = _here.parent
# A Flower App bundle (FAB, `flwr run .`) leaves the symlinks out: its privatune/ then has no subfolders, and the
# four folders sit beside it, as in the checkout. Only then is the bundle's root added to this package's path.
if not (_here / "common").is_dir() and all((_root / name / "__init__.py").is_file() for name in _SUBPACKAGES):
    __path__.append(str(_root))
