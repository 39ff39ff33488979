"""kill -9 during autosave, 20 times: the annotation file always parses and holds every
annotation saved before the kill (the autosave path: save_store -> the one atomic writer)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from inference.annotation_io import read_file
from tests.conftest import REPO

CHILD = textwrap.dedent("""
    import sys, shapely
    from pathlib import Path
    from inference.annotation_io import save_store
    from inference.annotations import Annotation, AnnotationStore
    path, store = Path(sys.argv[1]), AnnotationStore()
    i = 0
    while True:  # an annotation a few times a second, each autosaved, as a busy user would
        ring = shapely.Point(i * 10.0, i * 7.0).buffer(50 + i % 7, quad_segs=64)  # large files
        store.add(Annotation(ring, "IDC" if i % 2 else "Non-IDC", f"a{i}"))
        save_store(path, store)
        print(i, flush=True)
        i += 1
""")


def test_kill_during_autosave_never_loses_a_saved_annotation(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    path = tmp_path / "slide.svs.annotations.geojson"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(20):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True,
                                env=env, cwd=REPO)
        assert proc.stdout is not None
        first = proc.stdout.readline()  # one save done: the file exists
        assert first.strip().isdigit()
        time.sleep(float(rng.uniform(0.0, 0.3)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        saved = [int(line) for line in [first, *proc.stdout.read().split()] if str(line).strip()]
        names = {a.name for a in read_file(path).annotations}  # always parses
        assert {f"a{i}" for i in range(max(saved) + 1)} <= names
        leftovers = [p.name for p in tmp_path.iterdir() if p.name != path.name]
        assert all(p.startswith(f".{path.name}.") for p in leftovers)  # only a killed write's temp file
        path.unlink()
        for p in tmp_path.iterdir():
            p.unlink()
