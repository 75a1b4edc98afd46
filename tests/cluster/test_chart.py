"""The Helm chart and the install manifest rendered from it, with the real helm and the real API server."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_devstack.controlplane import Cluster
from llm_devstack.images import OPERATOR_IMAGE, SERVING_IMAGE
from llm_devstack.node import LOCAL_PLACEMENT
from llm_devstack.node.network import POD_RANGE
from llm_devstack.paths import EXAMPLES, ROOT
from llm_devstack.resources import install_crd, new_namespace
from llm_devstack.waits import wait_for
from llm_operator.__main__ import parse_args as operator_parse_args
from llm_operator.__main__ import settings_from as operator_settings
from llm_operator.api.v1alpha1 import LLMEndpoint
from llm_operator.gateway.__main__ import parse_args, settings_from
from llm_operator.gateway.auth import from_inside
from llm_operator.render import render as render_children
from llm_operator.settings import Settings
from tests.cluster.operator_support import get

pytestmark = pytest.mark.cluster
CHART = ROOT / "charts" / "llm-endpoints"


def helm(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [str(cluster.bin_dir / "helm"), "--kubeconfig", str(cluster.kubeconfig), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if check:
        assert result.returncode == 0, f"helm {' '.join(args)}: {result.stderr}"
    return result


INTERNAL = f"gateway.internalCIDRs={{{POD_RANGE}}}"
"""The one value the chart requires."""


def render(cluster: Cluster, *values: str) -> list[dict[str, Any]]:
    sets = [arg for value in (INTERNAL, *values) for arg in ("--set", value)]
    out = helm(cluster, "template", "rel", str(CHART), "--namespace", "llm-system", *sets).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def component(
    docs: list[dict[str, Any]], kind: str, name: str, fullname: str = "rel-llm-endpoints"
) -> dict[str, Any]:
    """The chart's object of `kind` for a component (operator, gateway)."""
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == f"{fullname}-{name}")


def container_args(deployment: dict[str, Any]) -> list[str]:
    args: list[str] = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return args


def test_helm_lint_is_clean(cluster: Cluster) -> None:
    result = helm(cluster, "lint", "--strict", str(CHART), "--set", INTERNAL)
    assert "0 chart(s) failed" in result.stdout


def test_every_rule_is_explicit_and_namespaced_when_asked(cluster: Cluster) -> None:
    cluster_wide = render(cluster)
    kinds = sorted(doc["kind"] for doc in cluster_wide)
    assert kinds.count("Deployment") == 2
    assert kinds.count("ClusterRoleBinding") == 2
    for doc in cluster_wide:
        for rule in doc.get("rules", ()):
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], doc["metadata"]["name"]

    namespaced = render(cluster, "watchNamespaces={team-a,team-b}")
    assert not [d for d in namespaced if d["kind"] == "ClusterRoleBinding"]
    bindings = {
        (d["metadata"]["namespace"], d["roleRef"]["name"]) for d in namespaced if d["kind"] == "RoleBinding"
    }
    assert ("team-a", "rel-llm-endpoints-operator") in bindings
    assert ("team-b", "rel-llm-endpoints-gateway") in bindings
    operator = next(
        d for d in namespaced if d["kind"] == "Deployment" and "operator" in d["metadata"]["name"]
    )
    args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args
    assert "--namespace=team-b" in args


