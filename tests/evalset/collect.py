"""Rebuilds the evaluation photos from the Debian packages they come from.

    python tests/evalset/collect.py candidates CANDIDATE_DIR
    python tests/evalset/collect.py assemble CANDIDATE_DIR LABELS.tsv...

Downloads the packages with `apt-get download`, takes every photograph-like file from the folders
listed below (one file per wallpaper or per costume, the first of its pose variants), applies EXIF
orientation, puts transparent cut-outs on white, scales the longest side down to 1024 px at most
(smaller images keep their size: small photos are part of what is measured) and writes baseline
JPEGs at quality 85. Which candidates are photographs, and what they show, is decided by people in
`labels.tsv`; files labelled `exclude` are not copied into `photos/`.

`assemble` joins the people's label files with the candidates' sources and licences, draws the
fit/test split once (seeded, at random within each source so both halves mix them alike) and
copies the photographs into `photos/`.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import shutil
import random
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

from PIL import Image, ImageOps

PACKAGES = {
    "scratch": [
        ("usr/share/scratch/Media/Backgrounds", "scratch_bg"),
        ("usr/share/scratch/Media/Costumes/Animals", "scratch_animal"),
        ("usr/share/scratch/Media/Costumes/People", "scratch_people"),
        ("usr/share/scratch/Media/Costumes/Things", "scratch_thing"),
        ("usr/share/scratch/Media/Costumes/Transportation", "scratch_transport"),
    ],
    "lomiri-wallpapers-16.04": [("usr/share/backgrounds", "lomiri16")],
    "lomiri-wallpapers-20.04": [("usr/share/backgrounds", "lomiri20")],
    "mate-backgrounds": [
        ("usr/share/backgrounds/mate/nature", "mate"),
        ("usr/share/backgrounds/mate/abstract", "mate"),
    ],
    "ukui-wallpapers": [("usr/share/backgrounds", "ukui")],
    "plasma-workspace-wallpapers": [("usr/share/wallpapers", "plasma")],
    "gcompris-qt-data": [],  # see GCOMPRIS: its photos are inside Qt resource bundles
}
# GCompris activity bundle -> (folder inside it, file-name prefix, how many to take at most).
# Caps keep one theme (28 fish, 29 windmills) from outweighing the rest; the draw is seeded.
GCOMPRIS = {
    "erase": [("resource", "gc_erase", 40)],
    "categorization": [
        ("resource/images/others", "gc_things", 20),
        ("resource/images/tools", "gc_tools", 20),
        ("resource/images/fishes", "gc_fish", 12),
        ("resource/images/renewable", "gc_energy", 10),
    ],
    "explore_world_animals": [("resource/animals", "gc_wild", 20)],
    "explore_farm_animals": [("resource/animals", "gc_farm", 20)],
    "explore_monuments": [("resource", "gc_monument", 25)],
}
GCOMPRIS_RCC = "usr/share/gcompris-qt/rcc"
SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp"}
# Already in tests/photos, where they were used to tune the engine: never evaluation material.
ALREADY_TUNED_ON = {
    "Kleiber_by_Lukas_Baubkus", "friends_by_Aitzol_Berasategi", "Picture_0B_by_freespace",
    "picosdeeuropa_by_Aitzol_Berasategi", "EveningGlow", "Path", "summer_1am", "LadyBird",
}
MAX_SIDE = 1024


def sources(root: Path):
    """(name, file) for each candidate: one per wallpaper, one per costume pose family."""
    for package, folders in PACKAGES.items():
        for folder, prefix in folders:
            base = root / package / folder
            if package == "plasma-workspace-wallpapers":
                for wallpaper in sorted(p for p in base.iterdir() if p.is_dir()):
                    images = [p for p in (wallpaper / "contents" / "images").glob("*") if p.suffix.lower() in SUFFIXES]
                    if wallpaper.name not in ALREADY_TUNED_ON and images:
                        yield package, f"{prefix}_{wallpaper.name}", max(images, key=_pixels)
                continue
            seen_families = set()
            for path in sorted(base.rglob("*")):
                if path.suffix.lower() not in SUFFIXES or path.stem in ALREADY_TUNED_ON:
                    continue
                family = re.match(r"[A-Za-z]+\d*", path.stem).group(0) if "Costumes" in folder else path.stem
                if (prefix, family) in seen_families:
                    continue
                seen_families.add((prefix, family))
                yield package, f"{prefix}_{_slug(family)}", path


def gcompris_sources(root: Path):
    """(name, resource path, image bytes) for the sampled photos inside GCompris' bundles."""
    draw = random.Random(20261130)
    for bundle, folders in GCOMPRIS.items():
        entries = dict(qt_resources(root / "gcompris-qt-data" / GCOMPRIS_RCC / f"{bundle}.rcc"))
        for folder, prefix, most in folders:
            inside = f"/gcompris/src/activities/{bundle}/{folder}/"
            files = sorted(
                p for p in entries
                if p.startswith(inside) and p.lower().endswith((".jpg", ".jpeg", ".png", ".webp"))
            )
            for path in sorted(draw.sample(files, min(most, len(files)))):
                yield f"{prefix}_{_slug(Path(path).stem)}", path, entries[path]


