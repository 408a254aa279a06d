"""One process at a time in a run folder (lm_opt/run_lock.py): a live holder keeps it and is named,
a killed one blocks nobody; `fit` refuses a folder in use before it builds anything, and of two
`fit`s started at once into one folder one runs and the other refuses."""

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import fit, fit_fails, summary, tiny_args
from lm_opt import run_lock
from lm_opt.run_lock import FD_ENV, HOLDER_FILE, LOCK_FILE, holder_of, try_lock
from lock_helpers import hold

ROOT = Path(__file__).parent.parent


def test_a_live_holder_keeps_the_folder_and_a_killed_one_blocks_nobody(tmp_path, caplog):
    folder = tmp_path / "run"
    holder = hold(folder)
    assert try_lock(folder, "fit") is None
    assert holder_of(folder).startswith(f"pid {holder.pid} on host {socket.gethostname()} (fit since ")
    holder.kill()  # SIGKILL: no release, its holder file stays
    holder.wait()
    lock = try_lock(folder, "fit")
    assert lock is not None
    assert f"taking it over from pid {holder.pid} on host" in caplog.text
    assert holder_of(folder).startswith(f"pid {os.getpid()} ")
    lock.release()
    assert not (folder / HOLDER_FILE).exists()


def test_a_lock_handed_down_by_the_parent_is_this_processs_own(tmp_path, monkeypatch):
    """`sweep` and a point's command.sh hand their lock to the `fit` they start: the open file is
    shared, so the child holds the same lock instead of being refused by it."""
    folder = tmp_path / "run"
    folder.mkdir()
    parents = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(parents, fcntl.LOCK_EX | fcntl.LOCK_NB)
    sweeps = {"pid": 1, "host": "node", "role": "sweep", "since": "then"}
    (folder / HOLDER_FILE).write_text(json.dumps(sweeps))
    monkeypatch.setenv(FD_ENV, str(parents))
    lock = try_lock(folder, "fit")
    assert lock.fd == parents and FD_ENV not in os.environ
    assert holder_of(folder).startswith(f"pid {os.getpid()} ")
    lock.release()
    assert json.loads((folder / HOLDER_FILE).read_text()) == sweeps  # the sweep holds it until it lets go
    other = os.open(tmp_path / "elsewhere", os.O_RDWR | os.O_CREAT)  # a number that is not this folder's lock
    monkeypatch.setenv(FD_ENV, str(other))
    lock = try_lock(folder, "fit")
    assert lock.fd != other
    lock.release()
    os.close(other)


FORK_AND_HOLD = r"""
import os, sys, time
from pathlib import Path
from lm_opt.run_lock import try_lock

try_lock(Path(sys.argv[1]), "fit")
if os.fork() == 0:  # a DataLoader worker, say; its fork hooks have run once it prints
    os.write(1, b"worker\n")  # one write each: the two lines never interleave
    time.sleep(60)
    os._exit(0)
os.write(1, b"held\n")
time.sleep(60)
"""


def test_a_forked_worker_does_not_keep_a_killed_holders_lock(tmp_path):
    folder = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", FORK_AND_HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        # both processes have started: on a busy machine the holder may print before its child runs
        assert {proc.stdout.readline().strip() for _ in range(2)} == {"held", "worker"}
        os.kill(proc.pid, signal.SIGKILL)  # the holder alone: its forked child lives on
        proc.wait()
        lock = try_lock(folder, "fit")
        assert lock is not None
        lock.release()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


def test_a_filesystem_without_locks_gets_a_warning_and_blocks_nobody(tmp_path, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    lock = try_lock(tmp_path / "run", "fit")
    assert lock.fd is None and "this filesystem has no locks" in caplog.text
    lock.release()


def test_a_run_folder_that_cannot_be_made_is_one_error_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    error = fit_fails(capsys, *tiny_args(tmp_path / "file", "run", 2))
    assert error.startswith(f"error: {tmp_path / 'file' / 'run'}: cannot write the run folder there: ")


@pytest.mark.slow
def test_a_fit_into_a_folder_in_use_stops_before_building_anything_and_a_killed_holder_blocks_nobody(
        tmp_path, capsys, caplog, embedded_corpus):
    run = tmp_path / "run"
    holder = hold(run)
    error = fit_fails(capsys, *tiny_args(tmp_path, "run", 2))
    assert error == (f"error: {run} is in use by {holder_of(run)}: wait for it to end, or start another run with "
                     "--trainer.logger.init_args.name NAME (or .version)")
    assert f"pid {holder.pid} on host {socket.gethostname()}" in error
    assert {p.name for p in run.iterdir()} == {LOCK_FILE, HOLDER_FILE}  # no config, events or summary
    holder.kill()
    holder.wait()
    fit(*tiny_args(tmp_path, "run", 2))
    assert f"{run}: taking it over from pid {holder.pid}" in caplog.text
    assert summary(run)["status"] == "finished"


@pytest.mark.slow
def test_two_fits_started_at_once_into_one_folder_run_once(tmp_path, embedded_corpus):
    """Two `python -m lm_opt fit` processes under one logger name and version: one trains, the other
    refuses (exit 2) naming the first, and the folder holds one run's events and summary. About 20 s:
    each is a fresh interpreter, and two starting at once share the cores."""
    args = [sys.executable, "-m", "lm_opt", *tiny_args(tmp_path, "run", 4)]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    ends = [(proc.wait(timeout=600), proc.stderr.read()) for proc in procs]
    assert sorted(code for code, _ in ends) == [0, 2], ends
    ran, refused = (procs[0], procs[1]) if ends[0][0] == 0 else (procs[1], procs[0])
    error = [line for line in ends[procs.index(refused)][1].splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and f"{tmp_path / 'run'} is in use by pid {ran.pid} on host" in error[0]
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 1
    assert summary(tmp_path / "run")["steps"] == 4