def test_pods_meet_the_restricted_pod_security_standard(cluster: Cluster) -> None:
    for doc in render(cluster):
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("operator.replicas=0", "/operator/replicas"),
        ("gateway.holdTimeout=3", "holdTimeout"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("watchNamespaces={Bad_Name}", "/watchNamespaces/0"),
        ("gateway.service.port=70000", "/gateway/service/port"),
        ("gateway.internalCIDRs={10.0.0.0}", "/gateway/internalCIDRs/0"),
        ("operator.imagePolicy=none", "/operator/imagePolicy"),
        ("gateway.preStopSeconds=0", "/gateway/preStopSeconds"),
        ("hub.endpoint=hf-mirror.internal", "/hub/endpoint"),
    ],
)
def test_a_wrong_value_fails_with_a_message_naming_it(cluster: Cluster, value: str, field: str) -> None:
    result = helm(cluster, "template", "rel", str(CHART), "--set", INTERNAL, "--set", value, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert field in result.stderr


def test_the_gateway_access_values_reach_its_policy(cluster: Cluster) -> None:
    """gateway.internalCIDRs and trustForwardedHeaders become flags that decide who counts as inside."""
    docs = render(cluster, "gateway.internalCIDRs={10.1.0.0/16}", "gateway.trustForwardedHeaders=true")
    policy = settings_from(parse_args(container_args(component(docs, "Deployment", "gateway")))).access
    assert policy.is_internal("10.1.2.3")
    assert not policy.is_internal("10.2.0.1")
    assert not policy.is_internal("127.0.0.1")  # nothing is inside unless listed
    assert from_inside(policy, "10.1.0.9", {"x-forwarded-for": "10.1.0.7"})
    assert not from_inside(policy, "10.1.0.9", {"x-forwarded-for": "203.0.113.5"})


def test_the_internal_networks_are_required(cluster: Cluster) -> None:
    """No silent default: without gateway.internalCIDRs the chart does not render, and `[]` (what
    dist/install.yaml ships) is a gateway whose private endpoints refuse everyone."""
    result = helm(cluster, "template", "rel", str(CHART), check=False)
    assert result.returncode != 0
    assert "gateway.internalCIDRs is required" in result.stderr
    none = helm(cluster, "template", "rel", str(CHART), "--set-json", "gateway.internalCIDRs=[]").stdout
    gateway = component([d for d in yaml.safe_load_all(none) if d], "Deployment", "gateway")
    assert not [a for a in container_args(gateway) if a.startswith("--internal-cidr")]
    installed = [d for d in yaml.safe_load_all((ROOT / "dist" / "install.yaml").read_text()) if d]
    assert not [
        a
        for a in container_args(component(installed, "Deployment", "gateway", "llm-endpoints"))
        if "cidr" in a
    ]


def test_the_endpoints_network_policies_select_the_charts_gateway_and_operator_pods(cluster: Cluster) -> None:
    """The operator's flags name the gateway's and its own namespace and pod labels, so the NetworkPolicy it
    renders admits exactly the chart's gateway pods, and its operator pods (which read `/status`)."""
    docs = render(cluster)
    settings = operator_settings(
        operator_parse_args(container_args(component(docs, "Deployment", "operator")))
    )
    gateway = component(docs, "Deployment", "gateway")
    manifest = yaml.safe_load((EXAMPLES / "falcon-40b.yaml").read_text())
    rendered = render_children(LLMEndpoint.model_validate(manifest), settings)
    policy = next(
        d for d in rendered if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "falcon-40b"
    )
    peer, operator_peer = policy["spec"]["ingress"][0]["from"]
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "llm-system"}}
    pod_labels = gateway["spec"]["template"]["metadata"]["labels"]
    operator_labels = component(docs, "Deployment", "operator")["spec"]["template"]["metadata"]["labels"]
    selected = peer["podSelector"]["matchLabels"]
    assert selected.items() <= pod_labels.items()
    assert selected["app.kubernetes.io/instance"] == "rel"  # not another release's gateway
    assert not selected.items() <= operator_labels.items()
    assert operator_peer["namespaceSelector"] == peer["namespaceSelector"]
    operators = operator_peer["podSelector"]["matchLabels"]
    assert operators.items() <= operator_labels.items()
    assert operators["app.kubernetes.io/instance"] == "rel"
    assert not operators.items() <= pod_labels.items()


