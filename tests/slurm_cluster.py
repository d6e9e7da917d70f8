"""A real single-node Slurm for tests: munged, slurmctld and slurmd from the distribution's packages,
configured under a temporary directory (SLURM_CONF), started and stopped by their process ids.

Nothing of the system's Slurm or munge is used: own key, own socket, own ports, own state and spool.
The node claims 8 CPUs and 8 GB whatever the machine has (SlurmdParameters=config_overrides): the
jobs are tiny, and a small node is what the example job must fit.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue")
# Where a job stays once it has ended: Slurm's terminal job states.
ENDED = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
}
NODE_CPUS = 8
NODE_MEMORY_MB = 8192
# Slurm's time between SIGTERM and SIGKILL (scancel, a time limit): the batch must be done by then.
KILL_WAIT = 20
_PR_SET_PDEATHSIG = 1
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])


def missing_reason() -> str | None:
    """Why a Slurm cannot be started here, or None when it can."""
    if not hasattr(os, "getuid"):
        return "Slurm runs on Linux only"
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name, path=_SEARCH_PATH) is None]
    if missing:
        how = "scripts/install_slurm.sh installs it as root with apt-get (scripts/test.sh runs it)"
        return f"Slurm is not installed (missing: {', '.join(missing)}); {how}"
    if os.getuid() != 0:
        return "slurmd must run as root to start jobs; run the tests as root"
    return None


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now, all different (held open together while chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies, even killed, so no daemon
    outlives a test run that never reaches its finalizer."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _binary(name: str) -> str:
    found = shutil.which(name, path=_SEARCH_PATH)
    assert found is not None, name
    return found


class SlurmCluster:
    """One controller and one node on 127.0.0.1; `start`, then `sbatch`/`wait`, then `stop`."""

    def __init__(self) -> None:
        # Not under pytest's tmp_path: its folders are private (0700), and munged refuses a socket
        # that other users cannot reach.
        self.root = Path(tempfile.mkdtemp(prefix="fusemoe-slurm-"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]
        self.daemons: dict[str, subprocess.Popen] = {}
        self._outputs: list = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")} | {"SLURM_CONF": str(self.conf)}

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        try:
            for folder in ("state", "spool", "log"):
                (self.root / folder).mkdir()
            self._start_munge()
            self._write_config()
            self._start("slurmctld", "-D", "-i")
            self._start("slurmd", "-D", "-N", self.node)
            self._wait_until(self._node_idle, 30, "the node to come up idle")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancel every job, stop the daemons (SIGTERM, then SIGKILL), end any process left of this
        cluster's jobs, remove the directory. Safe to call twice, or after a failed start."""
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            self.run("scancel", "--user", str(os.getuid()), check=False)
            with contextlib.suppress(TimeoutError):
                self._wait_until(lambda: not self.run("squeue", "-h", check=False).stdout.strip(), KILL_WAIT + 10, "")
        for name in reversed(list(self.daemons)):
            _end(self.daemons.pop(name))
        for output in self._outputs:
            output.close()
        self._outputs.clear()
        self._kill_leftovers()
        shutil.rmtree(self.root, ignore_errors=True)

    def logs(self) -> str:
        """The daemons' logs, for a failure message."""
        parts = []
        for log in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    # --- jobs ------------------------------------------------------------------------------------

    def run(self, command: str, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [_binary(command), *args], env=self.env, capture_output=True, text=True, timeout=30, **kwargs
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{command} {' '.join(args)}: {result.stderr.strip()}\n{self.logs()}")
        return result

    def sbatch(self, script: Path, *options: str, env: dict[str, str], cwd: Path) -> str:
        """Submit `script`; its job id. `env` is added to the job's environment (sbatch passes its own)."""
        result = subprocess.run(
            [_binary("sbatch"), "--parsable", *options, str(script)],
            env=self.env | env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """The records of a job, one per array task (a pending array's tasks may share one)."""
        output = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in output.splitlines() if line.strip()]

    def wait(self, job_id: str, timeout: float) -> list[dict[str, str]]:
        """Wait until every task of `job_id` has ended; their records."""
        records: list[dict[str, str]] = []

        def ended() -> bool:
            nonlocal records
            records = self.jobs(job_id)
            return bool(records) and all(r["JobState"] in ENDED for r in records)

        self._wait_until(ended, timeout, f"job {job_id} to end")
        return records

    # --- parts -----------------------------------------------------------------------------------

    def _start_munge(self) -> None:
        secret, public = self.root / "munge", self.root / "munge-run"
        secret.mkdir(mode=0o700)
        public.mkdir(mode=0o755)  # the socket's folder: munged wants it reachable by every user
        key = secret / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.socket = public / "munge.socket"
        self._start(
            "munged",
            "--foreground",
            "--force",
            f"--key-file={key}",
            f"--socket={self.socket}",
            f"--pid-file={public / 'munged.pid'}",
            f"--log-file={secret / 'munged.log'}",
            f"--seed-file={secret / 'munged.seed'}",
        )
        self._wait_until(self.socket.exists, 15, "munged's socket")

    def _write_config(self) -> None:
        root = self.root
        controller_port, node_port = _free_ports(2)
        settings = {
            "ClusterName": "fusemoetest",
            "SlurmctldHost": f"{self.node}(127.0.0.1)",
            "SlurmctldPort": controller_port,
            "SlurmdPort": node_port,
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.socket}",
            "StateSaveLocation": root / "state",
            "SlurmdSpoolDir": root / "spool",
            "SlurmctldPidFile": root / "slurmctld.pid",
            "SlurmdPidFile": root / "slurmd.pid",
            "SlurmctldLogFile": root / "log" / "slurmctld.log",
            "SlurmdLogFile": root / "log" / "slurmd.log",
            # No cgroups: a container may not delegate them. Processes are tracked by parentage.
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "MpiDefault": "none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core_Memory",
            "SchedulerType": "sched/builtin",
            "SlurmdParameters": "config_overrides",
            "ReturnToService": 2,
            "KillWait": KILL_WAIT,
            "MinJobAge": 600,  # ended jobs stay visible to scontrol for the test's checks
        }
        lines = [f"{key}={value}" for key, value in settings.items()]
        lines.append(
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB} State=UNKNOWN"
        )
        lines.append(f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _start(self, name: str, *args: str) -> None:
        out = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 - closed by stop()
        self._outputs.append(out)
        self.daemons[name] = subprocess.Popen(
            [_binary(name), *args],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # prctl only: safe between fork and exec
        )

    def _node_idle(self) -> bool:
        for name, process in self.daemons.items():
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with status {process.returncode}\n{self.logs()}")
        result = self.run("scontrol", "-o", "show", "node", self.node, check=False)
        return result.returncode == 0 and re.search(r"\bState=IDLE\b", result.stdout) is not None

    def _wait_until(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout} s for {what}\n{self.logs()}")
            time.sleep(0.1)

    def _kill_leftovers(self) -> None:
        """SIGKILL any process still carrying this cluster's SLURM_CONF (a job's, a slurmstepd)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in environ:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)


def _end(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
