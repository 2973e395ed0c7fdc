"""The results file: never written through a link, never over an input, refused early when
it cannot be written, cleaned up on a full disk and on SIGTERM/SIGHUP/SIGINT."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import jaccli

from .crafted import assert_no_partials, assert_one_error, invoke, snapshot

ROOT = Path(__file__).resolve().parents[2]


def _compute(work: Path, *extra):
    return invoke("compute", work / "mlp.safetensors", work / "x.npy", *extra)


def test_planted_symlinks_at_every_predictable_name_are_not_followed(work):
    """main wrote `.NAME.partial-PID` through a symlink planted there, overwriting its target."""
    victim = work / "victim.txt"
    victim.write_text("precious")
    for pid in {os.getpid(), os.getppid(), *range(os.getpid() - 3, os.getpid() + 4)}:
        (work / f".out.h5.partial-{pid}").symlink_to(victim)
    (work / "link.h5").symlink_to(victim)
    for target in ("out.h5", "link.h5"):
        result = _compute(work, "-o", work / target, "-q")
        assert result.exit_code == 0, result.output
        assert victim.read_text() == "precious"
        assert not (work / target).is_symlink()
        with jaccli.open_results(work / target) as results:
            assert results.n_samples == 5
    assert (work / f".out.h5.partial-{os.getpid()}").is_symlink()  # left alone, not followed


def test_partial_file_is_private_and_the_finished_file_gets_the_umask_mode(work, monkeypatch):
    import jaccli.io.results.partial_file

    seen = []
    commit = jaccli.io.results.partial_file.PartialFile.commit

    def spy(self):
        seen.append((self.path.name, self.path.lstat().st_mode & 0o777))
        commit(self)
    monkeypatch.setattr(jaccli.io.results.partial_file.PartialFile, "commit", spy)
    assert _compute(work, "-o", work / "out.h5", "-q").exit_code == 0
    (name, mode), = seen
    assert name.startswith(f".out.h5.partial-{os.getpid()}-") and mode == 0o600
    umask = os.umask(0o022)
    os.umask(umask)
    assert (work / "out.h5").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("which", ["data", "model", "symlink to data", "hard link to data"])
def test_output_naming_an_input_is_refused(work, which):
    if which == "symlink to data":
        (work / "alias.npy").symlink_to(work / "x.npy")
        output = work / "alias.npy"
    elif which == "hard link to data":
        os.link(work / "x.npy", work / "same.npy")
        output = work / "same.npy"
    else:
        output = work / ("x.npy" if which == "data" else "mlp.safetensors")
    before = snapshot(work)
    assert_one_error(_compute(work, "-o", output), says="is an input of this run")
    assert snapshot(work) == before


def test_output_naming_targets_vectors_spec_or_results_is_refused(work, mlp):
    import json

    from ..conftest import MLP_SPEC

    np.save(work / "y.npy", np.array([0, 1, 2, 0, 1]))
    np.save(work / "v.npy", np.ones(6, np.float32))
    (work / "spec.json").write_text(json.dumps(MLP_SPEC))
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, work / "plain.st")
    assert _compute(work, "-o", work / "jac.h5", "-q").exit_code == 0
    before = snapshot(work)
    model, data = work / "mlp.safetensors", work / "x.npy"
    cases = [
        ("compute", model, data, "--wrt", "params", "--loss", "cross-entropy", "--targets",
         work / "y.npy", "-o", work / "y.npy"),
        ("jvp", model, data, "--vectors", work / "v.npy", "-o", work / "v.npy"),
        ("compute", work / "plain.st", data, "--arch", work / "spec.json", "-o",
         work / "spec.json"),
        ("spectrum", work / "jac.h5", "-o", work / "jac.h5"),
    ]
    for args in cases:
        assert_one_error(invoke(*args), says="is an input of this run")
    assert snapshot(work) == before


def test_unwritable_output_is_refused_before_any_work(work, monkeypatch):
    import jaccli.pipelines.common

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")
    monkeypatch.setattr(jaccli.pipelines.common, "load_model", never)
    (work / "folder").mkdir()
    assert_one_error(_compute(work, "-o", work / "folder"), says="is a folder")
    assert_one_error(_compute(work, "-o", work / "missing" / "out.h5"), says="does not exist")
    assert_one_error(_compute(work, "-o", "/dev/null"), says="not a regular file")

    import jaccli.io.results.output_guard

    def read_only(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    monkeypatch.setattr(jaccli.io.results.output_guard, "create_exclusive", read_only)
    assert_one_error(_compute(work, "-o", work / "out.h5"), says="read-only")
    assert not (work / "out.h5").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_folder_without_write_permission_is_refused(work):
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert_one_error(_compute(work, "-o", locked / "out.h5"), says="no permission")
    finally:
        locked.chmod(0o700)


def test_disk_full_while_writing_keeps_the_old_file(work, monkeypatch):
    """ENOSPC from the file system in the middle of HDF5's writes: one line, the temporary
    file removed, the previous results byte-identical (main: ~24 h5py tracebacks, then a
    segmentation fault, and a partial file left)."""
    import jaccli.io.results.partial_file

    (work / "out.h5").write_bytes(b"previous results")
    real_pwrite = os.pwrite
    written = [0]

    def filling_pwrite(fd, data, offset):
        if written[0] > 20_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written[0] += len(data)
        return real_pwrite(fd, data, offset)
    monkeypatch.setattr(jaccli.io.results.partial_file.os, "pwrite", filling_pwrite)
    result = _compute(work, "-o", work / "out.h5", "--store", "dense", "--batch-size", "1")
    assert_one_error(result, says="no space left on the device")
    assert (work / "out.h5").read_bytes() == b"previous results"
    assert_no_partials(work)


def _run_python(script: str, *args, cwd: Path, preexec=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=preexec)


def _one_error_line(process, code: int, says: str) -> None:
    lines = process.stderr.splitlines()
    assert process.returncode == code, (process.returncode, process.stderr)
    assert len(lines) == 1 and lines[0].startswith("jaccli: error: "), process.stderr
    assert says in lines[0], lines[0]


def test_file_size_limit_in_a_real_process(work):
    """The kernel refuses the writes (RLIMIT_FSIZE, EFBIG): no crash, one line, nothing left."""
    (work / "out.h5").write_bytes(b"previous results")
    process = _run_python("""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))
        from jaccli.cli import main
        main(sys.argv[1:])
        """, "compute", "mlp.safetensors", "x.npy", "-o", "out.h5", "--store", "dense",
        cwd=work)
    _one_error_line(process, 1, "file too large")
    assert (work / "out.h5").read_bytes() == b"previous results"
    assert_no_partials(work)


@pytest.mark.parametrize("name, code, says", [("SIGTERM", 143, "terminated by SIGTERM"),
                                              ("SIGHUP", 129, "terminated by SIGHUP"),
                                              ("SIGINT", 130, "interrupted")])
def test_signal_while_writing_removes_the_partial_file(work, name, code, says):
    (work / "out.h5").write_bytes(b"previous results")
    process = _run_python("""
        import os, signal, sys
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in background
        import jaccli.pipelines.sink as sink
        submit = sink.ResultSink.submit
        def submit_then_signal(self, *args):
            submit(self, *args)
            os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        sink.ResultSink.submit = submit_then_signal
        from jaccli.cli import main
        main(sys.argv[2:])
        """, name, "compute", "mlp.safetensors", "x.npy", "-o", "out.h5", "--batch-size", "1",
        cwd=work)
    _one_error_line(process, code, says)
    assert (work / "out.h5").read_bytes() == b"previous results"
    assert_no_partials(work)


def test_signal_inside_an_hdf5_callback_waits_for_a_safe_point(work):
    """A signal arriving while HDF5 is inside our file's write method is held, then raised
    between HDF5 calls: no crash at exit, the partial file removed."""
    process = _run_python("""
        import os, signal, sys
        import jaccli.io.results.partial_file as partial_file
        write = partial_file._DescriptorFile.write
        sent = []
        def write_and_signal(self, data):
            if not sent:
                sent.append(1)
                os.kill(os.getpid(), signal.SIGTERM)  # handled inside this frame
            return write(self, data)
        partial_file._DescriptorFile.write = write_and_signal
        partial_file.mark_unsafe(write_and_signal)
        from jaccli.cli import main
        main(sys.argv[1:])
        """, "compute", "mlp.safetensors", "x.npy", "-o", "out.h5", cwd=work)
    _one_error_line(process, 143, "terminated by SIGTERM")
    assert not (work / "out.h5").exists()
    assert_no_partials(work)


def test_stale_partial_files_of_dead_processes_are_removed(work):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [work / f".out.h5.partial-{dead.pid}", work / f".out.h5.partial-{dead.pid}-ab12"]
    alive = work / f".out.h5.partial-{os.getpid()}-cd34"  # a run still writing: kept
    for path in [*stale, alive]:
        path.write_bytes(b"half a file")
    assert _compute(work, "-o", work / "out.h5", "-q").exit_code == 0
    assert not any(p.exists() for p in stale)
    assert alive.exists()