def qt_resources(path: Path):
    """(path, bytes) of every file in a compiled Qt resource bundle (`rcc` format 1 to 3)."""
    data = path.read_bytes()
    if data[:4] != b"qres":
        raise ValueError(f"{path} is not a Qt resource bundle")
    version, tree, payload, names = struct.unpack(">IIII", data[4:20])
    entry_size = 14 if version == 1 else 22

    def name(offset: int) -> str:
        (length,) = struct.unpack(">H", data[names + offset : names + offset + 2])
        return data[names + offset + 6 : names + offset + 6 + 2 * length].decode("utf-16-be")

    def walk(index: int, prefix: str):
        at = tree + index * entry_size
        name_offset, flags = struct.unpack(">IH", data[at : at + 6])
        here = prefix + (name(name_offset) if index else "")
        if flags & 2:  # a directory
            count, first = struct.unpack(">II", data[at + 6 : at + 14])
            for child in range(first, first + count):
                yield from walk(child, here + "/")
            return
        (offset,) = struct.unpack(">I", data[at + 10 : at + 14])
        (length,) = struct.unpack(">I", data[payload + offset : payload + offset + 4])
        blob = data[payload + offset + 4 : payload + offset + 4 + length]
        yield here, zlib.decompress(blob[4:]) if flags & 1 else blob

    yield from walk(0, "")


def licence(copyright_file: Path, path: str) -> tuple[str, str, str]:
    """(licence, copyright holder, comment) that a Debian machine-readable copyright file gives
    `path`: the last stanza that names the file (extension aside: GCompris ships its `.jpg`
    sources as `.webp`), or a glob that matches a tail of its path."""
    parts = path.strip("/").split("/")
    tails = ["/".join(parts[i:]) for i in range(len(parts))]
    stem = Path(parts[-1]).stem
    found = ("", "", "")
    for stanza in re.split(r"\n\s*\n", copyright_file.read_text(encoding="utf-8", errors="replace")):
        fields = dict(re.findall(r"^(Files|Copyright|License|Comment):[ \t]*(.*(?:\n[ \t]+.*)*)", stanza, re.M))
        if "Files" not in fields:
            continue
        for pattern in fields["Files"].split():
            named = pattern.rsplit("/", 1)[-1]
            if any(fnmatch.fnmatchcase(tail, pattern) for tail in tails) or (
                "*" not in named and Path(named).stem == stem
            ):
                holder = " ".join(fields.get("Copyright", "").split())
                holder = holder if len(holder) < 120 else holder[:117] + "..."
                comment = " ".join(fields.get("Comment", "").split())
                found = (fields.get("License", "").split("\n")[0].strip(), holder, comment)
                break
    return found