def test_the_image_policy_values_reach_the_operator(cluster: Cluster) -> None:
    docs = render(cluster, "operator.imagePolicy=allow-list", "operator.allowedImages={registry.corp/llm/*}")
    settings = operator_settings(
        operator_parse_args(container_args(component(docs, "Deployment", "operator")))
    )
    assert (settings.image_policy, settings.allowed_images) == ("allow-list", ("registry.corp/llm/*",))
    assert operator_settings(
        operator_parse_args(container_args(component(render(cluster), "Deployment", "operator")))
    ) == Settings(
        image=settings.image,
        gateway_url=settings.gateway_url,
        system_namespace="llm-system",
        gateway_namespace="llm-system",
        gateway_labels=settings.gateway_labels,
        operator_labels=settings.operator_labels,
    )  # every other value defaults to the operator's own default


def test_the_hub_endpoint_value_reaches_the_operator(cluster: Cluster) -> None:
    """`hub.endpoint`: where the operator resolves revisions, and what serving pods get as HF_ENDPOINT."""
    docs = render(cluster, "hub.endpoint=https://hf-mirror.internal")
    settings = operator_settings(
        operator_parse_args(container_args(component(docs, "Deployment", "operator")))
    )
    assert settings.hub_url == "https://hf-mirror.internal"
    assert settings.hf_endpoint == "https://hf-mirror.internal"
    default = operator_settings(
        operator_parse_args(container_args(component(render(cluster), "Deployment", "operator")))
    )
    assert default.hf_endpoint is None


