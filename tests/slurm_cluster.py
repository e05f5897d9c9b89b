"""A real SLURM cluster (one node, or several slurmds) on this machine, for the tests (Debian's slurm-wlm; see .ci/run).

It runs munged, MariaDB, slurmdbd, slurmctld and slurmd from a private state directory, with fake
GPUs (symlinks to /dev/null), a per-job TMPDIR made by a TaskProlog, and stops every daemon it
started by its PID.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")


def available() -> bool:
    """Whether the SLURM and MariaDB packages are installed."""
    return all(shutil.which(d) or Path(f"/usr/sbin/{d}").exists() for d in DAEMONS) and os.geteuid() == 0


SLURM_CONF = """\
ClusterName=localcluster
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
# SLURM's default time from SIGTERM to SIGKILL: a cancelled job saves and copies back in it, even on a loaded machine
KillWait=30
MinJobAge=600
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/run/slurmctld.pid
SlurmdPidFile={dir}/run/slurmd-%n.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd-%n.log
SlurmctldPort={ctld_port}
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={dbd_port}
JobAcctGatherType=jobacct_gather/linux
TaskProlog={dir}/taskprolog.sh
GresTypes=gpu
{node_lines}
PartitionName=markov_gpu Nodes={node_list} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""

SLURMDBD_CONF = """\
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=localhost
DbdPort={dbd_port}
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmtest
StorageLoc=dl_slurm_acct
PidFile={dir}/run/slurmdbd.pid
LogFile={dir}/log/slurmdbd.log
"""


class LocalSlurm:
    """Start with `start()`, stop with `stop()`; `env` has SLURM_CONF for sbatch and friends."""

    def __init__(self, state_dir: Path, features: str = "gpu,a100", nodes: int = 1) -> None:
        self.dir = state_dir
        self.features = features
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(state_dir / "slurm.conf")}
        self.host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
        # One slurmd per node, all on this machine (own port, spool, log); one node keeps the host name.
        self.nodes = [self.host] if nodes == 1 else [f"dlnode{i}" for i in range(1, nodes + 1)]

    # ------------------------------------------------------------ set-up
    def _write_config(self) -> None:
        d = self.dir
        d.chmod(0o755)
        for sub in ("state", "spool", "run", "log", "fake-gpu", "jobtmp"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        gpu = d / "fake-gpu" / "gpu0"
        if not gpu.is_symlink():
            gpu.symlink_to("/dev/null")
        ports = {"ctld_port": 16817, "dbd_port": 16819}
        node_lines = "\n".join(
            f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={16818 + 10 * i} CPUs=32 "
            f"RealMemory=256000 Gres=gpu:1 Feature={self.features} State=UNKNOWN" for i, n in enumerate(self.nodes))
        (d / "slurm.conf").write_text(SLURM_CONF.format(host=self.host, dir=d, node_lines=node_lines,
                                                        node_list=",".join(self.nodes), **ports))
        (d / "gres.conf").write_text("AutoDetect=off\n" + "".join(
            f"NodeName={n} Name=gpu File={d}/fake-gpu/gpu[0-0]\n" for n in self.nodes))
        dbd = d / "slurmdbd.conf"
        dbd.write_text(SLURMDBD_CONF.format(dir=d, **ports))
        dbd.chmod(0o600)
        # A per-job TMPDIR, as real clusters give; nothing deletes it, so the tests see what jobs leave.
        prolog = d / "taskprolog.sh"
        tmp = f"{d}/jobtmp/$SLURMD_NODENAME/job_$SLURM_JOB_ID"  # node-local, as on a real cluster
        prolog.write_text(f"#!/bin/sh\nmkdir -p {tmp}\necho export TMPDIR={tmp}\n")
        prolog.chmod(0o755)

    def _spawn(self, name: str, args: list[str], **kw) -> None:
        log = open(self.dir / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, **kw)

    def _wait_for(self, what: str, check, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if check():
                return
            time.sleep(0.3)
        raise RuntimeError(f"local SLURM: {what} did not come up; logs in {self.dir / 'log'}")

    @staticmethod
    def _port_open(port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def _start_database(self) -> None:
        # The default socket path, which slurmdbd's StorageHost=localhost uses.
        run = Path("/run/mysqld")
        run.mkdir(exist_ok=True)
        shutil.chown(run, "mysql", "mysql")
        sock = run / "mysqld.sock"
        if sock.exists():
            sock.unlink()
        self._spawn("mariadbd", ["mariadbd", "--user=mysql", "--skip-networking", f"--socket={sock}",
                                 f"--pid-file={run}/mysqld.pid"])
        self._wait_for("MariaDB", sock.exists)
        sql = ("DROP DATABASE IF EXISTS dl_slurm_acct; "
               "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmtest'; "
               "ALTER USER 'slurm'@'localhost' IDENTIFIED BY 'slurmtest'; "
               "GRANT ALL ON dl_slurm_acct.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;")
        subprocess.run(["mariadb", f"--socket={sock}", "-e", sql], check=True, env=self.env)

    def start(self) -> "LocalSlurm":
        """Bring the cluster up and wait until the node is idle (one cluster per machine at a time)."""
        # Daemons use fixed ports, /run/munge and /run/mysqld: a second test session waits its turn.
        self._lock = open("/tmp/distill-lab-slurm.lock", "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self._write_config()
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        self._spawn("munged", ["munged", "-F"], user="munge", group="munge")
        self._wait_for("munged", lambda: Path("/run/munge/munge.socket.2").exists())
        self._start_database()
        self._spawn("slurmdbd", ["slurmdbd", "-D"])
        self._wait_for("slurmdbd", lambda: self._port_open(16819))
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._wait_for("slurmctld", lambda: self._port_open(16817))
        for node in self.nodes:
            (self.dir / "spool" / node).mkdir(exist_ok=True)
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node])
        self._wait_for("idle nodes", lambda: self.run(["sinfo", "-h", "-N", "-o", "%T"]).stdout.split()
                       == ["idle"] * len(self.nodes), 90)
        return self

    def stop(self) -> None:
        """Cancel the jobs still queued (their steps would outlive slurmd), then stop every daemon this
        object started, by PID, newest first."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            jobs = self.run(["squeue", "-h", "-o", "%i"]).stdout.split()
            if jobs:
                self.run(["scancel", *jobs])
                self._wait_for("the end of cancelled jobs", lambda: not self.run(["squeue", "-h"]).stdout.strip(), 60)
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        if getattr(self, "_lock", None):
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    # ------------------------------------------------------------ use
    def run(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        return subprocess.run(args, env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True, **kw)

    def state(self, job: str) -> str:
        """The job's state as sacct records it (e.g. COMPLETED, FAILED, CANCELLED, PENDING)."""
        out = self.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"]).stdout.strip().splitlines()
        return out[-1].split()[0] if out else "UNKNOWN"

    def wait_all(self, jobs: list[str], timeout: float = 600) -> dict[str, str]:
        """Wait until no job of `jobs` is pending or running; return their final states."""
        final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = {j: self.state(j) for j in jobs}
            queue = self.run(["squeue", "-h", "-o", "%i"]).stdout.split()
            if all(s.startswith(final) for s in states.values()) and not set(queue) & set(jobs):
                return states
            time.sleep(1)
        raise TimeoutError(f"jobs still running after {timeout}s: {states}")
