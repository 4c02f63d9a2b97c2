#!/usr/bin/env python3
"""Which tables and indexes a running parleyd's commits write, page by page.

    python3 scripts/wal-pages.py <data_dir> [--commits N]

Copies `parley.db` and `parley.db-wal` from <data_dir> (the server keeps running), reads the
WAL's current frames (those carrying the WAL header's salt), groups them into commits (a frame
with a database size is the last of its commit), and names each frame's page with SQLite's
`dbstat` table on the copy. Prints, for the last N commits (default: all in the WAL), the
pages written per commit by table or index and their share of all frames.

Every WAL frame is a page write of the commit (4 KiB at the default page size, checksummed)
and, later, a page the checkpoint copies into the database file, so frames per message is
the storage cost that batching does not remove. The names are those of the copy: a page freed
and reused between the copies of the two files may be named after its new owner.
"""
import argparse
import collections
import os
import shutil
import sqlite3
import struct
import tempfile


def frames(wal: bytes):
    """The WAL's current frames as (page number, database size or 0)."""
    _magic, _version, page_size, _ckpt, salt1, salt2, _c1, _c2 = struct.unpack(">8I", wal[:32])
    size = 24 + page_size
    offset = 32
    while offset + size <= len(wal):
        page, db_size, s1, s2 = struct.unpack(">4I", wal[offset:offset + 16])
        if (s1, s2) != (salt1, salt2):
            return
        yield page, db_size
        offset += size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("--commits", type=int, default=0, help="only the last N commits")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "parley.db")
        shutil.copyfile(os.path.join(args.data_dir, "parley.db-wal"), db + "-wal")
        shutil.copyfile(os.path.join(args.data_dir, "parley.db"), db)
        with open(db + "-wal", "rb") as f:
            wal = f.read()
        commits, current = [], []
        for page, db_size in frames(wal):
            current.append(page)
            if db_size:
                commits.append(current)
                current = []
        if args.commits:
            commits = commits[-args.commits:]
        if not commits:
            print("no complete commit in the WAL")
            return
        # Opening the copy read-write lets SQLite read its WAL, so pages are named as of it.
        names = {page: name for name, page in sqlite3.connect(db).execute("SELECT name, pageno FROM dbstat")}
    counts = collections.Counter(names.get(page, "(free or new)") for commit in commits for page in commit)
    total = sum(counts.values())
    print(f"{len(commits)} commits, {total / len(commits):.1f} pages per commit")
    for name, n in counts.most_common():
        print(f"{name:40s} {n / len(commits):7.2f} per commit  {100 * n / total:5.1f} %")


if __name__ == "__main__":
    main()
