"""Run under `torchrun --nproc-per-node 2`: make_exact and plain Trainer on 2 gloo CPU ranks.

    python -m torch.distributed.run --nproc-per-node 2 tests/hf_ddp_worker.py MODEL OUT_DIR

Each rank trains micro-batches of 2 with accumulation 2 (windows of 8 over both ranks); rank 0
writes the final parameters and logged losses of both runs to OUT_DIR/result.pt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from test_hf import causal_lm, lm_examples, logged_losses, params, train  # noqa: E402


def main(model_name: str, out: Path) -> None:
    initial, data = causal_lm(model_name), lm_examples()
    result = {}
    for name, exact in (("exact", True), ("plain", False)):
        model, _, trainer = train(initial, data, out / name, 2, 2, exact=exact, ddp_backend="gloo")
        result[name] = [p.clone() for p in params(model)]
        result[f"{name}_losses"] = logged_losses(trainer)
        if exact:
            result["head_path"] = trainer._gradaccum.head_path
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(result, out / "result.pt")
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: gloo can abort at exit
