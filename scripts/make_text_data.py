"""Make curvscope/io/data/kjv.txt.gz once from Debian's bible-kjv packages (no download).

The King James Version text ships in Debian's ``bible-kjv-text`` package in the Bible
Retrieval System's own compressed format; the ``bible`` program of ``bible-kjv`` prints it.
Either install both packages (``apt-get install bible-kjv``) or extract them without
installing::

    cd /tmp && apt-get download bible-kjv-text bible-kjv
    dpkg -x bible-kjv-text_*.deb kjv && dpkg -x bible-kjv_*.deb kjv
    python scripts/make_text_data.py --root /tmp/kjv

This script only runs that program on those files; it fetches nothing. It keeps six books
(about 700 KB), one verse a line without its reference, a blank line between chapters and
the book's name above each book, and writes them gzip-compressed (mtime 0, so the bytes
are the same on every run).

``--quick``: written to ``--out`` or a temporary folder (never into the repository); without
the extracted packages it prints a skip line and runs the text formatting on a few sample
lines of the program's output instead (seconds).
"""

import argparse
import gzip
import re
import subprocess
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "curvscope" / "io" / "data" / "kjv.txt.gz"

# The program's book abbreviations (as it prints them) -> the names written above each book.
BOOKS = {
    "Ge": "Genesis",
    "Exo": "Exodus",
    "Ruth": "Ruth",
    "Psa": "Psalms",
    "Prv": "Proverbs",
    "Eccl": "Ecclesiastes",
}
REF = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


# what ``bible -f`` prints, for --quick without the packages
SAMPLE = """Ge1:1 In the beginning God created the heaven and the earth.
Ge1:2 And the earth was without form, and void.
Ge2:1 Thus the heavens and the earth were finished.
Mat1:1 The book of the generation of Jesus Christ.
Ruth1:1 Now it came to pass in the days when the judges ruled.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/"), help="where the .debs are extracted")
    ap.add_argument("--out", type=Path, default=None, help=f"default {OUT}")
    ap.add_argument("--quick", action="store_true", help="a temporary folder; sample lines")
    args = ap.parse_args()
    out_path = args.out or (Path(tempfile.mkdtemp()) / OUT.name if args.quick else OUT)
    program = args.root / "usr" / "bin" / "bible"
    data_dir = args.root / "usr" / "lib"
    if not (data_dir / "bible.data").exists():
        missing = f"{data_dir / 'bible.data'} is missing: extract or install bible-kjv-text"
        if not args.quick:
            raise SystemExit(missing)
        print(f"skip the KJV text: {missing}; formatting sample lines instead")
        text = SAMPLE
    else:
        # -f: one verse a line, "Ge1:1 In the beginning..."; -p: where bible.data lies.
        text = subprocess.run(
            [str(program), "-f", "-p", str(data_dir), "gen1:1-rev22:21"],
            check=True,
            capture_output=True,
            text=True,
            encoding="ascii",
        ).stdout
    write(books(text, program), out_path)


def books(text: str, program: Path) -> bytes:
    """The kept books from ``bible -f`` output: names, verses, blank lines between chapters."""
    out: list[str] = []
    book = chapter = None
    for line in text.splitlines():
        m = REF.match(line)
        if m is None:
            raise SystemExit(f"unexpected line from {program}: {line!r}")
        abbr, chap, verse = m.group(1), int(m.group(2)), m.group(4).strip()
        if abbr not in BOOKS:
            continue
        if abbr != book:
            if out:
                out.append("")
            out += [BOOKS[abbr], ""]
            book, chapter = abbr, chap
        elif chap != chapter:
            out.append("")
            chapter = chap
        out.append(verse)
    return ("\n".join(out) + "\n").encode("ascii")


def write(data: bytes, path: Path) -> None:
    """gzip with mtime 0, so the bytes are the same on every run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz,
    ):
        gz.write(data)
    print(f"wrote {path}: {len(data)} characters, {path.stat().st_size} bytes gzipped")


if __name__ == "__main__":
    main()
