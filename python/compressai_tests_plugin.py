"""pytest plugin: run CompressAI 1.2.8's own tests with dualres_ext swapped in.

Loaded by python/run_compressai_tests.py (``-p compressai_tests_plugin``). Before the test modules
are imported (they bind CompressAI names at import time) it replaces, in every ``compressai.*``
module:

* ``GDN`` / ``GDN1`` by ``dualres_ext.layers.GDN`` / ``GDN1`` (fused kernels);
* with ``DUALRES_COMPAT_MODE=classes`` also ``EntropyBottleneck`` / ``GaussianConditional`` by
  ``dualres_ext.compat``'s accelerated subclasses (tensor coding path on our kernels);

and registers the "dualres" entropy coder, which an autouse fixture selects for every test, so
CompressAI's own entropy models (and the serial context models' ``RansDecoder`` /
``BufferedRansEncoder``) code through ``dualres_ext.ans``. The terminal summary counts the calls
that reached our coder and layers, so a run where the swap silently did nothing is visible (and
fails).
"""

from __future__ import annotations

import os
import sys

import pytest

MODE = os.environ.get("DUALRES_COMPAT_MODE", "registry")
if MODE not in ("registry", "classes"):
    raise RuntimeError(f"DUALRES_COMPAT_MODE must be 'registry' or 'classes', got {MODE!r}")

# Tests whose subject is the registry's default itself (test_get_entropy_coder asserts that the
# default is "ans"): the fixture leaves the default alone there.
_REGISTRY_API_TESTS = ("test_coder.py",)

_calls = {"encode": 0, "decode": 0, "gdn": 0}


def _count(fn, key):
    def wrapper(*args, **kwargs):
        _calls[key] += 1
        return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn
    return wrapper


def _replace_everywhere(original, replacement):
    """Rebind a class in every loaded compressai module that imported it by name."""
    for name, module in list(sys.modules.items()):
        if name == "compressai" or name.startswith("compressai."):
            for attr, value in list(vars(module).items()):
                if value is original:
                    setattr(module, attr, replacement)


def pytest_configure(config):
    config.addinivalue_line("markers", "pretrained: needs downloaded pretrained weights")
    config.addinivalue_line("markers", "slow: slow test")

    import compressai
    import compressai.layers.gdn as cai_gdn

    import dualres_ext
    from dualres_ext import compat, layers, ops

    assert compressai.__version__.startswith("1.2.8"), compressai.__version__
    _replace_everywhere(cai_gdn.GDN1, layers.GDN1)
    _replace_everywhere(cai_gdn.GDN, layers.GDN)
    if MODE == "classes":
        _replace_everywhere(compat._CaiEntropyBottleneck, compat.DualresEntropyBottleneck)
        _replace_everywhere(compat._CaiGaussianConditional, compat.DualresGaussianConditional)

    # Count what reaches our kernels (the wrappers in dualres_ext.ops are what every path calls).
    for name in ("rans_encode_compat", "rans_encode"):
        setattr(ops, name, _count(getattr(ops, name), "encode"))
    for name in ("rans_decode_compat", "rans_decode", "rans_decode_compat_stream"):
        setattr(ops, name, _count(getattr(ops, name), "decode"))
    ops.gdn = _count(ops.gdn, "gdn")
    config._dualres_header = (
        f"dualres_ext {dualres_ext.__version__} swapped into compressai "
        f"{compressai.__version__} (mode={MODE}; GDN/GDN1 -> dualres_ext.layers"
        + ("; EntropyBottleneck/GaussianConditional -> dualres_ext.compat" if MODE == "classes" else "")
        + '; entropy coder "dualres")'
    )


def pytest_report_header(config):
    return getattr(config, "_dualres_header", None)


@pytest.fixture(autouse=True)
def _dualres_entropy_coder(request):
    import compressai

    if request.node.path.name in _REGISTRY_API_TESTS:
        yield
        return
    previous = compressai.get_entropy_coder()
    compressai.set_entropy_coder("dualres")
    try:
        yield
    finally:
        compressai.set_entropy_coder(previous)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.write_line(
        f"dualres_ext calls: {_calls['encode']} rANS encodes, {_calls['decode']} rANS decodes, "
        f"{_calls['gdn']} GDN forwards"
    )


def pytest_sessionfinish(session, exitstatus):
    # A full run must have gone through our coder and layers; a filtered run (-k) may not.
    if session.testscollected > 50 and exitstatus == 0 and not all(_calls.values()):
        session.exitstatus = 1
        print(f"\nERROR: the dualres_ext swap was not exercised: {_calls}", file=sys.stderr)
