"""A real Slurm cluster on localhost for tests: munged, mariadbd, slurmdbd, slurmctld and one slurmd per
"node", each stopped by its PID.

Debian's slurm-wlm, munge, slurmdbd and mariadb-server (installed by .ci/run). Every node is a slurmd on
127.0.0.1 with its own port, so one machine holds a multi-node cluster and `srun --nodes=2` spans two
slurmds. Accounting is real: slurmctld sends every job to slurmdbd, which stores it in a MariaDB database
of the test's own (a data directory under the test's tmp dir), so `sacct` works as on a production
cluster, and the cluster has an account, `sftflow`, that the root user belongs to.
Clients find the cluster through SLURM_CONF (see `env()`) and, like on a real cluster, through
/etc/slurm/slurm.conf (a symlink made for the test's duration): the Slurm executor plugin strips SLURM_*
variables, SLURM_CONF included, before it runs a job's command, so `srun` inside a job needs the default path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
BINARIES = ("munged", "slurmctld", "slurmd", "slurmdbd", "mariadbd", "mariadb-install-db", "sbatch", "sacct",
            "sacctmgr", "squeue", "sinfo", "scontrol")  # fmt: skip
PACKAGES = "slurm-wlm munge slurmdbd mariadb-server"
ACCOUNT = "sftflow"


def available() -> str | None:
    """None if a cluster can be started here, else why not."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"Slurm not installed (missing {', '.join(missing)}; apt-get install {PACKAGES})"
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as root"
    if not Path("/etc/munge/munge.key").exists():
        return "/etc/munge/munge.key is missing (the munge package creates it)"
    if SYSTEM_CONF.exists() and not SYSTEM_CONF.is_symlink():
        return f"{SYSTEM_CONF} exists (a real cluster's config?); the test cluster will not replace it"
    return None


