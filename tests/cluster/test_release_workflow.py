"""The release workflow: actionlint (as `make lint` runs it) passes it and refuses broken copies of it; its
image names, tags and registry agree with the chart, the operator and `make images`; actions are pinned to
commits, jobs get only the write permissions they use, every signature is verified in the job that made it;
the quick start's own-registry values render the images its commands push."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_devstack import images
from llm_devstack.controlplane import default_bin_dir
from llm_devstack.paths import ROOT
from llm_operator.settings import SERVING_IMAGE

WORKFLOWS = ROOT / ".github" / "workflows"
RELEASE = WORKFLOWS / "release.yml"
CHART = ROOT / "charts" / "llm-endpoints"
QUICKSTART = ROOT / "docs" / "quickstart.md"
ACTIONLINT = default_bin_dir() / "actionlint"
HELM = default_bin_dir() / "helm"
DOCKERFILES = {"llm-operator": "operator/Dockerfile", "llm-serving": "serving/Dockerfile"}
"""The images a release publishes and the Dockerfile each is built from."""
OURS = (images.OPERATOR_IMAGE, SERVING_IMAGE)

pytestmark = pytest.mark.cluster  # actionlint and helm come from `make cluster-bin`


def workflow() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(RELEASE.read_text())
    return loaded


def chart() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / "Chart.yaml").read_text())
    return loaded


def actionlint(*args: str | Path) -> subprocess.CompletedProcess[str]:
    if not ACTIONLINT.exists():
        pytest.fail(f"no actionlint at {ACTIONLINT}: `make cluster-bin` builds it")
    if shutil.which("shellcheck") is None:
        pytest.fail("no shellcheck (actionlint runs it on `run:` steps): `make system-packages` installs it")
    argv = [str(ACTIONLINT), "-no-color", "-oneline", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def pushes(job: dict[str, Any]) -> bool:
    """Whether a job logs in to the registry (and so pushes: nothing else needs the login)."""
    return any(str(step.get("uses", "")).startswith("docker/login-action@") for step in job["steps"])


def test_actionlint_passes_the_workflows() -> None:
    result = actionlint(*sorted(WORKFLOWS.glob("*.yml")))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_actionlint_is_the_version_its_go_mod_pins() -> None:
    go_mod = (ROOT / "devstack" / "tools" / "actionlint" / "go.mod").read_text()
    pinned = re.search(r"^\tgithub\.com/rhysd/actionlint (v\S+) // indirect$", go_mod, re.MULTILINE)
    assert pinned
    assert actionlint("-version").stdout.splitlines()[0] == pinned.group(1)
    assert f"| `github.com/rhysd/actionlint` | {pinned.group(1)} " in (ROOT / "README.md").read_text()


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        ("runs-on: ubuntu-24.04", "runs-on: ubuntu-42.04", 'label "ubuntu-42.04" is unknown'),
        ("timeout-minutes: 120", "timeout-minute: 120", 'unexpected key "timeout-minute" for "job" section'),
        ("steps.build.outputs.digest", "steps.biuld.outputs.digest", 'property "biuld" is not defined'),
        ("matrix.image ==", "matrix.images ==", 'property "images" is not defined'),
        ("packages: write", "package: write", 'unknown permission scope "package"'),
        ("needs: [version, publish]", "needs: [version, publsh]", 'needs job "publsh" which does not exist'),
        ('>>"$GITHUB_OUTPUT"', ">>$GITHUB_OUTPUT", "SC2086"),
    ],
    ids=["runner-label", "job-key", "step-output", "matrix-key", "permission", "needs", "shellcheck"],
)
def test_actionlint_refuses_a_broken_workflow(tmp_path: Path, old: str, new: str, error: str) -> None:
    text = RELEASE.read_text()
    assert old in text
    broken = tmp_path / "release.yml"
    broken.write_text(text.replace(old, new, 1))
    result = actionlint(broken)
    assert result.returncode == 1
    assert error in result.stdout


def test_the_published_names_are_the_chart_and_operator_defaults() -> None:
    registry = workflow()["env"]["REGISTRY"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    version = chart()["appVersion"]
    assert chart()["version"] == version  # the workflow refuses a tag otherwise
    assert registry == images.REGISTRY
    assert values["image"]["repository"] == f"{registry}/llm-operator"
    assert values["image"]["tag"] == ""  # the appVersion, which the workflow tags
    assert SERVING_IMAGE == images.SERVING_IMAGE == f"{registry}/llm-serving:{version}"
    assert f"{registry}/llm-operator:{version}" == images.OPERATOR_IMAGE
    jobs = workflow()["jobs"]
    rows = jobs["image"]["strategy"]["matrix"]["include"]
    built = {row["image"]: row["dockerfile"] for row in rows if "image" in row}
    assert built == DOCKERFILES
    assert all((ROOT / dockerfile).is_file() for dockerfile in built.values())
    assert jobs["image"]["strategy"]["matrix"]["image"] == jobs["publish"]["strategy"]["matrix"]["image"]
    runners = {row["arch"]: row["runner"] for row in rows if "arch" in row}
    assert jobs["image"]["strategy"]["matrix"]["arch"] == list(runners) == ["amd64", "arm64"]
    assert runners["arm64"].endswith("-arm")  # each platform built natively
    assert not runners["amd64"].endswith("-arm")
    assert 'oci://$REGISTRY/charts"' in "".join(step.get("run", "") for step in jobs["chart"]["steps"])
    assert f"oci://{registry}/charts/{chart()['name']}" in QUICKSTART.read_text()


def test_actions_are_pinned_to_commits() -> None:
    uses = re.findall(r"uses: (\S+)(.*)", RELEASE.read_text())
    assert uses
    for action, comment in uses:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", action), action
        assert re.fullmatch(r" # v\d+\.\d+\.\d+", comment), (action, comment)


def test_jobs_get_only_the_permissions_they_use() -> None:
    loaded = workflow()
    assert loaded["permissions"] == {}
    for name, job in loaded["jobs"].items():
        scripts = "".join(step.get("run", "") for step in job["steps"])
        writes = {scope for scope, access in job["permissions"].items() if access == "write"}
        expected = {"packages"} if pushes(job) else set()
        if "cosign sign" in scripts:
            expected.add("id-token")  # keyless signing's OIDC token
        assert writes == expected, name
        assert job["permissions"]["contents"] == "read", name


def test_every_signature_is_verified_in_the_job_that_made_it() -> None:
    signing = 0
    for name, job in workflow()["jobs"].items():
        scripts = "".join(step.get("run", "") for step in job["steps"])
        signed = re.findall(r"cosign sign --yes (\S+)", scripts)
        verified = re.findall(r"cosign verify (\S+)((?:.*\\\n)*.*)", scripts)
        assert signed == [ref for ref, _ in verified], name
        for _, flags in verified:
            assert '--certificate-identity "$GITHUB_SERVER_URL/$GITHUB_WORKFLOW_REF"' in flags, name
            assert '--certificate-oidc-issuer "$OIDC_ISSUER"' in flags, name
        signing += len(signed)
    assert signing == 2  # the images (one job per image) and the chart
    assert workflow()["env"]["OIDC_ISSUER"] == "https://token.actions.githubusercontent.com"


def quickstart_section() -> str:
    section = r"^## Build the images yourself$(.*?)(?=^## |^Next:|\Z)"
    found = re.search(section, QUICKSTART.read_text(), re.MULTILINE | re.DOTALL)
    assert found
    return found.group(1)


def test_the_quickstart_values_run_the_images_its_commands_push(tmp_path: Path) -> None:
    section = quickstart_section()
    registry = re.search(r"make images REGISTRY=(\S+)", section)
    assert registry
    theirs = {ref: ref.replace(images.REGISTRY, registry.group(1), 1) for ref in OURS}
    for ref in theirs.values():
        assert section.count(f"-t {ref} --push .") == 1, ref
    (block,) = re.findall(r"```yaml\n(image:.*?)```", section, re.DOTALL)
    values = tmp_path / "my-registry.yaml"
    values.write_text(block)
    if not HELM.exists():
        pytest.fail(f"no helm at {HELM}: `make cluster-bin` builds it")
    argv = [str(HELM), "template", "rel", str(CHART), "--namespace", "llm-system", "-f", str(values)]
    argv += ["--set-json", f"gateway.internalCIDRs={json.dumps(['10.244.0.0/16'])}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    docs = [doc for doc in yaml.safe_load_all(out) if doc]
    pods = [doc["spec"]["template"]["spec"] for doc in docs if doc["kind"] == "Deployment"]
    containers = {pod["containers"][0]["command"][-1]: pod["containers"] for pod in pods}
    assert containers.keys() == {"llm_operator", "llm_operator.gateway"}
    for pod in pods:
        (container,) = pod["containers"]
        assert container["image"] == theirs[images.OPERATOR_IMAGE]
        assert pod["imagePullSecrets"] == [{"name": name} for name in re.findall(r"- name: (\S+)", block)]
    assert f"--image={theirs[SERVING_IMAGE]}" in containers["llm_operator"][0]["args"]
