"""Bounded libFuzzer run on the torch-free rANS decoders (fuzz/fuzz_rans_decode.cpp).

Builds the target with clang -fsanitize=fuzzer,address,undefined, replays every saved crash
input in fuzz/regressions/ (each one a past finding that must stay fixed), then fuzzes for
DUALRES_FUZZ_SECONDS (default 20) from a seed corpus of valid streams made by
fuzz/make_corpus.py. Skips when clang or its libFuzzer runtime is missing (Debian:
apt-get install clang-14 libclang-rt-14-dev). The long run: fuzz/run.sh SECONDS.
"""

import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(ROOT, "fuzz")


def _clang():
    for c in [os.environ.get("CLANG")] + ["clang++"] + [f"clang++-{v}" for v in range(19, 13, -1)]:
        if c and shutil.which(c):
            return c
    return None


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory):
    clang = _clang()
    if clang is None:
        pytest.skip("needs clang++ with libFuzzer (apt-get install clang-14 libclang-rt-14-dev)")
    out = tmp_path_factory.mktemp("fuzz")
    exe = str(out / "fuzz_rans_decode")
    cmd = [
        clang,
        "-std=c++20",
        "-g",
        "-O1",
        "-fno-omit-frame-pointer",
        "-fsanitize=fuzzer,address,undefined",
        "-fno-sanitize-recover=undefined",
        os.path.join(FUZZ, "fuzz_rans_decode.cpp"),
        "-o",
        exe,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        if "fuzzer" in r.stderr and ("cannot find" in r.stderr or "No such file" in r.stderr):
            pytest.skip(f"{clang} has no libFuzzer runtime (libclang-rt-*-dev): {r.stderr[-300:]}")
        pytest.fail(f"building the fuzzer failed:\n{r.stderr[-3000:]}")
    return exe, out


def _env():
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=1")
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1"
    return env


def test_fuzz_regressions(fuzzer):
    exe, _ = fuzzer
    files = sorted(glob.glob(os.path.join(FUZZ, "regressions", "*")))
    assert files, "fuzz/regressions/ holds the past crash inputs"
    r = subprocess.run([exe, *files], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


def test_fuzz_bounded_run(fuzzer, package_env):
    exe, out = fuzzer
    seeds = out / "seeds"
    corpus = out / "corpus"
    corpus.mkdir()
    env = _env()
    env["PYTHONPATH"] = package_env["PYTHONPATH"]
    subprocess.run(
        [sys.executable, os.path.join(FUZZ, "make_corpus.py"), str(seeds)],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    secs = int(os.environ.get("DUALRES_FUZZ_SECONDS", "20"))
    r = subprocess.run(
        [
            exe,
            str(corpus),
            str(seeds),
            f"-max_total_time={secs}",
            "-max_len=8192",
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-malloc_limit_mb=512",
            f"-artifact_prefix={out}/",
            "-print_final_stats=1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=secs + 120,
    )
    crashes = glob.glob(str(out / "crash-*")) + glob.glob(str(out / "timeout-*")) + glob.glob(str(out / "oom-*"))
    assert r.returncode == 0 and not crashes, (
        f"libFuzzer found a problem (inputs: {crashes}); add it to fuzz/regressions/:\n{r.stderr[-4000:]}"
    )
    runs = [line for line in r.stderr.splitlines() if line.startswith("stat::number_of_executed_units")]
    # It ran (a count, not a speed test: on two cores shared with a training run 20 s gave 586).
    assert runs and int(runs[0].split(":")[-1]) > 200, r.stderr[-2000:]
