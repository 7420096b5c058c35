"""Issue 15 item 7: `segfast verify DIR` on a good and on a tampered prepared dataset, run directory and score
output (exit 0 / 1, one JSON document with --json, 2 for a directory that is none of them)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segfast.cli import main
from segfast.scoring import score
from _fakes import interaction_pairs, make_run, prepared_world

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def world(tmp_path):
    p = prepared_world(tmp_path)
    run = make_run(tmp_path, p, "visual")
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(interaction_pairs(p), pairs)
    out = tmp_path / "scores"
    score(run, tmp_path / "p", pairs, out, batch_size=50, part_rows=100, progress=False)
    return {"data": tmp_path / "p", "run": run, "scores": out, "root": tmp_path}


def _verify(capfd, d, *flags):
    capfd.readouterr()
    rc = main(["verify", str(d), "--json", *flags])
    out, err = capfd.readouterr()
    assert out.count("\n") == 1, out
    return rc, json.loads(out), err


def test_good_outputs_verify(world, capfd):
    for kind, key in (("prepared", "data"), ("run", "run"), ("scores", "scores")):
        rc, doc, _ = _verify(capfd, world[key])
        assert rc == 0 and doc["ok"] and doc["kind"] == kind and not doc["problems"], doc
        assert doc["checked"]
    rc, _, _ = _verify(capfd, world["data"])
    capfd.readouterr()
    assert main(["verify", str(world["scores"])]) == 0  # the text form
    assert "OK" in capfd.readouterr().out


def _flip_byte(path, at=None):
    b = bytearray(path.read_bytes())
    i = len(b) // 2 if at is None else at
    b[i] ^= 0x01
    path.write_bytes(bytes(b))


def test_tampered_prepared_dataset(world, capfd):
    d = world["data"]
    f = np.load(d / "features.npy", mmap_mode="r+")  # same size, one value changed
    f[3, 2] = f[3, 2] + 1
    f.flush()
    del f
    rc, doc, _ = _verify(capfd, d)
    assert rc == 1 and not doc["ok"]
    assert len(doc["problems"]) == 1 and "features.npy" in doc["problems"][0] and "sha256" in doc["problems"][0]
    with open(d / "videos.parquet", "ab") as fh:  # a size change
        fh.write(b"x")
    rc, doc, _ = _verify(capfd, d)
    assert rc == 1 and any("videos.parquet" in x and "bytes" in x for x in doc["problems"])


def test_tampered_run(world, capfd):
    run = world["run"]
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["n_heads"] = 4
    (run / "config.json").write_text(json.dumps(cfg))
    rc, doc, _ = _verify(capfd, run)
    assert rc == 1 and any("n_heads" in x for x in doc["problems"])
    cfg["model"]["n_heads"] = 2
    (run / "config.json").write_text(json.dumps(cfg))
    assert _verify(capfd, run)[0] == 0
    _flip_byte(run / "model.safetensors", at=(run / "model.safetensors").stat().st_size - 5)
    rc, doc, _ = _verify(capfd, run)
    assert rc == 1 and any("model.safetensors" in x and "digest" in x for x in doc["problems"])


def test_tampered_score_output(world, capfd):
    out = world["scores"]
    man = json.loads((out / "_manifest.json").read_text())
    part = out / man["parts"][1]["file"]
    t = pq.read_table(part)
    scores = t.column("scores").to_pylist()
    scores[0][0] += 1.0
    pq.write_table(t.set_column(t.column_names.index("scores"), "scores",
                                pa.array(scores, t.schema.field("scores").type)), part, compression="zstd")
    rc, doc, _ = _verify(capfd, out)
    assert rc == 1 and len(doc["problems"]) == 1 and part.name in doc["problems"][0]
    (out / man["parts"][2]["file"]).unlink()
    (out / "part-09999.parquet").write_bytes(b"")
    rc, doc, _ = _verify(capfd, out)
    probs = " | ".join(doc["problems"])
    assert rc == 1 and "missing" in probs and "part-09999.parquet" in probs and "does not list" in probs


def test_not_a_segfast_directory(tmp_path, capfd):
    (tmp_path / "x").mkdir()
    capfd.readouterr()
    assert main(["verify", str(tmp_path / "x"), "--json"]) == 2
    out, err = capfd.readouterr()
    assert out == "" and err.count("\n") == 1 and "no segfast manifest" in err
