"""Issue 15 item 6 (case 11): a full disk, permission denied / a read-only --out, a non-finite loss, a directory as
thumbnails' --out, a CUDA error, Ctrl-C and SIGTERM end with one line on stderr naming the file or step and a
documented exit code (segfast._errors), with nothing half-written left behind; prepare checks the free space
before it starts.

Tests run as root, where chmod does not stop a write. A real full / read-only file system is a tiny tmpfs
(mounted when the test may mount, else those tests skip); the same paths are also exercised everywhere by
making the writer raise the OSError the kernel would (ENOSPC, EACCES)."""
from __future__ import annotations

import errno
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from segfast import _errors
from segfast.cli import main
from segfast.data.synth import synth

ROOT = Path(__file__).resolve().parents[1]


def _own_leftovers(parent: Path) -> list[str]:
    """Entries of ``parent`` other than lock files (segfast._lock leaves its emptied lock file by design)."""
    return sorted(p.name for p in parent.iterdir() if not p.name.endswith(".segfast.lock"))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel") / "segmm"
    synth("segmm", d, users=6, videos=60, interactions=1500, seed=0, feature_dim=16, progress=False)
    return d


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(prepared dataset dir, an ID run dir, a pairs Parquet) from the shared scoring world."""
    import pyarrow.parquet as pq
    from _fakes import interaction_pairs, make_run, prepared_world

    root = tmp_path_factory.mktemp("world")
    p = prepared_world(root)
    run = make_run(root, p, "id")
    from segfast.calibration import calibrate_run

    calibrate_run(run, root / "p")  # thumbnails needs the run's calibrator (segfast train writes it)
    pq.write_table(interaction_pairs(p).slice(0, 200), root / "pairs.parquet")
    return root / "p", run, root / "pairs.parquet"


@pytest.fixture
def tiny_fs(tmp_path):
    """A mount point with a small tmpfs on it (skips where this process may not mount)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def mount(size="32k", ro=False):
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if ro else ""), "tmpfs", str(mnt)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
        return mnt

    yield mount
    subprocess.run(["umount", str(mnt)], capture_output=True)


def _prepare_args(release, out):
    return ["prepare", "--source", "segmm", "--input", str(release), "--feature-dim", "16", "--quiet",
            "--out", str(out)]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


# ----------------------------------------------------------------------------------------------------- classify
def test_classify_codes():
    import torch

    c = _errors.classify
    assert c(OSError(errno.ENOSPC, "No space left on device", "/x/part-0.parquet"))[0] == _errors.EXIT_IO
    assert "/x/part-0.parquet" in c(OSError(errno.ENOSPC, "No space left on device", "/x/part-0.parquet"))[1]
    assert c(PermissionError(errno.EACCES, "Permission denied", "/ro/f"))[0] == 3
    assert c(OSError(errno.EROFS, "Read-only file system", "/ro/f"))[0] == 3
    # pyarrow / safetensors carry the reason only in their text; the output is named instead
    code, msg = c(OSError("Error writing bytes to file. Detail: [errno 28] No space left on device"), "out/s")
    assert code == 3 and "out/s" in msg
    assert c(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))[0] == 3
    assert c(FloatingPointError("non-finite training loss nan at step 2"))[0] == _errors.EXIT_NONFINITE == 4
    assert c(RuntimeError("CUDA error: an illegal memory access was encountered\nmore"))[:1] == (5,)
    assert c(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))[0] == 5
    assert c(KeyboardInterrupt())[0] == 130 and c(_errors.Terminated())[0] == 143
    assert c(NotADirectoryError(errno.ENOTDIR, "Not a directory", "f/sub"))[0] == 2
    for bug in (RuntimeError("shape mismatch"), TypeError("x"), AssertionError(), IndexError("i")):
        assert c(bug) is None  # a bug keeps its traceback


# ----------------------------------------------------------------------------------------------------- disk full
def test_prepare_checks_free_space_first(release, tmp_path, monkeypatch, capsys):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(_errors.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10_000, 10_000))
    out = tmp_path / "o" / "p"
    rc = main(_prepare_args(release, out))
    err = _one_line(capsys)
    assert rc == 3
    assert f"{out.parent}: the prepared dataset" in err and "needs about" in err and "9.8 KiB is free" in err
    assert not out.exists() and _own_leftovers(out.parent) == []


def test_prepare_enospc_while_writing(release, tmp_path, monkeypatch, capsys):
    import segfast.data.prepared as prep

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(prep, "_write_parquet", full)
    out = tmp_path / "p"
    rc = main(_prepare_args(release, out))
    err = _one_line(capsys)
    assert rc == 3 and "no space left on device" in err and "interactions.parquet" in err
    assert not out.exists() and _own_leftovers(tmp_path) == []  # the temporary directory is gone


