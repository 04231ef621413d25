"""Rebuild data/bitext_v11_bundled.csv.gz from the verbatim Bitext v11 rows in ../shared/data/bitext-v11.

    python data/build_bundle.py [--source ../shared/data/bitext-v11]

Only rows whose instruction and response are byte-for-byte from Bitext's file are used (see data/README.md).
"""
import argparse
import csv
import gzip
import io
from pathlib import Path

COLUMNS = ["flags", "instruction", "category", "intent", "response"]
SOURCE_FILES = ["derived/bitext_v11_verbatim_rows.csv", "derived/bitext_v11_partial_rows_no_flags.csv"]
HERE = Path(__file__).resolve().parent

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--source", type=Path, default=HERE.parent.parent / "shared" / "data" / "bitext-v11")
args = parser.parse_args()

seen, rows = set(), []
for name in SOURCE_FILES:
    with open(args.source / name, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            key = (row["instruction"], row["response"])
            if key not in seen:
                seen.add(key)
                rows.append({c: row[c] for c in COLUMNS})

buffer = io.StringIO()
writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
writer.writeheader()
writer.writerows(rows)
# mtime=0 keeps the archive byte-identical across rebuilds.
with gzip.GzipFile(HERE / "bitext_v11_bundled.csv.gz", "wb", mtime=0) as f:
    f.write(buffer.getvalue().encode("utf-8"))
print(f"wrote {len(rows)} rows to {HERE / 'bitext_v11_bundled.csv.gz'}")
