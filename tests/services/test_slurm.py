"""The grid on a real SLURM: a single-node cluster (munge + slurmctld + slurmd from Debian's
slurm-wlm) started on localhost by the test, and a tiny grid run through
`snakemake --profile <profiles/slurm, adapted> --executor slurm`.

The cluster: config written into a temp dir, free ports, no cgroups
(proctrack/linuxproc, task/none), select/cons_tres, one node with this machine's CPUs and
memory as `slurmd -C` reports them, no accounting database; finished jobs are recorded by
jobcomp/filetxt, the plugin polls them with squeue (MinJobAge keeps them listed).

The profile is profiles/slurm/config.yaml with what this one node cannot give replaced:
the partition is the test cluster's and no account is passed (the cluster has no
accounting), memory requests are capped to a quarter of the node and threads to 1
(`max-threads`), so two jobs fit at once; runtimes and retries are the profile's.

Checked: the workflow completes; every job Snakemake sent to the cluster (all but any
`localrules`; the training jobs always) went through sbatch -- squeue lists it under the
workflow's run id with its rule -- and completed with the profile's runtime and per-rule
memory (the cluster's job-completion log); and the results exist: summary.csv with both
runs, one finished MLflow run per training job.

Needs root (slurmd starts jobs as their user, and CI runs as root) and one host-wide file:
the plugin's job step drops SLURM_CONF when it calls srun, so srun inside a job reads the
default /etc/slurm/slurm.conf; the test links it to its config while it runs and refuses to
touch a slurm.conf it did not create. Skipped, with the reason, where SLURM is not
installed (`scripts/ci-services.sh` installs it as root) or the plugin is missing.
"""
from __future__ import annotations

import getpass
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest
import yaml
from conftest import create_experiment, write_config
from paths import REPO_ROOT

PROJECT = REPO_ROOT
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
MARK = "jpqbench-test-slurm"  # in the temp dir's name: a link to it is this test's own
DAEMONS = ["munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "srun"]
TRAINING_RULES = {"pretrain", "compress", "reference"}  # always cluster jobs (never `localrules`)


def _binary(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


def _skip_reason() -> str | None:
    missing = [name for name in DAEMONS if _binary(name) is None]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} not found): run scripts/ci-services.sh as root "
                "(apt-get install slurmctld slurmd slurm-client munge)")
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "the Snakemake SLURM executor plugin is missing: pip install -e '.[slurm]'"
    if os.geteuid() != 0:
        return "the single-node SLURM cluster is started as root (slurmd launches the jobs); CI runs as root"
    if (SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink()) and MARK not in os.path.realpath(SYSTEM_CONF):
        return f"{SYSTEM_CONF} exists (a real SLURM setup): this test starts its own cluster and leaves it alone"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass(frozen=True)
class Cluster:
    conf: Path
    jobcomp: Path
    partition: str
    node_memory_mb: int

    @property
    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
        # JPQBENCH_SLURM_GPUS=0: the test cluster has no GPUs (the profile asks for one per training job)
        return {**env, "SLURM_CONF": str(self.conf), "PATH": f"{env.get('PATH', '')}:/usr/sbin", "JPQBENCH_SLURM_GPUS": "0"}


def _wait(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f} s")
        time.sleep(0.3)


