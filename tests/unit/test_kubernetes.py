"""deploy/kubernetes: every manifest validated offline against the Kubernetes schemas
(kubernetes-validate, strict: a misspelt field fails), then read for the contract: one Indexed
Job per stage, worker count, WORKER_INDEX from the completion index, exit codes mapped by the
podFailurePolicy, credentials only from the Secret, WORK_DIR sized from the part size; the three
Jobs are what `kubectl apply -f deploy/kubernetes/` applies (with the ConfigMap, never the Secret
template), and none waits for the stage before to finish; one-pod/migrate-job.yaml runs migrate.py."""

from __future__ import annotations

import copy
import math
import os

import kubernetes_validate
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KDIR = os.path.join(ROOT, "deploy", "kubernetes")
# The oldest version with backoffLimitPerIndex as GA; the newest the package knows.
VERSIONS = ("1.33.0", kubernetes_validate.utils.latest_version())
STAGES = {"master_mapper": "master-mapper", "python_zipper": "python-zipper", "python_unzipper": "python-unzipper"}
INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


# What `kubectl apply -f <dir>` reads: the files of the folder itself (not its subfolders) whose
# names end so.
APPLIED = (".json", ".yaml", ".yml")
SECRET_TEMPLATE = "secret.yaml.example"
MIGRATE_JOB = os.path.join("one-pod", "migrate-job.yaml")


def applied_by_kubectl(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(APPLIED) and os.path.isfile(os.path.join(folder, n)))


def documents() -> dict[str, list[dict]]:
    """Every manifest here, by its path under deploy/kubernetes (the Secret template too)."""
    out = {}
    names = applied_by_kubectl(KDIR) + [SECRET_TEMPLATE, MIGRATE_JOB]
    for name in names:
        with open(os.path.join(KDIR, name)) as fh:
            out[name] = [d for d in yaml.safe_load_all(fh) if d]
    return out


def job(stage: str) -> dict:
    (doc,) = documents()[f"{stage}-job.yaml"]
    return doc


def configmap() -> dict:
    (doc,) = documents()["configmap.yaml"]
    return doc