def test_prepare_real_full_disk_is_not_sigbus(release, tiny_fs):
    """case 11: a full disk during prepare's memmap writes ended in SIGBUS (exit 135, no message). The free-space
    check is switched off here, to reach the write itself on a real 32 KiB tmpfs."""
    mnt = tiny_fs("32k")
    code = textwrap.dedent(f"""
        import segfast._errors as e
        e.check_free_space = lambda *a, **k: None
        from segfast.cli import main
        raise SystemExit(main({_prepare_args(release, mnt / 'p')!r}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 3, (r.returncode, r.stderr[-2000:])
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "no space left on device" in err and str(mnt) in err
    assert _own_leftovers(mnt) == []


def test_score_and_train_real_full_disk(world, tiny_fs, capsys):
    data, run, pairs = world
    mnt = tiny_fs("16k")
    (mnt / "fill").write_bytes(b"\0" * 8192)
    rc = main(["score", "--run-dir", str(run), "--data", str(data), "--pairs", str(pairs), "--out", str(mnt / "s"),
               "--device", "cpu", "--quiet", "--part-rows", "50"])
    err = _one_line(capsys)
    assert rc == 3 and "no space left on device" in err and str(mnt / "s") in err
    parts = sorted((mnt / "s").glob("*")) if (mnt / "s").exists() else []
    assert all(not p.name.startswith(".") for p in parts)  # no temporary part left
    (mnt / "fill").unlink()
    for p in parts:
        p.unlink() if p.is_file() else None
    (mnt / "big").write_bytes(b"\0" * 12288)
    rc = main(["train", "--data", str(data), "--out", str(mnt / "r"), "--modality", "id", "--max-steps", "2",
               "--device", "cpu", "--quiet", "--set", "d_model=16", "--set", "n_heads=2"])
    err = _one_line(capsys)
    assert rc == 3 and "no space left on device" in err and str(mnt / "r") in err
    assert all(not p.name.startswith(".") for p in (mnt / "r").rglob("*"))


# ----------------------------------------------------------------------------------------------------- permissions
def test_permission_denied_is_one_line(release, tmp_path, monkeypatch, capsys):
    """Root ignores file modes, so the writer raises what a non-root user would get in a 0555 directory."""
    import segfast.data.prepared as prep

    def denied(path, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(prep, "_write_parquet", denied)
    rc = main(_prepare_args(release, tmp_path / "p"))
    err = _one_line(capsys)
    assert rc == 3 and "cannot write" in err and "Permission denied" in err and "interactions.parquet" in err
    assert _own_leftovers(tmp_path) == []


def test_read_only_out(release, world, tiny_fs, capsys):
    data, run, pairs = world
    mnt = tiny_fs("64k", ro=True)
    for args in (_prepare_args(release, mnt / "p"),
                 ["score", "--run-dir", str(run), "--data", str(data), "--pairs", str(pairs), "--out",
                  str(mnt / "s"), "--device", "cpu", "--quiet"],
                 ["thumbnails", "--run-dir", str(run), "--data", str(data), "--pairs", str(pairs), "--out",
                  str(mnt / "t.parquet"), "--device", "cpu", "--quiet"]):
        rc = main(args)
        err = _one_line(capsys)
        assert rc == 3 and "Read-only file system" in err and str(mnt) in err, err
    assert list(mnt.iterdir()) == []


def test_out_under_a_file(world, tmp_path, capsys):
    data, run, pairs = world
    (tmp_path / "f").write_text("x")
    rc = main(["score", "--run-dir", str(run), "--data", str(data), "--pairs", str(pairs), "--out",
               str(tmp_path / "f" / "s"), "--device", "cpu", "--quiet"])
    err = _one_line(capsys)
    assert rc == 2 and str(tmp_path / "f") in err
    assert (tmp_path / "f").read_text() == "x"


# ----------------------------------------------------------------------------------------------------- training, apps
def test_nonfinite_loss_exit_4(world, tmp_path, capsys):
    data, _, _ = world
    rc = main(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--modality", "id", "--lr", "1e6",
               "--max-steps", "40", "--device", "cpu", "--quiet", "--set", "d_model=16", "--set", "n_heads=2"])
    err = _one_line(capsys)
    assert rc == 4 and "non-finite" in err and ("after step" in err or "at step" in err), err
    assert not (tmp_path / "r" / "model.safetensors").exists()  # no NaN model exported


def test_thumbnails_out_is_a_directory(world, tmp_path, capsys):
    data, run, pairs = world
    d = tmp_path / "d"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        rc = main(["thumbnails", "--run-dir", str(run), "--data", str(data), "--pairs", str(pairs), "--out", str(d),
                   "--device", "cpu", "--quiet"] + extra)
        err = _one_line(capsys)
        assert rc == 2 and str(d) in err
    assert sorted(p.name for p in d.iterdir()) == ["keep.txt"] and (d / "keep.txt").read_text() == "mine"


def test_cuda_error_exit_5(world, tmp_path, monkeypatch, capsys):
    import segfast.cli as cli

    def boom(a):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                           "asynchronously reported")

    monkeypatch.setattr(cli, "_cmd_score", boom)
    data, run, pairs = world
    rc = main(["score", "--run-dir", str(run), "--data", str(data), "--pairs", str(pairs), "--out",
               str(tmp_path / "s"), "--device", "cpu", "--quiet"])
    err = _one_line(capsys)
    assert rc == 5 and err == "segfast score: error: CUDA error: an illegal memory access was encountered"


# ----------------------------------------------------------------------------------------------------- signals
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_prepare_cleans_up(release, tmp_path, sig, code):
    """SIGTERM takes Ctrl-C's path: the temporary directory is removed, one line, exit 143 (130 for SIGINT).
    The child stops inside prepare (its features already written) until the signal comes."""
    out, ready = tmp_path / "p", tmp_path / "ready"
    driver = textwrap.dedent(f"""
        import pathlib, time
        import segfast.data.prepared as prep
        def slow(*a, **k):
            pathlib.Path({str(ready)!r}).write_text("x")
            time.sleep(120)
        prep._write_parquet = slow
        from segfast.cli import main
        raise SystemExit(main({_prepare_args(release, out)!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        t0 = time.monotonic()
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() - t0 < 120
            time.sleep(0.05)
        assert any(n.startswith(".p.tmp-") for n in _own_leftovers(tmp_path))  # mid-write: the temp dir exists
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert len(err.strip().splitlines()) == 1 and ("terminated" if code == 143 else "interrupted") in err
    assert _own_leftovers(tmp_path) == ["ready"]  # no output, no temporary directory
