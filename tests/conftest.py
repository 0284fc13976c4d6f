import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def package_env():
    """Environment for a subprocess that must import the same dualres_ext as these tests.

    In CI the tests import the *installed* package (pytest's importlib mode keeps the source tree off
    sys.path); a child process started with the repository on its path would import the source
    tree instead, which has no built _C. So the child gets the directory the package came from.
    """
    import os

    import dualres_ext

    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(dualres_ext.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env