def _pixels(path: Path) -> int:
    with Image.open(path) as image:
        return image.width * image.height


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def normalise(source) -> Image.Image:
    with Image.open(source) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode in ("P", "LA", "RGBA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))
        image = image.convert("RGB")
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.LANCZOS)
        return image


HERE = Path(__file__).resolve().parent
SPLIT_SEED = 20261130
LABEL_COLUMNS = (
    "file", "split", "expected", "right", "what", "notes", "width", "height",
    "package", "path", "licence", "copyright", "source",
)


def assemble(candidates_dir: Path, label_files: list[Path]) -> int:
    with (candidates_dir / "candidates.tsv").open(encoding="utf-8") as handle:
        candidates = {row["file"]: row for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)}
    kept = []
    for label_file in label_files:
        with label_file.open(encoding="utf-8") as handle:
            for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
                if row["keep"].strip() == "photo":
                    kept.append(row | candidates[row["file"]])
    by_source: dict[str, list[dict]] = {}
    for row in sorted(kept, key=lambda r: r["file"]):
        by_source.setdefault(row["file"].split("_")[0] + "_" + row["file"].split("_")[1], []).append(row)
    draw = random.Random(SPLIT_SEED)
    for group in by_source.values():
        draw.shuffle(group)
    # Alternating along the shuffled sources, not within each, keeps the halves equal in size.
    for position, row in enumerate(row for group in by_source.values() for row in group):
        row["split"] = "fit" if position % 2 == 0 else "test"
    photos = HERE / "photos"
    photos.mkdir(exist_ok=True)
    with (HERE / "labels.tsv").open("w", encoding="utf-8") as out:
        out.write("\t".join(LABEL_COLUMNS) + "\n")
        for row in sorted(kept, key=lambda r: r["file"]):
            row["source"] = row.pop("comment", "")
            out.write("\t".join(" ".join(str(row.get(c, "")).split()) for c in LABEL_COLUMNS) + "\n")
            shutil.copyfile(candidates_dir / row["file"], photos / row["file"])
    print(f"{len(kept)} photographs: {sum(r['split'] == 'fit' for r in kept)} fit, {sum(r['split'] == 'test' for r in kept)} test")
    return 0


def candidates(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=work_dir, check=True)
        for deb in work_dir.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(work_dir / deb.name.split("_")[0])], check=True)
        found = [
            (package, name, f"/{path.relative_to(work_dir / package)}", path)
            for package, name, path in sources(work_dir)
        ]
        found += [
            ("gcompris-qt-data", name, f"/{GCOMPRIS_RCC}/{resource.split('/')[4]}.rcc:{resource}", io.BytesIO(blob))
            for name, resource, blob in gcompris_sources(work_dir)
        ]
        with (out / "candidates.tsv").open("w", encoding="utf-8") as listing:
            listing.write("file\tpackage\tpath\twidth\theight\tlicence\tcopyright\tcomment\n")
            for package, name, inside, source in found:
                image = normalise(source)
                if min(image.size) < 15:
                    continue
                image.save(out / f"{name}.jpg", "JPEG", quality=85)
                copyright_file = work_dir / package / "usr/share/doc" / package / "copyright"
                terms = licence(copyright_file, inside.split(":")[-1].replace("/gcompris/", ""))
                listing.write("\t".join([f"{name}.jpg", package, inside, str(image.width), str(image.height), *terms]) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("candidates").add_argument("out", type=Path)
    assemble_parser = commands.add_parser("assemble")
    assemble_parser.add_argument("candidates_dir", type=Path)
    assemble_parser.add_argument("labels", type=Path, nargs="+")
    args = parser.parse_args()
    if args.command == "candidates":
        return candidates(args.out)
    return assemble(args.candidates_dir, args.labels)


if __name__ == "__main__":
    sys.exit(main())
