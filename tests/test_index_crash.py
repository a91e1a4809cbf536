"""Crash safety of `polymodal index`: the indexer, run as a subprocess, is killed with SIGKILL
at random moments (at least 10 times). After every kill the collection opens and answers
searches and never holds fewer images than before; the rerun that completes it embeds only
what was not committed; the result equals an uninterrupted run."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing, suppress

import numpy as np
from tests.test_index import make_images, tiny_clip

from polymodal.index import Collection

KILLS = 10
N = 40


# The library call `polymodal index` makes (tests/test_index.py runs the command itself); a bare
# script starts in a fraction of the time the whole command line takes to import.
SCRIPT = """import json, sys
from polymodal.index import build
r = build(sys.argv[1], sys.argv[2], sys.argv[3], progress=False, workers=1, batch_size=4)
print(json.dumps(r.as_dict()))
"""


def index_cmd(images, db, model):
    return [sys.executable, "-c", SCRIPT, str(images), str(db), str(model)]


def records(db):
    with Collection.open(db) as c:
        ids, vecs = c.vectors()
        return {r.path: ((r.hash, r.size, r.mtime, r.width, r.height), v)
                for r, v in zip(c.records(), vecs, strict=True)}


def count(db) -> int:
    try:
        with closing(sqlite3.connect(f"file:{db / 'meta.sqlite'}?mode=ro", uri=True)) as con:
            return con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    except sqlite3.Error:  # not there yet
        return -1


def wait_for_count(db, target: int, proc) -> None:
    """Until the collection holds `target` images or the indexer has ended."""
    while proc.poll() is None and count(db) < target:
        time.sleep(0.005)


def test_killed_indexer_resumes_and_equals_an_uninterrupted_run(tmp_path):
    model = tiny_clip(tmp_path / "clip")
    images = make_images(tmp_path / "images", N, seed=7)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    # One thread: the tiny model's batches are microseconds of work, which a thread pool on a
    # busy machine turns into milliseconds of waiting.
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    ref = subprocess.run(index_cmd(images, tmp_path / "ref", model), capture_output=True, text=True, env=env)
    assert ref.returncode == 0, ref.stderr
    assert json.loads(ref.stdout)["added"] == N

    db, rng, kills, seen = tmp_path / "db", np.random.default_rng(0), 0, 0
    while kills < KILLS:
        proc = subprocess.Popen(index_cmd(images, db, model), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, start_new_session=True)
        if rng.random() < 0.2:  # anywhere in start-up: loading, creating the collection, walking
            time.sleep(float(rng.uniform(0, 1.5)))
        else:  # once a random number of images is committed, up to all (then: the index save)
            wait_for_count(db, int(rng.integers(seen, N + 1)), proc)
            time.sleep(float(rng.uniform(0, 0.05)))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # the indexer alone; its workers die with it
            kills += 1
        proc.communicate()
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of that run may linger into the next
        if not (db / "meta.sqlite").exists():
            continue  # killed before the collection was created
        with Collection.open(db, readonly=True) as c:  # opens, answers searches, kept what it had
            n = len(c)
            assert n >= seen
            if n:
                assert c.search_vector(c.vectors()[1][-1], 3)[0].score > 0.99
        seen = n
        if n == N:  # all committed: start over, so the next kills land mid-run again
            shutil.rmtree(db)
            seen = 0

    done = subprocess.run(index_cmd(images, db, model), capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["added"] == N - seen and doc["unchanged"] == seen  # nothing committed is embedded again
    assert [b["path"] for b in doc["bad"]] == [str(images / "broken.png")]
    got, want = records(db), records(tmp_path / "ref")
    assert got.keys() == want.keys() and len(got) == N
    for p in want:
        assert got[p][0] == want[p][0]
        np.testing.assert_allclose(got[p][1], want[p][1], atol=1e-5)

    # Both answer a search the same way.
    q = next(iter(want.values()))[1]
    with Collection.open(db) as a, Collection.open(tmp_path / "ref") as b:
        assert [(h.path, round(h.score, 5)) for h in a.search_vector(q, 5)] == \
            [(h.path, round(h.score, 5)) for h in b.search_vector(q, 5)]
