"""deploy/kubernetes: every manifest validated offline against the Kubernetes schemas
(kubernetes-validate, strict: a misspelt field fails), then read for the contract: one Indexed
Job per stage, worker count, WORKER_INDEX from the completion index, exit codes mapped by the
podFailurePolicy, credentials only from the Secret, WORK_DIR sized from the part size."""

from __future__ import annotations

import copy
import glob
import math
import os

import kubernetes_validate
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KDIR = os.path.join(ROOT, "deploy", "kubernetes")
# The oldest version with backoffLimitPerIndex and FailIndex as GA; the newest the package knows.
VERSIONS = ("1.33.0", kubernetes_validate.utils.latest_version())
STAGES = {"master_mapper": "master-mapper", "python_zipper": "python-zipper", "python_unzipper": "python-unzipper"}
INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def documents() -> dict[str, list[dict]]:
    out = {}
    for path in sorted(glob.glob(os.path.join(KDIR, "*.yaml"))):
        with open(path) as fh:
            out[os.path.basename(path)] = [d for d in yaml.safe_load_all(fh) if d]
    return out


def job(stage: str) -> dict:
    (doc,) = documents()[f"{stage}-job.yaml"]
    return doc


def configmap() -> dict:
    (doc,) = documents()["configmap.yaml"]
    return doc


def worker(job_doc: dict) -> dict:
    (container,) = [c for c in job_doc["spec"]["template"]["spec"]["containers"] if c["name"] == "worker"]
    return container


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

    # Exit codes: the first matching rule wins, so read them as Kubernetes does.
    def action(code: int | None, disruption: bool = False) -> str:
        for rule in spec["podFailurePolicy"]["rules"]:
            if disruption and any(c["type"] == "DisruptionTarget" and c.get("status", "True") == "True"
                                  for c in rule.get("onPodConditions", [])):
                return rule["action"]
            codes = rule.get("onExitCodes")
            if codes and code is not None and codes.get("containerName", "worker") == "worker":
                inside = code in codes["values"]
                if inside == (codes["operator"] == "In"):
                    return rule["action"]
        return "Count"  # no rule matched: Kubernetes counts the failure
    assert action(2) == "FailJob", "exit 2 must fail the Job"
    assert action(3) == "FailIndex", "exit 3 must fail the index"
    assert action(143, disruption=True) == "Ignore", "a disruption must not count"
    for code in (1, 4, 75):
        assert action(code) == "Count", f"exit {code} must be counted and retried"
    explicit = [c for r in spec["podFailurePolicy"]["rules"] for c in r.get("onExitCodes", {}).get("values", [])]
    assert {1, 2, 3, 4, 75} <= set(explicit)

    # Credentials only from the Secret; rclone.conf copied to a writable volume.
    for name in SECRETS:
        if name in env:
            assert "secretKeyRef" in env[name].get("valueFrom", {}), f"{name} given inline"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    config_dir = os.path.dirname(env["RCLONE_CONFIG"]["value"])
    assert "emptyDir" in volumes[mounts[config_dir]], "RCLONE_CONFIG must be on a writable volume"
    assert any("secret" in volumes[m["name"]] for c in pod.get("initContainers", []) for m in c["volumeMounts"])

    # WORK_DIR on an emptyDir sized for MAX_PARALLEL_WORKERS parts of MAX_ZIP_SIZE_GB, plus room.
    work = volumes[mounts[env["WORK_DIR"]["value"]]]
    part_gb = float(settings.get("MAX_ZIP_SIZE_GB", "20"))
    parallel = int(settings.get("MAX_PARALLEL_WORKERS", "2"))
    want = math.ceil(part_gb * parallel * 1.25)
    assert work["emptyDir"]["sizeLimit"] == f"{want}Gi", f"WORK_DIR sizeLimit should be {want}Gi"
    storage = container["resources"]["requests"]["ephemeral-storage"]
    assert parse_quantity(storage) >= parse_quantity(work["emptyDir"]["sizeLimit"])


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly(version):
    docs = documents()
    assert {f"{s}-job.yaml" for s in STAGES} | {"configmap.yaml", "secret.example.yaml"} <= set(docs)
    for name, items in docs.items():
        for doc in items:
            kubernetes_validate.validate(doc, version, strict=True)


def test_a_misspelt_field_fails_validation():
    doc = copy.deepcopy(job("python_zipper"))
    doc["spec"]["completionMod"] = doc["spec"].pop("completionMode")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, VERSIONS[0], strict=True)
    doc = copy.deepcopy(job("python_zipper"))
    rule = doc["spec"]["podFailurePolicy"]["rules"][0]
    rule["onExitCode"] = rule.pop("onExitCodes")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, VERSIONS[0], strict=True)
    # The schema takes any action name (Kubernetes skips unknown ones): the contract check does not.
    doc = copy.deepcopy(job("python_zipper"))
    doc["spec"]["podFailurePolicy"]["rules"][0]["action"] = "FailJobs"
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
        "exit 2 dropped from the policy": lambda d: d["spec"]["podFailurePolicy"]["rules"].pop(0),
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
    (secret,) = documents()["secret.example.yaml"]
    assert secret["stringData"]["AWS_ACCESS_KEY_ID"] == secret["stringData"]["AWS_SECRET_ACCESS_KEY"] == "REPLACE_ME"
    for name, items in documents().items():
        with open(os.path.join(KDIR, name)) as fh:
            text = fh.read()
        assert "AKIA" not in text, name
