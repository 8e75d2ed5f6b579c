"""The built image, run as the Kubernetes manifests run it.

`make image` builds localhost/cifar10-hvd:cpu. Here k8s/overlays/cpu-small is rendered and its pods
run as containers of that image: the prepare Job's pod, then the MPIJob's two workers and its
launcher, each container with the command, args, env, user, securityContext and volumes its
manifest gives it. What the MPI Operator adds is laid out as it lays it out: the per-job ssh key
(ECDSA P-521, as the operator generates it) at `sshAuthMountPath`, the hostfile and discover_hosts.sh
under /etc/mpi, the launcher's OMPI_MCA_* variables, and the worker names of the hostfile resolvable
(`<job>-worker-N.<job>-worker.<namespace>.svc`). What a cluster adds beyond that (an API server, the
operator's controller, a scheduler, resource limits) is not here. Then faults: a worker killed
mid-epoch, an impostor worker, a tunnel through a worker.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_k8s import (
    MPIJOB,
    container_env,
    expand,
    kubectl,  # noqa: F401 - the fixture render() needs
    one,
    pod_templates,
    render,
)

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("IMAGE", "localhost/cifar10-hvd:cpu")
NAMESPACE = "default"
LABEL = "cifar10-hvd-test"  # on every container and network these tests make, and only those
SUBNET = "10.214.0"  # exists only inside the tests' podman network (the local cluster uses 10.213.0)
LAUNCHER_IP = f"{SUBNET}.10"
SSH_DIR = "/home/cifar/.ssh"
# Small enough for 2 cores, the same stages as the job: tune, final, predict on 2 ranks.
TINY = ["train.width=4", "train.epochs=1", "train.batch_size=32", "train.eval_batch_size=128",
        "predict.batch_size=64", "train.threads=1"]
WORKERS = 2

pytestmark = pytest.mark.slow


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"podman {' '.join(args)}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc


def remove_test_objects() -> None:
    """Containers and networks of earlier runs of these tests (by their label), nothing else."""
    ids = podman("ps", "-aq", "--filter", f"label={LABEL}", check=False).stdout.split()
    if ids:
        podman("rm", "-f", "-t", "0", *ids, check=False, timeout=300)
    for net in podman("network", "ls", "-q", "--filter", f"label={LABEL}", check=False).stdout.split():
        podman("network", "rm", "-f", net, check=False)


@pytest.fixture(scope="module")
def image() -> str:
    """The image `make image` builds (a layer-cache hit when `make test` built it a moment ago)."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "build-image.sh"), IMAGE], capture_output=True,
                          text=True, timeout=3600, cwd=ROOT)
    assert proc.returncode == 0, f"the image does not build:\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}"
    return IMAGE


@pytest.fixture(scope="module")
def run_flags(image) -> list[str]:
    """What podman needs on this machine to start a container (scripts/container-flags.sh)."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "container-flags.sh"), image], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def worker_name(i: int) -> str:
    return f"{MPIJOB}-worker-{i}"


def worker_fqdn(i: int) -> str:
    """The name the operator writes into the hostfile."""
    return f"{worker_name(i)}.{MPIJOB}-worker.{NAMESPACE}.svc"


def worker_ip(i: int) -> str:
    return f"{SUBNET}.{20 + i}"


def ssh_key(dst: Path, comment: str) -> tuple[Path, Path]:
    """An ECDSA P-521 key pair as the operator's Secret holds it (private key PEM, public key line)."""
    dst.mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "521", "-m", "PEM", "-N", "", "-C", comment,
                    "-f", str(dst / "key")], check=True, timeout=60)
    return dst / "key", dst / "key.pub"


def secret_volume(dst: Path, private: Path, public: Path) -> Path:
    """The ssh Secret's volume: id_rsa, id_rsa.pub and authorized_keys, root-owned, group fsGroup, mode 0644
    (the kubelet's default mode, group fsGroup), as the operator mounts it at a non-root sshAuthMountPath."""
    dst.mkdir(parents=True)
    for name, src in (("id_rsa", private), ("id_rsa.pub", public), ("authorized_keys", public)):
        shutil.copyfile(src, dst / name)
        os.chown(dst / name, 0, 1000)
        os.chmod(dst / name, 0o644)
    os.chmod(dst, 0o755)
    return dst


