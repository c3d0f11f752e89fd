"""A real single-node Slurm cluster (slurmctld + slurmd + munge) for tests, started and stopped
by the test session (shared/CLUSTER.md has the facts this follows).

Everything lives under one temporary directory; only the PIDs started here are stopped.
Needs root and Debian's ``slurm-wlm`` and ``munge`` (``make slurm-deps`` installs them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Dict, List


class SlurmUnavailable(RuntimeError):
    pass


def _have(*tools: str) -> List[str]:
    return [t for t in tools if shutil.which(t) is None]


def _detached(cmd: List[str], log: str, env: Dict[str, str]) -> subprocess.Popen:
    out = open(log, "ab")
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, env=env)


def _real_memory_mb() -> int:
    p = subprocess.run(["slurmd", "-C"], capture_output=True, text=True)
    for tok in p.stdout.split():
        if tok.startswith("RealMemory="):
            return max(512, int(tok.split("=")[1]) - 1024)
    return 4096


class SlurmCluster:
    """``with SlurmCluster(tmpdir) as c: c.run(["sbatch", ...])``."""

    def __init__(self, root: str, cpus: int = 2):
        self.root, self.cpus = root, cpus
        self.host = socket.gethostname().split(".")[0]
        self.procs: List[subprocess.Popen] = []
        self.conf = os.path.join(root, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)

    def _write_conf(self) -> None:
        for d in ("state", "spool", "log", "run"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        r = self.root
        conf = f"""
ClusterName=reshardci
SlurmctldHost={self.host}
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName={self.host} CPUs={self.cpus} RealMemory={_real_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""
        with open(self.conf, "w") as f:
            f.write(conf)

    def _start_munge(self) -> None:
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged already serves this machine
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        if not os.path.exists("/etc/munge/munge.key"):
            subprocess.run(["mungekey", "--create"], check=True, capture_output=True)
            shutil.chown("/etc/munge/munge.key", "munge", "munge")
        self.procs.append(_detached(["setpriv", "--reuid", "munge", "--regid", "munge", "--init-groups",
                                     "munged", "-F"], os.path.join(self.root, "log", "munged.log"), self.env))
        self._wait(lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0, "munged")

    def _wait(self, ok, what: str, timeout: float = 60) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if ok():
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"{what} did not come up in {timeout:.0f} s; logs in {self.root}/log")

    def __enter__(self) -> "SlurmCluster":
        missing = _have("slurmctld", "slurmd", "sinfo", "sbatch", "munged")
        if missing:
            raise SlurmUnavailable(f"missing {missing}: run `make slurm-deps` (apt-get install slurm-wlm munge)")
        self._write_conf()
        self._start_munge()
        log = os.path.join(self.root, "log")
        self.procs.append(_detached(["slurmctld", "-D", "-f", self.conf], os.path.join(log, "ctld.out"), self.env))
        self.procs.append(_detached(["slurmd", "-D", "-f", self.conf], os.path.join(log, "d.out"), self.env))

        def idle():
            p = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, env=self.env)
            return p.returncode == 0 and p.stdout.strip() == "idle"
        self._wait(idle, "the Slurm node")
        return self

    def run(self, cmd: List[str], timeout: int = 600, **kw) -> subprocess.CompletedProcess:
        env = {**self.env, **kw.pop("env", {})}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)

    def __exit__(self, *exc) -> None:
        # Let job steps end under slurmd before stopping it, so no slurmstepd is left behind.
        subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True, env=self.env)
        end = time.time() + 30
        while time.time() < end:
            q = subprocess.run(["squeue", "-h"], capture_output=True, text=True, env=self.env)
            if q.returncode != 0 or not q.stdout.strip():
                break
            time.sleep(0.5)
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