def worker(job_doc: dict, name: str = "worker") -> dict:
    (container,) = [c for c in job_doc["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return container


def policy_action(spec: dict, container: str, code: int | None, disruption: bool = False) -> str:
    """What the Job's podFailurePolicy does with a pod that ended with ``code``: the first matching
    rule wins, as Kubernetes reads them."""
    for rule in spec["podFailurePolicy"]["rules"]:
        if disruption and any(c["type"] == "DisruptionTarget" and c.get("status", "True") == "True"
                              for c in rule.get("onPodConditions", [])):
            return rule["action"]
        codes = rule.get("onExitCodes")
        if codes and code is not None and codes.get("containerName", container) == container:
            inside = code in codes["values"]
            if inside == (codes["operator"] == "In"):
                return rule["action"]
    return "Count"  # no rule matched: Kubernetes counts the failure


def check_exit_codes(spec: dict, container: str) -> None:
    """1 and 2 need a person: the Job fails at once; 3, 4 and 75 are retried; a disruption is not
    counted, whatever the pod's code."""
    for code in (1, 2):
        assert policy_action(spec, container, code) == "FailJob", f"exit {code} must fail the Job"
    for code in (3, 4, 75):
        assert policy_action(spec, container, code) == "Count", f"exit {code} must be counted and retried"
    for code in (1, 143):
        assert policy_action(spec, container, code, disruption=True) == "Ignore", "a disruption must not count"
    explicit = [c for r in spec["podFailurePolicy"]["rules"] for c in r.get("onExitCodes", {}).get("values", [])]
    assert {1, 2, 3, 4, 75} <= set(explicit)


def check_secrets_and_config(pod: dict, container: dict) -> dict[str, dict]:
    """Credentials only from the Secret; rclone.conf copied to a writable volume. Returns the
    pod's volumes by name."""
    env = env_of(container)
    for name in SECRETS:
        if name in env:
            assert "secretKeyRef" in env[name].get("valueFrom", {}), f"{name} given inline"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    config_dir = os.path.dirname(env["RCLONE_CONFIG"]["value"])
    assert "emptyDir" in volumes[mounts[config_dir]], "RCLONE_CONFIG must be on a writable volume"
    assert any("secret" in volumes[m["name"]] for c in pod.get("initContainers", []) for m in c["volumeMounts"])
    return volumes


def check_work_dir(container: dict, volumes: dict[str, dict], settings: dict[str, str], stages_staging: int) -> None:
    """WORK_DIR on an emptyDir sized for MAX_PARALLEL_WORKERS parts of MAX_ZIP_SIZE_GB per stage that
    stages parts on it, plus room."""
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    work = volumes[mounts[env_of(container)["WORK_DIR"]["value"]]]
    part_gb = float(settings.get("MAX_ZIP_SIZE_GB", "20"))
    parallel = int(settings.get("MAX_PARALLEL_WORKERS", "2"))
    want = math.ceil(stages_staging * part_gb * parallel * 1.25)
    assert work["emptyDir"]["sizeLimit"] == f"{want}Gi", f"WORK_DIR sizeLimit should be {want}Gi"
    storage = container["resources"]["requests"]["ephemeral-storage"]
    assert parse_quantity(storage) >= parse_quantity(work["emptyDir"]["sizeLimit"])


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def parse_quantity(q: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in units.items():
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * factor
    return float(q)


def check_contract(stage: str, doc: dict, settings: dict[str, str]) -> None:
    """Raise AssertionError naming what breaks the contract for this stage's Job."""
    spec = doc["spec"]
    assert doc["kind"] == "Job" and doc["metadata"]["name"] == STAGES[stage]
    assert spec["completionMode"] == "Indexed"
    container = worker(doc)
    env = env_of(container)
    count = int(env["WORKER_COUNT"]["value"])
    assert spec["completions"] == spec["parallelism"] == count, "completions, parallelism and WORKER_COUNT differ"
    assert env["WORKER_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == INDEX_ANNOTATION
    assert container["command"] == ["python", f"/app/{stage}.py"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy; retries are the Job's
    assert isinstance(spec.get("backoffLimitPerIndex"), int) and spec["backoffLimitPerIndex"] >= 1
    assert 15 <= pod.get("terminationGracePeriodSeconds", 30) <= 120

    check_exit_codes(spec, "worker")
    volumes = check_secrets_and_config(pod, container)
    check_work_dir(container, volumes, settings, stages_staging=1)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly(version):
    docs = documents()
    assert {f"{s}-job.yaml" for s in STAGES} | {"configmap.yaml", SECRET_TEMPLATE, MIGRATE_JOB} <= set(docs)
    for name, items in docs.items():
        for doc in items:
            kubernetes_validate.validate(doc, version, strict=True)


def test_a_misspelt_field_fails_validation():
    doc = copy.deepcopy(job("python_zipper"))
    doc["spec"]["completionMod"] = doc["spec"].pop("completionMode")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, VERSIONS[0], strict=True)
    doc = copy.deepcopy(job("python_zipper"))
    rule = doc["spec"]["podFailurePolicy"]["rules"][1]
    rule["onExitCode"] = rule.pop("onExitCodes")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, VERSIONS[0], strict=True)
    # The schema takes any action name (Kubernetes skips unknown ones): the contract check does not.
    doc = copy.deepcopy(job("python_zipper"))
    doc["spec"]["podFailurePolicy"]["rules"][1]["action"] = "FailJobs"
    kubernetes_validate.validate(doc, VERSIONS[0], strict=True)
    with pytest.raises(AssertionError):
        check_contract("python_zipper", doc, configmap()["data"])


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_is_an_indexed_job_that_keeps_the_contract(stage):
    check_contract(stage, job(stage), configmap()["data"])


def test_the_contract_check_catches_a_wrong_job():
    settings = configmap()["data"]
    good = job("python_zipper")
    mutations = {
        "exit 1 and 2 dropped from the policy": lambda d: d["spec"]["podFailurePolicy"]["rules"].pop(1),
        "exit 3 failing the index": lambda d: d["spec"]["podFailurePolicy"]["rules"].insert(
            0, {"action": "FailIndex", "onExitCodes": {"containerName": "worker", "operator": "In", "values": [3]}}),
        "parallelism differs": lambda d: d["spec"].update(parallelism=5),
        "an inline secret": lambda d: worker(d)["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}),
        "disk too small": lambda d: d["spec"]["template"]["spec"]["volumes"][0]["emptyDir"].update(sizeLimit="5Gi"),
        "the index from the pod name": lambda d: env_of(worker(d))["WORKER_INDEX"]["valueFrom"]["fieldRef"].update(
            fieldPath="metadata.name"),
    }
    for what, mutate in mutations.items():
        doc = copy.deepcopy(good)
        # An inline secret must replace the secretKeyRef entry to be seen.
        if what == "an inline secret":
            worker(doc)["env"] = [e for e in worker(doc)["env"] if e["name"] != "AWS_SECRET_ACCESS_KEY"]
        mutate(doc)
        with pytest.raises(AssertionError):
            check_contract("python_zipper", doc, settings)
    with pytest.raises(AssertionError):  # the ConfigMap's part size changed, the volume not
        check_contract("python_zipper", good, {**settings, "MAX_ZIP_SIZE_GB": "40"})


def test_the_three_jobs_differ_only_in_their_stage():
    def neutral(stage: str) -> str:
        return yaml.safe_dump(job(stage)).replace(STAGES[stage], "STAGE").replace(f"{stage}.py", "STAGE.py")
    assert neutral("master_mapper") == neutral("python_zipper") == neutral("python_unzipper")


def test_no_credentials_in_the_configmap_or_the_secret_template():
    data = configmap()["data"]
    assert not set(data) & set(SECRETS)
    (secret,) = documents()[SECRET_TEMPLATE]
    assert secret["stringData"]["AWS_ACCESS_KEY_ID"] == secret["stringData"]["AWS_SECRET_ACCESS_KEY"] == "REPLACE_ME"
    for name, items in documents().items():
        with open(os.path.join(KDIR, name)) as fh:
            text = fh.read()
        assert "AKIA" not in text, name


def test_kubectl_apply_of_the_folder_starts_the_three_stages_together():
    """`kubectl apply -f deploy/kubernetes/` reads the ConfigMap and the three Jobs only: not the
    Secret template (its placeholders would replace the real Secret) nor the one-pod Job."""
    assert applied_by_kubectl(KDIR) == sorted(["configmap.yaml", *(f"{s}-job.yaml" for s in STAGES)])
    assert applied_by_kubectl(os.path.join(KDIR, "one-pod")) == ["migrate-job.yaml"]
    for stage in STAGES:
        pod = job(stage)["spec"]["template"]["spec"]
        # Nothing waits for the stage before: the scripts follow it through the bucket.
        for container in pod.get("initContainers", []):
            assert container["command"][:2] == ["sh", "-c"] and "rclone.conf" in container["command"][2], container
            assert not any(s in " ".join(container["command"]) for s in ("kubectl", "wait", "until", "sleep"))
        assert "affinity" not in pod and "dependsOn" not in job(stage)["spec"]
    with open(os.path.join(KDIR, "python_zipper-job.yaml")) as fh:
        assert "once master-mapper is complete" not in fh.read()
    assert int(configmap()["data"]["UPSTREAM_WAIT"]) >= 300  # pods of the stage before may take a while to start


def test_the_one_pod_job_runs_migrate_py():
    (doc,) = documents()[MIGRATE_JOB]
    spec = doc["spec"]
    assert doc["kind"] == "Job" and doc["metadata"]["name"] == "migrate"
    assert spec.get("completions", 1) == spec.get("parallelism", 1) == 1 and "completionMode" not in spec
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and isinstance(spec.get("backoffLimit"), int) and spec["backoffLimit"] >= 1
    container = worker(doc, "migrate")
    assert container["command"] == ["python", "/app/migrate.py"]
    env = env_of(container)
    assert not {"WORKER_COUNT", "WORKER_INDEX"} & set(env)  # one worker per stage
    assert env["WAIT_FOR_QUOTA"]["value"] == "1"  # a quota pause is waited out, not retried
    check_exit_codes(spec, "migrate")
    volumes = check_secrets_and_config(pod, container)
    check_work_dir(container, volumes, configmap()["data"], stages_staging=2)  # zipper and unzipper
    assert 30 <= pod["terminationGracePeriodSeconds"] <= 120
    # The same image, ConfigMap and Secret as the Indexed Jobs.
    stage = job("python_zipper")["spec"]["template"]["spec"]
    assert container["image"] == worker(job("python_zipper"))["image"]
    assert container["envFrom"] == worker(job("python_zipper"))["envFrom"]
    assert {v["name"]: v for v in pod["volumes"]}["secret"] == {v["name"]: v for v in stage["volumes"]}["secret"]
    assert pod["initContainers"] == stage["initContainers"]