def _slurm_conf(root: Path, munge_socket: Path, node: str, ctld_port: int, slurmd_port: int) -> str:
    host = socket.gethostname().split(".")[0]
    return f"""\
ClusterName=jpqtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
SlurmUser={getpass.getuser()}
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/builtin
MpiDefault=none
MinJobAge=3600
ReturnToService=2
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=jpq Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _stop(pid_file: Path) -> None:
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().split()[0])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        _wait(lambda: not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(),
              f"process {pid} ended", 15)
    except (TimeoutError, FileNotFoundError):
        pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp(MARK)
    os.chmod(root, 0o755)
    for sub in ("munge", "state", "spool"):
        (root / sub).mkdir(mode=0o755)
    munge = root / "munge"
    subprocess.run([_binary("mungekey"), "--create", f"--keyfile={munge / 'munge.key'}"], check=True)
    os.chmod(munge / "munge.key", 0o600)
    subprocess.run([_binary("munged"), "--force", f"--key-file={munge / 'munge.key'}",
                    f"--socket={munge / 'munge.sock'}", f"--pid-file={munge / 'munged.pid'}",
                    f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"], check=True)
    node = subprocess.run([_binary("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    memory = int(re.search(r"RealMemory=(\d+)", node).group(1))
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, munge / "munge.sock", node, *_free_ports(2)))
    SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SYSTEM_CONF.unlink(missing_ok=True)  # only ever a stale link of this test's (see _skip_reason)
    SYSTEM_CONF.symlink_to(conf)
    cluster = Cluster(conf, root / "jobcomp.txt", "jpq", memory)
    try:
        subprocess.run([_binary("slurmctld")], env=cluster.env, check=True)
        subprocess.run([_binary("slurmd")], env=cluster.env, check=True)
        _wait(lambda: subprocess.run(["sinfo", "-h", "-o", "%T"], env=cluster.env, capture_output=True,
                                     text=True).stdout.strip() == "idle", "the node registered idle")
        yield cluster
    finally:
        for pid_file in (root / "slurmd.pid", root / "slurmctld.pid", munge / "munged.pid"):
            _stop(pid_file)
        if os.path.realpath(SYSTEM_CONF) == str(conf):
            SYSTEM_CONF.unlink()


def _test_profile(folder: Path, cluster: Cluster) -> tuple[Path, dict]:
    """profiles/slurm with what one small node cannot give replaced (see the module docstring)."""
    profile = yaml.safe_load((PROJECT / "profiles" / "slurm" / "config.yaml").read_text())
    cap = cluster.node_memory_mb // 4
    defaults = profile["default-resources"]
    profile["default-resources"] = {"slurm_partition": cluster.partition, "mem_mb": min(defaults["mem_mb"], cap),
                                    "runtime": defaults["runtime"]}
    for resources in profile["set-resources"].values():
        resources["mem_mb"] = min(resources["mem_mb"], cap)
    profile.update({"max-threads": 1, "slurm-init-seconds-before-status-checks": 1,
                    "slurm-status-command": "squeue", "latency-wait": 5})
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder, profile


def _completed_jobs(jobcomp: Path) -> dict[int, dict[str, str]]:
    jobs = {}
    for line in jobcomp.read_text().splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        jobs[int(fields["JobId"])] = fields
    return jobs


def test_a_tiny_grid_runs_through_sbatch_on_a_real_slurm(cluster: Cluster, tmp_path: Path) -> None:
    work = tmp_path / "project"
    work.mkdir()
    shutil.copy(PROJECT / "Snakefile", work / "Snakefile")
    shutil.copytree(PROJECT / "config", work / "config")
    # one job per budget, as a cluster grid runs (config/paper.yaml): the profile's `compress` rule
    config = write_config(work / "tiny.yaml", work, extra="batch_runs: false\n")
    create_experiment(work, "t")
    profile_dir, profile = _test_profile(tmp_path / "profile", cluster)
    summary = work / "results" / "summary.csv"

    start = time.monotonic()
    with open(tmp_path / "snakemake.log", "w") as log:
        done = subprocess.run(["snakemake", str(summary), "--profile", str(profile_dir), "--configfile", config.name],
                              cwd=work, env=cluster.env, stdout=log, stderr=subprocess.STDOUT, timeout=900)
    elapsed = time.monotonic() - start
    assert done.returncode == 0, f"snakemake failed after {elapsed:.0f} s:\n{(tmp_path / 'snakemake.log').read_text()[-5000:]}"

    # every job went through sbatch: squeue lists each job of this workflow (the plugin names
    # them by its run id and writes the rule into the job's comment), and the cluster's
    # completion log has each of them, completed, with the profile's requests
    listed = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%i|%j|%k"], env=cluster.env,
                            capture_output=True, text=True, check=True).stdout.split()
    submitted = {int(job): comment.removeprefix("rule_").split("_wildcards_")[0]
                 for job, _, comment in (line.split("|") for line in listed)}
    log = (tmp_path / "snakemake.log").read_text()
    cluster_jobs = re.findall(r"^rule (\w+):$", log, re.MULTILINE)  # `localrule X:` runs on the submit host
    assert sorted(submitted.values()) == sorted(cluster_jobs), submitted
    assert TRAINING_RULES <= set(cluster_jobs) and len(cluster_jobs) == len(set(cluster_jobs))  # one job each
    completed = _completed_jobs(cluster.jobcomp)
    rule_resources = profile["set-resources"]
    for job_id, rule in submitted.items():
        record = completed[job_id]
        assert record["JobState"] == "COMPLETED", record
        wanted = {**profile["default-resources"], **rule_resources.get(rule, {})}
        assert record["TimeLimit"] == str(wanted["runtime"]), (rule, record)
        assert f"mem={wanted['mem_mb']}M" in record["Tres"] and "cpu=1," in record["Tres"], (rule, record)

    frame = pd.read_csv(summary)
    assert sorted(frame["method"]) == ["fp32", "ptq"] and (frame["status"] == "ok").all()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert sorted(run.data.tags["stage"] for run in runs) == ["compress", "compress", "pretrain"]
    assert all(run.info.status == "FINISHED" for run in runs)
    print(f"SLURM grid: {len(submitted)} jobs through sbatch in {elapsed:.0f} s")
