"""CompressAI 1.2.8's own test suite, run with dualres_ext swapped in (python/run_compressai_tests.py).

Slow (about 1.5 min per mode on two busy cores); deselect with -m "not slow". Needs the network
once to fetch the sdist with pip (cached under ~/.cache/dualres_ext), skips without it."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("compressai")

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_compressai_suite_passes_with_dualres_swapped_in(package_env):
    env = package_env
    proc = subprocess.run(
        [sys.executable, str(ROOT / "python" / "run_compressai_tests.py"), "--mode", "both"],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode == 75:  # run_compressai_tests.EXIT_NO_SDIST
        pytest.skip("the CompressAI sdist could not be fetched: " + proc.stderr.strip()[-300:])
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    # Both modes ran their tests and went through our coder and layers.
    assert proc.stdout.count(" passed") >= 2, tail
    assert "exit 0" in proc.stdout and "dualres_ext calls:" in proc.stdout, tail