class Cluster:
    """One podman network standing in for the cluster's pod network, and the pods run on it."""

    def __init__(self, objs: list[dict], flags: list[str], root: Path, net: str):
        self.objs, self.flags, self.root, self.net = objs, flags, root, net
        self.pods = pod_templates(objs)
        self.configmap = one(objs, "ConfigMap", "cifar10-hvd-configs")
        self.slots = one(objs, "MPIJob")["spec"].get("slotsPerWorker", 1)
        private, public = ssh_key(root / "job-key", f"{MPIJOB}-ssh")
        self.ssh = secret_volume(root / "ssh-auth", private, public)
        self.mpi_config = self.operator_configmap(root / "mpi-config")
        self.configs = self.configmap_volume(root / "configs")

    def operator_configmap(self, dst: Path) -> Path:
        """<job>-config: the hostfile (0444) and discover_hosts.sh (0555) the operator writes."""
        dst.mkdir()
        hosts = "".join(f"{worker_fqdn(i)} slots={self.slots}\n" for i in range(WORKERS))
        (dst / "hostfile").write_text(hosts)
        (dst / "discover_hosts.sh").write_text("#!/bin/sh\n" + "".join(f"echo {worker_fqdn(i)}\n" for i in range(WORKERS)))
        os.chmod(dst / "hostfile", 0o444)
        os.chmod(dst / "discover_hosts.sh", 0o555)
        return dst

    def configmap_volume(self, dst: Path) -> Path:
        """Every key of the project's ConfigMap as a file (a pod's volume picks its items from it)."""
        dst.mkdir()
        for key, text in self.configmap["data"].items():
            (dst / key).write_text(text)
            os.chmod(dst / key, 0o644)
        return dst

    def hosts(self) -> list[str]:
        """--add-host for every pod name the cluster's DNS would resolve."""
        out = ["--add-host", f"{MPIJOB}-launcher:{LAUNCHER_IP}"]
        for i in range(WORKERS):
            for name in (worker_name(i), worker_fqdn(i), f"{worker_fqdn(i)}.cluster.local"):
                out += ["--add-host", f"{name}:{worker_ip(i)}"]
        return out

    def volumes(self, role: str, tpl: dict, container: dict, data: Path, pod_dir: Path) -> list[str]:
        """-v for each of the container's volumeMounts, from the pod's volume of that name."""
        by_name = {v["name"]: v for v in tpl["spec"].get("volumes", [])}
        flags = []
        for m in container.get("volumeMounts", []):
            vol = by_name.get(m["name"])
            assert vol is not None, f"{role}/{container['name']} mounts {m['name']!r}, which the pod does not define"
            src = self.volume_source(vol, pod_dir, data)
            if m.get("subPath"):
                src = src / m["subPath"]
            flags += ["-v", f"{src}:{m['mountPath']}:{'ro' if m.get('readOnly') else 'rw'}"]
        return flags

    def volume_source(self, vol: dict, pod_dir: Path, data: Path) -> Path:
        if "persistentVolumeClaim" in vol:
            return data
        if "emptyDir" in vol:
            path = pod_dir / "emptydir" / vol["name"]
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o777)
            return path
        if "configMap" in vol:
            name = vol["configMap"]["name"]
            src = self.mpi_config if name == f"{MPIJOB}-config" else self.configs
            if name not in (f"{MPIJOB}-config", "cifar10-hvd-configs"):
                pytest.fail(f"volume {vol['name']}: ConfigMap {name} is neither the project's nor the operator's")
            items = vol["configMap"].get("items")
            if not items:
                return src
            path = pod_dir / "configmap" / vol["name"]
            path.mkdir(parents=True, exist_ok=True)
            for item in items:
                shutil.copyfile(src / item["key"], path / item["path"])
                os.chmod(path / item["path"], 0o644)
            return path
        pytest.fail(f"volume {vol['name']}: this test does not know how to lay out {sorted(vol)}")

    def argv(self, role: str, container: dict, *, data: Path, pod_dir: Path, name: str, ip: str | None = None,
             hostname: str | None = None, operator: dict[str, str] | None = None, extra_volumes: list[str] = (),
             extra_args: list[str] = (), detach: bool = False) -> list[str]:
        """`podman run` for one container of a pod, as the kubelet would start it."""
        tpl = self.pods[role]
        pod_sc, sc = tpl["spec"].get("securityContext", {}), container.get("securityContext", {})
        assert not sc.get("privileged"), f"{role}/{container['name']} is privileged"
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        gid = sc.get("runAsGroup", pod_sc.get("runAsGroup", uid))
        run = ["run", *self.flags, "--label", f"{LABEL}=1", "--name", name, "--network", self.net, *self.hosts()]
        run += ["--detach"] if detach else ["--rm"]
        run += ["--ip", ip] if ip else []
        run += ["--hostname", hostname] if hostname else []
        run += ["--user", f"{uid}:{gid}"] if uid is not None else []
        run += ["--group-add", str(pod_sc["fsGroup"])] if "fsGroup" in pod_sc else []
        if sc.get("readOnlyRootFilesystem"):
            run += ["--read-only", "--read-only-tmpfs=false"]
        if sc.get("allowPrivilegeEscalation") is False:
            run += ["--security-opt", "no-new-privileges"]
        for cap in sc.get("capabilities", {}).get("drop", []):
            run += ["--cap-drop", cap]
        for cap in sc.get("capabilities", {}).get("add", []):
            run += ["--cap-add", cap]
        for key, value in {**container_env(container), **(operator or {})}.items():
            run += ["--env", f"{key}={value}"]
        run += self.volumes(role, tpl, container, data, pod_dir) + list(extra_volumes)
        if container.get("command"):
            run += ["--entrypoint", json.dumps([expand(a, container) for a in container["command"]])]
        return [*run, IMAGE, *(expand(a, container) for a in container.get("args", [])), *extra_args]

    def run(self, role: str, container: dict, timeout: float, **kw) -> subprocess.CompletedProcess:
        return podman(*self.argv(role, container, **kw), timeout=timeout, check=False)

    def run_pod(self, role: str, data: Path, timeout: float, extra_args: list[str] = ()) -> subprocess.CompletedProcess:
        """A pod run to completion: its init containers in order, then its one container."""
        pod_dir = self.root / f"pod-{role}-{time.monotonic_ns()}"
        tpl = self.pods[role]
        for c in tpl["spec"].get("initContainers", []):
            proc = self.run(role, c, timeout, data=data, pod_dir=pod_dir, name=f"{LABEL}-{role}-{c['name']}")
            assert proc.returncode == 0, f"{role}'s init container {c['name']}:\n{proc.stdout}{proc.stderr}"
        return self.run(role, tpl["spec"]["containers"][0], timeout, data=data, pod_dir=pod_dir,
                        name=f"{LABEL}-{role}", extra_args=list(extra_args))

    def start_worker(self, i: int, data: Path, ssh: Path | None = None) -> str:
        """Worker pod i, detached: its sshd with the job key (or another Secret, for an impostor)."""
        tpl = self.pods["worker"]
        container = tpl["spec"]["containers"][0]
        name = f"{LABEL}-{worker_name(i)}"
        argv = self.argv("worker", container, data=data, pod_dir=self.root / f"pod-{name}", name=name,
                         ip=worker_ip(i), hostname=worker_name(i), operator={"K_MPI_JOB_ROLE": "worker"},
                         extra_volumes=["-v", f"{ssh or self.ssh}:{SSH_DIR}:ro"], detach=True)
        podman(*argv)
        return name

    def launcher_main(self, data: Path, extra_args: list[str] = (), detach: bool = False,
                      command: list[str] | None = None) -> list[str]:
        """The launcher's container as the operator completes it (env, /etc/mpi, the ssh Secret)."""
        tpl = self.pods["launcher"]
        container = dict(tpl["spec"]["containers"][0])
        if command is not None:
            container = {**container, "command": command, "args": []}
        operator = {"K_MPI_JOB_ROLE": "launcher", "OMPI_MCA_orte_keep_fqdn_hostnames": "true",
                    "OMPI_MCA_orte_default_hostfile": "/etc/mpi/hostfile",
                    "OMPI_MCA_plm_rsh_args": "-o ConnectionAttempts=10",
                    "OMPI_MCA_orte_set_default_slots": str(self.slots),
                    "NVIDIA_VISIBLE_DEVICES": "", "NVIDIA_DRIVER_CAPABILITIES": ""}
        return self.argv("launcher", container, data=data, pod_dir=self.root / f"pod-launcher-{time.monotonic_ns()}",
                         name=f"{LABEL}-launcher-{time.monotonic_ns()}", ip=None if command else LAUNCHER_IP,
                         hostname=f"{MPIJOB}-launcher", operator=operator,
                         extra_volumes=["-v", f"{self.ssh}:{SSH_DIR}:ro", "-v", f"{self.mpi_config}:/etc/mpi:ro"],
                         extra_args=list(extra_args), detach=detach)

    def launcher_inits(self, data: Path, timeout: float = 120) -> None:
        tpl = self.pods["launcher"]
        for c in tpl["spec"].get("initContainers", []):
            proc = self.run("launcher", c, timeout, data=data, pod_dir=self.root / "pod-launcher-init",
                            name=f"{LABEL}-launcher-{c['name']}")
            assert proc.returncode == 0, f"launcher's init container {c['name']}:\n{proc.stdout}{proc.stderr}"

    def stop(self, name: str) -> None:
        podman("rm", "-f", "-t", "0", name, check=False)


