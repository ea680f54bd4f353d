"""A real one-node SLURM for the tests (Debian's slurm-wlm and munge; root): ``slurmctld`` and ``slurmd`` on this
machine with its CPUs, every file under one temporary folder, stopped by their pid files. ``.ci/run`` installs the
packages; without them (or without root) :func:`available` is False and the SLURM tests skip."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged")


def available() -> bool:
    return os.geteuid() == 0 and all(shutil.which(d) or Path(f"/usr/sbin/{d}").exists() for d in DAEMONS)


def _conf(root: Path, host: str, cpus: int) -> str:
    return "\n".join(
        [
            "ClusterName=nfttest",
            f"SlurmctldHost={host}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={root}/state",
            f"SlurmdSpoolDir={root}/spool",
            f"SlurmctldPidFile={root}/slurmctld.pid",
            f"SlurmdPidFile={root}/slurmd.pid",
            f"SlurmctldLogFile={root}/ctld.log",
            f"SlurmdLogFile={root}/d.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "AuthType=auth/munge",
            "KillWait=30",  # seconds between the SIGTERM of a cancelled or timed-out job and its SIGKILL
            f"NodeName={host} CPUs={cpus} State=UNKNOWN",
            f"PartitionName=main Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
            "",
        ]
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """``with LocalSlurm(tmp) as env:`` runs SLURM commands with ``env`` (``SLURM_CONF`` set)."""

    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}
        self._munge = False

    def __enter__(self) -> dict:
        host = socket.gethostname().split(".")[0]
        for d in ("state", "spool"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "slurm.conf").write_text(_conf(self.root, host, self.cpus))
        self._start_munge()
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon, "-f", str(self.root / "slurm.conf")], env=self.env, check=True, timeout=60)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
            if state.stdout.strip() in ("idle", "mix", "alloc"):
                return self.env
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"SLURM did not come up: {self.log()}")

    def _start_munge(self) -> None:
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged already runs (a previous session, the machine's own)
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True, timeout=30)
        self._munge = True

    def log(self) -> str:
        return "\n".join(
            (self.root / f).read_text()[-3000:] for f in ("ctld.log", "d.log") if (self.root / f).is_file()
        )

    def __exit__(self, *exc) -> None:
        for daemon in ("slurmd", "slurmctld"):
            pid = self.root / f"{daemon}.pid"
            if pid.is_file():
                try:
                    os.kill(int(pid.read_text().split()[0]), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(1)
        if self._munge:
            subprocess.run(["pkill", "-x", "munged"], check=False)
