"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU: gloo, DDP): the Accumulator in an
Accelerate loop, exact and three controls; rank 0 writes the weights and what each run saw.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/accelerate_worker.py OUT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from helpers import tiny_llama  # noqa: E402
from test_accelerate import accelerate_run, examples  # noqa: E402

RUNS = {"exact": {}, "naive": {"accumulation": "naive"}, "even_batches": {"even_batches": True},
        "prepared_scheduler": {"prepare_scheduler": True}}


def main(out: Path) -> None:
    initial, data = tiny_llama(), examples()
    result = {}
    for name, options in RUNS.items():
        model, seen = accelerate_run(initial, data, 2, **options)
        result[name] = {**seen, "state": {k: v.clone() for k, v in model.state_dict().items()}}
    if torch.distributed.get_rank() == 0:
        torch.save(result, out / "result.pt")
    torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: gloo can abort at exit