@pytest.fixture(scope="module")
def cluster(image, run_flags, kubectl, tmp_path_factory):  # noqa: F811 - kubectl is test_k8s's fixture
    remove_test_objects()
    net = f"{LABEL}-{os.getpid()}"
    podman("network", "create", "--label", f"{LABEL}=1", "--subnet", f"{SUBNET}.0/24", net)
    root = tmp_path_factory.mktemp("image-cluster")
    os.chmod(root, 0o755)
    try:
        yield Cluster(render(kubectl, "cpu-small"), run_flags, root, net)
    finally:
        remove_test_objects()


def new_data_dir(cluster: Cluster, name: str) -> Path:
    """The shared volume: owned by the pods' fsGroup user, as the kubelet leaves it."""
    data = cluster.root / name
    data.mkdir()
    os.chown(data, 1000, 1000)
    return data


def copy_as_pod_files(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=False)
    for path in [dst, *dst.rglob("*")]:
        os.chown(path, 1000, 1000)


@pytest.fixture(scope="module")
def prepared_volume(cluster, demo_src) -> Path:
    """The prepare Job's pod on the shared volume, after the upload: /data/prepared published."""
    data = new_data_dir(cluster, "data-prepared")
    copy_as_pod_files(demo_src, data / "kaggle")  # the upload (kubectl cp)
    (data / "kaggle.uploaded").touch()            # and its marker
    os.chown(data / "kaggle.uploaded", 1000, 1000)
    start = time.monotonic()
    proc = cluster.run_pod("prepare", data, timeout=600)
    print(f"prepare pod: {time.monotonic() - start:.1f} s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (data / "prepared" / "manifest.json").is_file()
    return data


def fresh_job_volume(cluster: Cluster, prepared_volume: Path, name: str) -> Path:
    data = new_data_dir(cluster, name)
    copy_as_pod_files(prepared_volume / "prepared", data / "prepared")
    return data


def test_image_has_no_host_keys_and_runs_as_the_manifests_user(cluster):
    proc = podman("run", *cluster.flags, "--rm", "--label", f"{LABEL}=1", "--entrypoint", "sh", IMAGE, "-c",
                  "ls /etc/ssh; id -u; python -c 'import mxnet, horovod.mxnet, onnx, onnxruntime; print(mxnet.__version__, onnxruntime.__version__)'")
    lines = proc.stdout.split()
    assert not [f for f in lines if f.startswith("ssh_host_")], f"host keys in the image: {lines}"
    assert "1000" in lines and "1.9.1" in lines and any(w.startswith("1.19.") for w in lines), proc.stdout


def test_the_mpijob_runs_from_the_image_to_a_valid_submission(cluster, prepared_volume, demo_src):
    """Prepare Job, then two workers and the launcher (its init containers, then mpirun) from the image."""
    data = fresh_job_volume(cluster, prepared_volume, "data-job")
    workers = [cluster.start_worker(i, data) for i in range(WORKERS)]
    try:
        start = time.monotonic()
        cluster.launcher_inits(data)
        proc = podman(*cluster.launcher_main(data, TINY), timeout=900, check=False)
        print(f"launcher: {time.monotonic() - start:.1f} s")
    finally:
        for w in workers:
            cluster.stop(w)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    summary = json.loads((data / "work" / "summary.json").read_text())
    assert summary["in_mpi_world"] is True
    assert [summary["stages"][s]["status"] for s in ("tune", "final", "predict")] == ["ran"] * 3
    assert (data / "work" / "final" / "model.onnx").stat().st_size > 0  # the image carries the onnx extra
    rows = (data / "work" / "submission.csv").read_text().splitlines()
    expected = (demo_src / "sampleSubmission.csv").read_text().splitlines()
    assert rows[0] == "id,label" and [r.split(",")[0] for r in rows] == [r.split(",")[0] for r in expected]
    classes = set(json.loads((data / "prepared" / "manifest.json").read_text())["classes"])
    assert {r.split(",")[1] for r in rows[1:]} <= classes


def test_a_worker_killed_mid_epoch_ends_the_launcher_non_zero_within_60_s(cluster, prepared_volume):
    data = fresh_job_volume(cluster, prepared_volume, "data-kill")
    workers = [cluster.start_worker(i, data) for i in range(WORKERS)]
    long_run = [*TINY, "train.epochs=200"]
    launcher = None
    try:
        cluster.launcher_inits(data)
        argv = cluster.launcher_main(data, long_run, detach=True)
        launcher = argv[argv.index("--name") + 1]
        podman(*argv)
        deadline = time.monotonic() + 600
        while not re.search(r"^epoch 1/200 ", podman("logs", launcher, check=False).stdout, re.M):
            assert time.monotonic() < deadline, "training never reached its second epoch"
            assert podman("inspect", "-f", "{{.State.Running}}", launcher).stdout.strip() == "true", \
                podman("logs", launcher, check=False).stdout[-3000:]
            time.sleep(1)
        killed = time.monotonic()
        podman("kill", workers[1])
        code = podman("wait", launcher, timeout=120).stdout.strip()
        ended = time.monotonic() - killed
        print(f"launcher ended {ended:.1f} s after the worker was killed (exit {code})")
        logs = podman("logs", launcher, check=False)
    finally:
        for name in [*workers, *([launcher] if launcher else [])]:
            cluster.stop(name)
    assert code != "0", logs.stdout[-3000:] + logs.stderr[-3000:]
    assert ended < 60, f"the launcher took {ended:.0f} s to end"


def ssh_from_launcher(cluster: Cluster, data: Path, *ssh_args: str) -> subprocess.CompletedProcess:
    """ssh as the launcher's mpirun runs it: the launcher container, its user, ssh config and key."""
    return podman(*cluster.launcher_main(data, command=["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                                                        *ssh_args]), timeout=120, check=False)


def test_a_worker_with_another_host_key_is_refused(cluster, prepared_volume):
    data = fresh_job_volume(cluster, prepared_volume, "data-impostor")
    private, public = ssh_key(cluster.root / "impostor-key", "impostor")
    impostor_secret = cluster.root / "impostor-ssh"
    secret_volume(impostor_secret, private, public)
    # Accepts the job's key as a user key (authorized_keys), serves its own host key.
    shutil.copyfile(cluster.ssh / "authorized_keys", impostor_secret / "authorized_keys")
    real = cluster.start_worker(0, data)
    impostor = cluster.start_worker(1, data, ssh=impostor_secret)
    try:
        cluster.launcher_inits(data)
        ok = ssh_from_launcher(cluster, data, worker_fqdn(0), "true")
        refused = ssh_from_launcher(cluster, data, worker_fqdn(1), "touch /tmp/reached")
        reached = podman("exec", impostor, "ls", "/tmp", check=False).stdout
    finally:
        cluster.stop(real)
        cluster.stop(impostor)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert refused.returncode == 255 and "Host key verification failed" in refused.stderr, refused.stderr
    assert "reached" not in reached


def test_no_tunnel_through_a_worker(cluster, prepared_volume):
    data = fresh_job_volume(cluster, prepared_volume, "data-tunnel")
    workers = [cluster.start_worker(i, data) for i in range(WORKERS)]
    try:
        cluster.launcher_inits(data)
        shell = ssh_from_launcher(cluster, data, worker_fqdn(0), "echo", "shell-ok")
        tunnel = ssh_from_launcher(cluster, data, "-W", f"{worker_fqdn(1)}:2222", worker_fqdn(0))
        # a port on the worker forwarded back through the job's connection
        forward = ssh_from_launcher(cluster, data, "-o", "ExitOnForwardFailure=yes", "-R",
                                    "127.0.0.1:2300:127.0.0.1:22", worker_fqdn(0), "true")
    finally:
        for w in workers:
            cluster.stop(w)
    assert shell.returncode == 0 and "shell-ok" in shell.stdout, shell.stderr
    assert tunnel.returncode != 0 and "SSH-2.0" not in tunnel.stdout, tunnel.stdout + tunnel.stderr
    assert forward.returncode != 0, forward.stdout + forward.stderr
