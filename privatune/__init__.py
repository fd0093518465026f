"""privatune: federated, differentially private fine-tuning (Flower + Opacus + TenSEAL).

One installed namespace, four parts kept in the top-level folders of the source tree:

* ``privatune.common``      (``common/``)      what both sides share: config, wire protocol, privacy maths, ledgers, HE
* ``privatune.client``      (``client/``)      what runs at a partner site
* ``privatune.server``      (``server/``)      what runs at the coordinator
* ``privatune.simulations`` (``simulations/``) a whole federation on one machine, benchmarks, audits

In the checkout, ``privatune/common`` and its siblings are relative symlinks to those folders, so every tool sees
the same module names; an installed wheel holds them as real folders. ``docs/architecture.md`` is the map.
"""