class SlurmCluster:
    def __init__(self, root: Path, nodes: tuple[str, ...] = ("node1", "node2"), cpus: int = 2, mem_mb: int = 8000):
        self.root = Path(root)
        self.nodes = nodes
        self.cpus = cpus
        self.mem_mb = mem_mb
        self.conf = self.root / "slurm.conf"
        self.dbd_conf = self.root / "slurmdbd.conf"  # slurmdbd reads it from SLURM_CONF's directory
        self.pid_files: list[Path] = []
        self.children: list[subprocess.Popen] = []  # daemons started in the foreground, reaped by stop()
        # Ports of this cluster, below the ephemeral range (32768+); tests on one machine must not share them.
        base = 10000 + os.getpid() % 20000
        self.ports = {"ctld": base, "slurmd": base + 1, "dbd": base + 2, "mysql": base + 3}
        self.ports.update({n: base + 4 + i for i, n in enumerate(nodes)})

    @classmethod
    def attach(cls, root: Path) -> SlurmCluster | None:
        """The cluster another process started in `root` (None if none was): its daemons are found by their
        PID files, so `stop()` works from any process."""
        state = Path(root) / "cluster.json"
        if not state.exists():
            return None
        saved = json.loads(state.read_text())
        cluster = cls(root, nodes=tuple(saved["nodes"]))
        cluster.ports = saved["ports"]
        cluster.pid_files = [Path(p) for p in saved["pid_files"]]
        return cluster

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_conf(self) -> None:
        r = self.root
        for sub in ("state", "log", "munge", "db", *(f"spool/{n}" for n in self.nodes)):
            (r / sub).mkdir(parents=True, exist_ok=True)
        lines = [
            "ClusterName=sftflowtest",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={self.ports['ctld']}",
            f"SlurmdPort={self.ports['slurmd']}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={r / 'munge' / 'munge.socket'}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log'}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "SchedulerType=sched/backfill",
            "AccountingStorageType=accounting_storage/slurmdbd",
            "AccountingStorageHost=localhost",
            f"AccountingStoragePort={self.ports['dbd']}",
            f"AccountingStoragePass={r / 'munge' / 'munge.socket'}",  # the munge socket for slurmdbd connections
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=10",
            "MinJobAge=600",
            "SchedulerParameters=sched_interval=2",
        ]
        for name in self.nodes:
            lines.append(
                f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={self.ports[name]} "
                f"CPUs={self.cpus} RealMemory={self.mem_mb} State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        dbd = [
            "AuthType=auth/munge",
            f"AuthInfo=socket={r / 'munge' / 'munge.socket'}",
            "DbdHost=localhost",
            f"DbdPort={self.ports['dbd']}",
            "SlurmUser=root",
            f"PidFile={r / 'slurmdbd.pid'}",
            f"LogFile={r / 'log' / 'slurmdbd.log'}",
            "StorageType=accounting_storage/mysql",
            "StorageHost=127.0.0.1",
            f"StoragePort={self.ports['mysql']}",
            "StorageUser=root",
            "StorageLoc=slurm_acct_db",
        ]
        self.dbd_conf.write_text("\n".join(dbd) + "\n")
        self.dbd_conf.chmod(0o600)  # slurmdbd refuses a config others can read

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the test Slurm cluster: {what} did not come up; logs in {self.root / 'log'}")
            time.sleep(0.5)

    def _start_database(self, timeout: float) -> None:
        """MariaDB on 127.0.0.1 (its own data directory and port, no grant tables: only slurmdbd uses it)."""
        r = self.root
        subprocess.run(
            ["mariadb-install-db", "--user=root", f"--datadir={r / 'db'}", "--skip-test-db",
             "--auth-root-authentication-method=normal"],
            check=True, capture_output=True,
        )  # fmt: skip
        log = open(r / "log" / "mariadbd.log", "ab")  # noqa: SIM115  (the daemon's stdout/stderr)
        mariadbd = subprocess.Popen(
            ["mariadbd", "--no-defaults", "--user=root", f"--datadir={r / 'db'}", f"--pid-file={r / 'mariadbd.pid'}",
             f"--socket={r / 'mariadbd.sock'}", "--bind-address=127.0.0.1", f"--port={self.ports['mysql']}",
             "--skip-grant-tables", "--skip-name-resolve"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        self.children.append(mariadbd)
        self.pid_files.append(r / "mariadbd.pid")
        self._wait("mariadbd", lambda: (r / "mariadbd.sock").exists() and (r / "mariadbd.pid").exists(), timeout)

    def _sacctmgr(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sacctmgr", "-i", *args], env=self.env(), capture_output=True, text=True)

    def _start_accounting(self, timeout: float) -> None:
        """slurmdbd, then the cluster, the account and its user (as an admin would with sacctmgr)."""
        subprocess.run(["slurmdbd"], check=True, env=self.env(), capture_output=True)
        self.pid_files.append(self.root / "slurmdbd.pid")
        self._wait("slurmdbd", lambda: self._sacctmgr("show", "cluster").returncode == 0, timeout)
        for args in (
            ("add", "cluster", "sftflowtest"),
            ("add", "account", ACCOUNT, "Description=sftflow tests", "Organization=sftflow"),
            ("add", "user", "root", f"Account={ACCOUNT}"),
        ):
            done = self._sacctmgr(*args)
            if done.returncode != 0:
                self.stop()
                raise RuntimeError(f"sacctmgr {' '.join(args)} failed: {done.stdout}{done.stderr}")

    def start(self, timeout: float = 60) -> SlurmCluster:
        self._write_conf()
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SYSTEM_CONF.unlink(missing_ok=True)  # only ever a symlink left by an earlier test run (see available())
        SYSTEM_CONF.symlink_to(self.conf)
        r = self.root
        munge_dir = r / "munge"
        subprocess.run(
            ["munged", "--force", f"--socket={munge_dir / 'munge.socket'}", f"--pid-file={munge_dir / 'munged.pid'}",
             f"--seed-file={munge_dir / 'seed'}", f"--log-file={munge_dir / 'munged.log'}"],
            check=True, capture_output=True,
        )  # fmt: skip
        self.pid_files.append(munge_dir / "munged.pid")
        self._start_database(timeout)
        self._start_accounting(timeout)
        env = self.env()
        subprocess.run(["slurmctld", "-f", str(self.conf), "-i"], check=True, env=env, capture_output=True)
        self.pid_files.append(r / "slurmctld.pid")
        for name in self.nodes:
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", name], check=True, env=env, capture_output=True)
            self.pid_files.append(r / f"slurmd-{name}.pid")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T %D"], env=env, capture_output=True, text=True).stdout
            if out.split()[:2] == ["idle", str(len(self.nodes))]:
                state = {"nodes": list(self.nodes), "ports": self.ports, "pid_files": [str(p) for p in self.pid_files]}
                (r / "cluster.json").write_text(json.dumps(state))
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the test Slurm cluster did not come up: sinfo says {out!r}; logs in {r / 'log'}")

    def stop(self) -> None:
        """Cancel every job, then stop the daemons by their PIDs: SIGTERM to all at once (slurmds first), then
        wait for each (SIGKILL after 10 s), so the stop takes as long as the slowest daemon, not their sum."""
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env(), capture_output=True)
        stopping = []
        for pid_file in reversed(self.pid_files):
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError, IndexError):  # no PID file, or the daemon is gone already
                continue
            stopping.append(pid)
        deadline = time.monotonic() + 10
        for pid in stopping:
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.pid_files.clear()
        (self.root / "cluster.json").unlink(missing_ok=True)
        for child in self.children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.children.clear()
        if SYSTEM_CONF.is_symlink() and SYSTEM_CONF.resolve() == self.conf.resolve():
            SYSTEM_CONF.unlink()

    def completed_jobs(self) -> list[dict[str, str]]:
        """Every job (allocations, not steps) in the accounting database, as `sacct` reports it."""
        fields = "JobID,JobName,Account,State,NNodes,NodeList,Start,End,Timelimit,ExitCode"
        out = subprocess.run(
            ["sacct", "--allocations", "--starttime", "2000-01-01", "--parsable2", "--noheader", "--format", fields],
            env=self.env(), capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        names = fields.split(",")
        return [dict(zip(names, line.split("|"))) for line in out.splitlines() if line.strip()]
