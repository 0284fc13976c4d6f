"""Write the golden streams of tests/test_golden.py (``python tests/data/make_golden.py``).

Every input is made here from a seeded NumPy generator (stable across NumPy and torch versions)
or is the package's bundled photo, so the test rebuilds the same inputs and checks that encoding
gives these very bytes and decoding these very values. Rewrite the file only when a change of
the bitstream is intended (and say so in docs/BITSTREAM.md). ``--missing`` keeps every recorded
case as it is and records only the cases the file lacks (new cases, new versions).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from golden_inputs import codec_cases, entropy_cases, rans_cases  # noqa: E402


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def main() -> None:
    from dualres_ext import decode, encode

    golden = {"codec": {}, "entropy": {}, "rans": {}}
    path = HERE / "golden_streams.pt"
    keep = torch.load(path, weights_only=True) if "--missing" in sys.argv[1:] else golden
    torch.set_num_threads(1)  # decoded pixels are exact for one thread count (docs/BITSTREAM.md)
    for name, (image, kwargs) in codec_cases().items():
        if name in keep["codec"]:
            golden["codec"][name] = keep["codec"][name]
            continue
        data = encode(image, **kwargs)
        pixels = decode(data, output="numpy")
        golden["codec"][name] = {"stream": data, "pixels": hashlib.sha256(pixels.tobytes()).hexdigest()}
    for name, (run_encode, run_decode) in entropy_cases().items():
        if name in keep["entropy"]:
            golden["entropy"][name] = keep["entropy"][name]
            continue
        strings = run_encode()
        golden["entropy"][name] = {"strings": strings, "decoded": _digest(run_decode(strings))}
    for name, (run_encode, run_decode) in rans_cases().items():
        if name in keep["rans"]:
            golden["rans"][name] = keep["rans"][name]
            continue
        data = run_encode()
        golden["rans"][name] = {"stream": data, "decoded": _digest(run_decode(data))}
    torch.save(golden, path)
    sizes = {
        k: sum(len(v.get("stream", b"")) + sum(map(len, v.get("strings", []))) for v in d.values())
        for k, d in golden.items()
    }
    print(f"wrote {HERE / 'golden_streams.pt'}: {sizes}")


if __name__ == "__main__":
    main()
