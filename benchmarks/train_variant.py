"""`gradaccum train` with proposed loop changes applied from outside, to measure them before they land.

    python benchmarks/train_variant.py --variant fused,keep_grads -- train --model tiny ...

Variants (comma-separated; each is a change proposed for train.py / accumulate.py, see README.md):
  fused       torch.optim.AdamW(..., fused=True) (train.py does this by default since it was measured)
  keep_grads  optimizer.zero_grad(set_to_none=False): gradient buffers are allocated once and
              reused, instead of freed after every step and allocated (page-faulted) again
  mallopt     glibc: no mmap for large blocks and no trimming, so freed activation and gradient
              memory is reused instead of being returned to the kernel and faulted in again
  thp         THP_MEM_ALLOC_ENABLE=1: huge pages for torch's blocks >= 2 MiB (the CLI's default now)
  checkpointing  activation checkpointing (models.enable_gradient_checkpointing on every loaded model),
              what --gradient-checkpointing will do once train has the flag
Anything after `--` is passed to `gradaccum` unchanged.
"""

from __future__ import annotations

import os
import sys

VARIANTS = ("fused", "keep_grads", "mallopt", "thp", "checkpointing")


def apply(variants: set[str]) -> None:
    unknown = variants - set(VARIANTS)
    if unknown:
        raise SystemExit(f"train_variant.py: unknown variant(s) {sorted(unknown)}; choose from {VARIANTS}")
    if "thp" in variants:  # read once by c10 at its first allocation: before torch is imported
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    if "mallopt" in variants:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)
    import torch

    if "fused" in variants or "keep_grads" in variants:
        base = torch.optim.AdamW
        fused, keep = "fused" in variants, "keep_grads" in variants

        class AdamW(base):
            def __init__(self, params, *args, **kwargs):
                if fused:
                    kwargs.setdefault("fused", True)
                super().__init__(params, *args, **kwargs)

            def zero_grad(self, set_to_none: bool = True) -> None:
                super().zero_grad(set_to_none=False if keep else set_to_none)

        torch.optim.AdamW = AdamW

    if "checkpointing" in variants:
        from gradaccum import models

        finish = models._finish  # every loader ends here, before LoRA, DDP/FSDP2 and the loss module

        def finish_checkpointed(model, tokenizer, dtype):
            model, tokenizer = finish(model, tokenizer, dtype)
            print(models.enable_gradient_checkpointing(model), flush=True)
            return model, tokenizer

        models._finish = finish_checkpointed


def main() -> None:
    argv = sys.argv[1:]
    variants: set[str] = set()
    if argv[:1] == ["--variant"]:
        variants = {v for v in argv[1].split(",") if v}
        argv = argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    apply(variants)
    from gradaccum.cli import main as cli_main

    sys.argv = ["gradaccum", *argv]
    sys.exit(cli_main())


if __name__ == "__main__":
    main()