def test_a_stopping_gateway_pod_is_unlisted_first_then_drains(cluster: Cluster) -> None:
    """A preStop pause before SIGTERM, then the drain within the grace period less the pause and 5 s."""
    gateway = component(render(cluster, "gateway.terminationGraceSeconds=90"), "Deployment", "gateway")
    pod = gateway["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 90
    assert pod["containers"][0]["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}
    assert "--shutdown-grace-seconds=80" in container_args(gateway)


def test_a_load_balancer_keeps_the_client_address(cluster: Cluster) -> None:
    """externalTrafficPolicy: Local, so outside callers are not seen from a node's (private) address."""
    for kind, expected in (("LoadBalancer", "Local"), ("NodePort", "Local"), ("ClusterIP", None)):
        service = component(render(cluster, f"gateway.service.type={kind}"), "Service", "gateway")
        assert service["spec"].get("externalTrafficPolicy") == expected, kind


@pytest.fixture
def restricted_namespace(cluster: Cluster) -> Iterator[str]:
    name = f"llm-system-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false")


def admitted(cluster: Cluster, namespace: str, deployment: dict[str, Any]) -> None:
    """The Deployment's pod template, created (server dry-run) in `namespace`, passes its admission."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": deployment["metadata"]["name"], "namespace": namespace},
        "spec": {**deployment["spec"]["template"]["spec"], "serviceAccountName": "default"},
    }
    result = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pod), check=False)
    assert result.returncode == 0, result.stderr


def test_the_restricted_admission_accepts_the_chart_pods(cluster: Cluster, restricted_namespace: str) -> None:
    """The API server's own PodSecurity admission, in enforce mode, admits every pod template."""
    for doc in render(cluster):
        if doc["kind"] == "Deployment":
            admitted(cluster, restricted_namespace, doc)


@pytest.mark.parametrize("example", ["smollm2.yaml", "falcon-40b.yaml"])
def test_the_restricted_admission_accepts_the_endpoints_pods(
    cluster: Cluster, restricted_namespace: str, example: str
) -> None:
    """The serving pods the operator renders for the examples (CPU, and 4 GPUs with /dev/shm and a weight
    cache) are admitted by the same enforcing namespace."""
    manifest = yaml.safe_load((EXAMPLES / example).read_text())
    manifest["metadata"]["namespace"] = restricted_namespace
    endpoint = LLMEndpoint.model_validate(manifest)
    rendered = [d for d in render_children(endpoint, Settings()) if d["kind"] == "Deployment"]
    assert len(rendered) == 1
    admitted(cluster, restricted_namespace, rendered[0])


def test_install_manifest_applies_cleanly_twice(cluster: Cluster) -> None:
    manifest = str(ROOT / "dist" / "install.yaml")
    cluster.kubectl("apply", "--server-side", "-f", manifest)
    again = cluster.kubectl("apply", "--server-side", "-f", manifest).stdout.splitlines()
    assert again
    assert all(line.endswith("serverside-applied") for line in again)
    diff = cluster.kubectl("diff", "--server-side", "-f", manifest, check=False)
    assert diff.returncode == 0, diff.stdout
    cluster.kubectl("scale", "deployment", "--all", "-n", "llm-system", "--replicas=0")


# -- the release's whole life on the cluster: install, upgrade, uninstall -----------------------------------

RELEASE = "lc"
FULLNAME = f"{RELEASE}-llm-endpoints"
INSTANCE = f"app.kubernetes.io/instance={RELEASE}"


def release_pods(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    """The release's pods of one component (llm-operator or llm-gateway), deleting ones left out."""
    selector = f"{INSTANCE},app.kubernetes.io/name={name}"
    items: list[dict[str, Any]] = get(cluster, "pods", "-n", namespace, "-l", selector).get("items", [])
    return [pod for pod in items if not pod["metadata"].get("deletionTimestamp")]


WHOAMI = """
import json, os, ssl, urllib.request
account = "/var/run/secrets/kubernetes.io/serviceaccount"
token = open(f"{account}/token").read()
server = f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}"
review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
request = urllib.request.Request(
    f"{server}/apis/authentication.k8s.io/v1/selfsubjectreviews",
    json.dumps(review).encode(),
    {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
)
context = ssl.create_default_context(cafile=f"{account}/ca.crt")
with urllib.request.urlopen(request, context=context, timeout=20) as answer:
    print(json.load(answer)["status"]["userInfo"]["username"])
"""
"""A SelfSubjectReview from inside a pod, with the ServiceAccount token the kubelet projected there, through
the in-cluster address every Kubernetes client uses."""


def whoami(cluster: Cluster, pod: dict[str, Any]) -> str:
    """The user the API server sees behind a pod's own credentials (`kubectl exec` of the image's Python)."""
    namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    result = cluster.kubectl("exec", "-n", namespace, name, "--", "python", "-c", WHOAMI, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture
def release_namespaces(cluster: Cluster) -> Iterator[tuple[str, str]]:
    """The release's namespace and the namespace of the example endpoint; both deleted at the end."""
    system, apps = new_namespace(cluster, "llm-rel"), new_namespace(cluster, "llm-apps")
    yield system, apps
    helm(cluster, "uninstall", RELEASE, "--namespace", system, "--wait", check=False)
    cluster.kubectl("delete", "namespace", system, apps, "--wait=false", check=False)


def test_helm_install_upgrade_uninstall(
    cluster: Cluster, local_node: str, release_namespaces: tuple[str, str], tmp_path: Path
) -> None:
    """`helm install` runs the operator and gateway pods from the built images (on the real node, under the
    chart's ServiceAccounts, ready by the kubelet's probes) and the operator reconciles the example endpoint;
    `helm upgrade` with a changed value rolls the operator only; `helm uninstall` removes the release's
    objects and leaves the CRD, the endpoints and what they own."""
    system, apps = release_namespaces
    install_crd(cluster)  # the CRD may already be there (other tests): helm then leaves it as it is
    values = tmp_path / "values.yaml"
    repository, _, tag = OPERATOR_IMAGE.rpartition(":")
    values.write_text(
        yaml.safe_dump(
            {
                **LOCAL_PLACEMENT,
                "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
                "servingImage": SERVING_IMAGE,
                "operator": {"replicas": 1},
                "gateway": {"replicas": 1, "internalCIDRs": [str(POD_RANGE)]},
            }
        )
    )
    release = ("--namespace", system, "-f", str(values), "--wait", "--timeout=180s")
    helm(cluster, "install", RELEASE, str(CHART), *release)

    # the operator runs the built image as the chart's ServiceAccount, with the token the kubelet projected
    (operator,) = release_pods(cluster, system, "llm-operator")
    assert operator["spec"]["serviceAccountName"] == f"{FULLNAME}-operator"
    assert operator["spec"]["nodeName"] == local_node
    assert [c["image"] for c in operator["status"]["containerStatuses"]] == [OPERATOR_IMAGE]
    assert whoami(cluster, operator) == f"system:serviceaccount:{system}:{FULLNAME}-operator"
    (gateway,) = release_pods(cluster, system, "llm-gateway")
    assert gateway["spec"]["nodeName"] == local_node
    assert whoami(cluster, gateway) == f"system:serviceaccount:{system}:{FULLNAME}-gateway"

    # ... and reconciles the example endpoint (its pods land on the kwok nodes)
    cluster.kubectl("apply", "-n", apps, "-f", str(EXAMPLES / "smollm2.yaml"))
    gateway_url = f"http://{FULLNAME}-gateway.{system}.svc.cluster.local"
    wait_for(
        lambda: get(cluster, "llme", "smollm2", "-n", apps).get("status", {}).get("url"),
        90,
        "the chart's operator to write the example endpoint's status",
    )
    endpoint = get(cluster, "llme", "smollm2", "-n", apps)
    assert endpoint["status"]["url"] == f"{gateway_url}/endpoints/{apps}/smollm2"
    deployment = get(cluster, "deployment", "smollm2", "-n", apps)
    assert deployment["metadata"]["ownerReferences"][0]["uid"] == endpoint["metadata"]["uid"]

    # upgrade: a changed operator value rolls the operator (a new pod replaces the old), not the gateway
    helm(
        cluster,
        "upgrade",
        RELEASE,
        str(CHART),
        *release,
        "--reuse-values",
        "--set",
        "operator.logLevel=debug",
    )
    rolled = wait_for(
        lambda: [
            p
            for p in release_pods(cluster, system, "llm-operator")
            if p["metadata"]["uid"] != operator["metadata"]["uid"]
        ],
        60,
        "a new operator pod",
    )
    assert len(rolled) == 1
    assert "--log-level=debug" in rolled[0]["spec"]["containers"][0]["args"]
    wait_for(
        lambda: (
            [p["metadata"]["uid"] for p in release_pods(cluster, system, "llm-operator")]
            == [rolled[0]["metadata"]["uid"]]
        ),
        60,
        "the old operator pod to be gone",
    )
    assert [p["metadata"]["uid"] for p in release_pods(cluster, system, "llm-gateway")] == [
        gateway["metadata"]["uid"]
    ]
    # the new operator pod acts: a spec change is reconciled
    cluster.kubectl(
        "patch", "llme", "smollm2", "-n", apps, "--type=merge", "-p", '{"spec":{"scaling":{"minReplicas":1}}}'
    )
    generation = get(cluster, "llme", "smollm2", "-n", apps)["metadata"]["generation"]
    wait_for(
        lambda: get(cluster, "llme", "smollm2", "-n", apps)["status"].get("observedGeneration") == generation,
        60,
        "the upgraded operator to reconcile the changed spec",
    )

    # uninstall: the release's objects and pods go; the CRD and the endpoints (with their children) stay
    helm(cluster, "uninstall", RELEASE, "--namespace", system, "--wait", "--timeout=120s")
    for kind in (
        "deployments",
        "services",
        "serviceaccounts",
        "poddisruptionbudgets",
        "roles",
        "rolebindings",
    ):
        assert not get(cluster, kind, "-n", system, "-l", INSTANCE).get("items"), kind
    for kind in ("clusterroles", "clusterrolebindings"):
        assert not get(cluster, kind, "-l", INSTANCE).get("items"), kind
    wait_for(lambda: not get(cluster, "pods", "-n", system).get("items"), 60, "the release's pods to go")
    assert get(cluster, "crd", "llmendpoints.llm-endpoints.io")
    assert get(cluster, "llme", "smollm2", "-n", apps)
    assert get(cluster, "deployment", "smollm2", "-n", apps)
