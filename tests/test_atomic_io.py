"""segfast._io (atomic writes, umask-implied modes) and segfast._hash (the one SplitMix64).

The mode checks run in a subprocess per umask (022 and 077), so the umask of this test process is never
changed; each subprocess writes through every writer segfast uses (plain helpers, checkpoint files and
directories, a prepared dataset, score's JSON) and reports the modes it finds.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segfast import _hash, _io

REPO = Path(__file__).resolve().parents[1]

_WRITER = r"""
import json, os, stat, sys
from pathlib import Path
import numpy as np
import torch
import pyarrow as pa

os.umask(int(sys.argv[2], 8))
root = Path(sys.argv[1])
from segfast import _io
from segfast import checkpoint as ck
from segfast import score as sc
from segfast.data.prepared import prepare_raw
from segfast.data.sources import RawInteractions

_io.write_json(root / "a" / "x.json", {"a": 1})            # parent directory created too
_io.write_text(root / "t.txt", "hello")
_io.write_bytes(root / "b.bin", b"\x00\x01")
_io.write_parquet(root / "p.parquet", pa.table({"x": [1, 2]}))
ck.write_json(root / "run" / "config.json", {"k": 1})
ck.save_tensors(root / "run" / "w.safetensors", {"w": torch.ones(3)})
ck.save_state(root / "run", "best", torch.nn.Linear(2, 2), {"step": 1}, rng=False)
sc._atomic_json(root / "score" / "manifest.json", {"parts": []})
n = 120
raw = RawInteractions(user_id=np.repeat(np.arange(2, dtype=np.int64), n // 2),
                      video_id=np.arange(n, dtype=np.int64) % 7, time_ms=np.arange(n, dtype=np.int64),
                      duration_ms=np.full(n, 12000, np.int64), play_time_ms=np.full(n, 6000, np.int64),
                      source_row=np.arange(n, dtype=np.int64), rows_read=n, dropped={})
prepare_raw(raw, root / "prep", "kuairand", seed=0, progress=False)
modes = {}
for p in sorted(root.rglob("*")):
    modes[str(p.relative_to(root))] = [stat.S_IMODE(p.stat().st_mode), p.is_dir()]
print(json.dumps(modes))
"""


@pytest.mark.parametrize("umask,fmode,dmode", [("022", 0o644, 0o755), ("077", 0o600, 0o700)])
def test_written_files_get_the_umask_implied_mode(tmp_path, umask, fmode, dmode):
    root = tmp_path / "w"
    root.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _WRITER, str(root), umask], capture_output=True, text=True,
                       cwd=str(REPO), env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    modes = json.loads(r.stdout.strip().splitlines()[-1])
    expected = {"a", "a/x.json", "t.txt", "b.bin", "p.parquet", "run/config.json", "run/w.safetensors",
                "run/best", "run/best/model.safetensors", "run/best/state.json", "score/manifest.json", "prep",
                "prep/manifest.json", "prep/interactions.parquet"}
    assert expected <= set(modes), sorted(set(expected) - set(modes))
    assert not [k for k in modes if ".tmp-" in k or ".old" in k], modes  # no temp leftovers
    for name, (mode, is_dir) in modes.items():
        assert mode == (dmode if is_dir else fmode), f"{name}: {oct(mode)} under umask {umask}"


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "x.json"
    _io.write_json(p, {"v": 1})

    def boom(tmp):
        Path(tmp).write_text("partial")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        _io.write_with(p, boom)
    assert json.loads(p.read_text()) == {"v": 1}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["x.json"]


def test_write_json_round_trip_and_replace(tmp_path):
    p = tmp_path / "d" / "x.json"
    _io.write_json(p, {"b": [1, 2], "a": "é"}, sort_keys=True)
    _io.write_json(p, {"c": 3})
    assert json.loads(p.read_text(encoding="utf-8")) == {"c": 3}
    assert p.read_text().endswith("\n")


def test_install_dir_refuses_then_replaces(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new = _io.temp_dir(tmp_path, prefix=".out.tmp-")
    assert stat.S_IMODE(new.stat().st_mode) == _io.dir_mode()
    (new / "new.txt").write_text("new")
    with pytest.raises(FileExistsError, match="already exists"):
        _io.install_dir(new, out, overwrite=False)
    _io.install_dir(new, out, overwrite=True)
    assert sorted(x.name for x in out.iterdir()) == ["new.txt"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"]


def test_current_umask_matches_os(tmp_path):
    old = os.umask(0o027)
    try:
        assert _io.current_umask() == 0o027
        assert _io.file_mode() == 0o640 and _io.dir_mode() == 0o750
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------------------------ SplitMix64

def _splitmix64_reference(state: int, n: int) -> list:
    """Vigna's splitmix64.c in plain Python integers (independent of the numpy implementation)."""
    out, m = [], (1 << 64) - 1
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & m
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        out.append(z ^ (z >> 31))
    return out


def test_splitmix64_known_outputs():
    # published first outputs of SplitMix64 from seed 0 and from seed 1234567
    assert _splitmix64_reference(0, 1) == [0xE220A8397B1DCDAF]
    assert _splitmix64_reference(1234567, 3) == [6457827717110365317, 3203168211198807973, 9817491932198370423]
    for seed in (0, 1234567, (1 << 64) - 1, 42):
        k = np.arange(1, 65, dtype=np.uint64)
        with np.errstate(over="ignore"):
            states = np.uint64(seed) + k * _hash.GOLDEN
        assert _hash.splitmix64(states).tolist() == _splitmix64_reference(seed, 64)


def test_splitmix64_does_not_modify_input_and_is_shared():
    from segfast import evaluate
    from segfast.data import splits

    x = np.arange(10, dtype=np.uint64)
    before = x.copy()
    _hash.splitmix64(x)
    assert np.array_equal(x, before)
    assert splits._mix is _hash.splitmix64 and evaluate._mix64 is _hash.splitmix64
