"""A real Slurm cluster on this machine for the tests: munge, slurmctld and two `slurmd -N`
daemons (nodes n1, n2) from Debian's packages, all state under one folder. Jobs in partition
`urgent` preempt (requeue) jobs in the default partition `debug`, with 60 s of grace.

    python tests/helpers/slurm_cluster.py up DIR     # prints the SLURM_CONF to export
    python tests/helpers/slurm_cluster.py down DIR

Each node has its own port, spool, pid and log file (`%n`), NodeAddr 127.0.0.1, and a line in
/etc/hosts so that its name resolves (jobs use it as the rendezvous address). No accounting
daemon: submitit then reads job states from squeue/scontrol with warnings.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

NODES = ("n1", "n2")
NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")

CONF = """\
ClusterName=launchertest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={ctld_port_plus}
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmdTimeout=60
MaxArraySize=2
SlurmctldTimeout=60
{nodes}
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=60
PartitionName=urgent Nodes={names} MaxTime=INFINITE State=UP PriorityTier=2
"""


def missing() -> str | None:
    """Why a cluster cannot start here, or None."""
    absent = [c for c in NEEDED if shutil.which(c) is None]
    if absent:
        return (
            f"Slurm/munge not installed ({', '.join(absent)} missing; "
            "apt-get install slurmctld slurmd slurm-client munge)"
        )
    if os.geteuid() != 0:
        return "starting slurmd needs root"
    if not os.access("/etc/hosts", os.W_OK):
        return "/etc/hosts is not writable (node names n1, n2 must resolve)"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _resolve_nodes() -> None:
    hosts = Path("/etc/hosts").read_text()
    known = {name for line in hosts.splitlines() if not line.strip().startswith("#") for name in line.split()[1:]}
    extra = [n for n in NODES if n not in known]
    if extra:
        with open("/etc/hosts", "a") as f:
            f.write(f"\n127.0.0.1 {' '.join(extra)}  # launcher test cluster\n")


def _start_munge() -> None:
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run(["mungekey", "--create"], check=True)
    subprocess.run(["munged", "--force"], check=True)


def up(d: Path, timeout: float = 60) -> Path:
    """Start the cluster; returns the slurm.conf path (export it as SLURM_CONF)."""
    why = missing()
    if why:
        raise RuntimeError(why)
    d = d.resolve()
    down(d)
    for sub in ("state", *(f"spool/{n}" for n in NODES)):
        (d / sub).mkdir(parents=True, exist_ok=True)
    ports = _free_ports(2 + len(NODES))
    nodes = "\n".join(
        f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={n} Port={p} CPUs=2 RealMemory=8000 State=UNKNOWN"
        for n, p in zip(NODES, ports[2:])
    )
    conf = d / "slurm.conf"
    conf.write_text(
        CONF.format(
            host=socket.gethostname(),
            ctld_port=ports[0],
            ctld_port_plus=ports[1],
            d=d,
            nodes=nodes,
            names=",".join(NODES),
        )
    )
    _resolve_nodes()
    _start_munge()
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld", "-c", "-f", str(conf)], check=True, env=env)  # -c: no saved state
    for n in NODES:
        subprocess.run(["slurmd", "-N", n, "-f", str(conf)], check=True, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=env).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        if len(states) == len(NODES) and all(s in ("idle", "mix", "alloc") for s in states.values()):
            return conf
        time.sleep(1)
    raise RuntimeError(f"Slurm nodes did not come up within {timeout:.0f}s: {states}; see {d}/*.log")


def down(d: Path) -> None:
    """Stop the daemons started from `d` (munged is left running: it holds no state)."""
    d = d.resolve()
    for pid_file in d.glob("*.pid"):
        try:
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        except (ValueError, ProcessLookupError, PermissionError, IndexError):
            pass
        pid_file.unlink(missing_ok=True)
    time.sleep(0.5)


if __name__ == "__main__":
    action, folder = sys.argv[1], Path(sys.argv[2])
    if action == "up":
        print(up(folder))
    else:
        down(folder)
