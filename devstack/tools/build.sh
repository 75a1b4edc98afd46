#!/usr/bin/env bash
# Builds the test control plane and the real node from Go modules, once: kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl, etcd, kwok, helm and our kstatus
# command land in $LLME_BIN_DIR, by default
# ~/.cache/llm-endpoints/cluster-bin/<kubernetes version>-<hash of versions.env>/bin: outside the clone,
# like Go's own module and build caches, so a fresh clone on a warm machine builds nothing, and keyed by
# every pinned version (and BUILD_REVISION, bumped when this script changes how a binary is built). A binary that is already there is kept.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
key=$KUBERNETES_VERSION-$(sha256sum <"$here/versions.env" | cut -c1-8)
bin=${LLME_BIN_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-endpoints/cluster-bin/$key/bin}
mkdir -p "$bin"
export CGO_ENABLED=0 GOFLAGS=-trimpath

build() {  # build <tools module dir> <output name> <package> [ldflags] [always]
  local dir=$1 name=$2 pkg=$3 ldflags=${4:-} always=${5:-}
  [[ -x "$bin/$name" && -z "$always" ]] && return
  [[ -n "$always" ]] || echo "cluster-bin: building $name from $pkg (a cold build takes minutes) ..."
  local start=$SECONDS
  (cd "$here/$dir" && go build -ldflags "-s -w $ldflags" -o "$bin/$name.tmp" "$pkg")
  mv "$bin/$name.tmp" "$bin/$name"
  [[ -n "$always" ]] || echo "cluster-bin: $name done in $((SECONDS - start))s"
}

kv=k8s.io/component-base/version
kver="-X $kv.gitVersion=$KUBERNETES_VERSION -X $kv.gitMajor=1 -X $kv.gitMinor=$(cut -d. -f2 <<<"$KUBERNETES_VERSION")"
build kubernetes kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$kver"
build kubernetes kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$kver"
build kubernetes kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler "$kver"
build kubernetes kubelet k8s.io/kubernetes/cmd/kubelet "$kver"
build kubernetes kube-proxy k8s.io/kubernetes/cmd/kube-proxy "$kver"
build kubernetes kubectl k8s.io/kubernetes/cmd/kubectl "$kver"
build etcd etcd go.etcd.io/etcd/server/v3
build kwok kwok sigs.k8s.io/kwok/cmd/kwok "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
# helm's default capabilities (what `helm template` and `helm lint` assume) follow our Kubernetes version.
hminor=$(cut -d. -f2 <<<"$KUBERNETES_VERSION")
hflags="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
  hflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$hminor"
done
build helm helm helm.sh/helm/v3/cmd/helm "$hflags"
# Our own small command: rebuilt every time (seconds, from Go's build cache) so edits to it take effect.
build kstatus kstatus . "" always
# kwok needs Stage objects that say how simulated nodes and pods move through their lifecycle; it ships
# them as YAML in its module. They are read from there at build time, never copied into this repository.
stages=$bin/../kwok-stages
if [[ ! -d "$stages" ]]; then
  kwok_dir=$(cd "$here/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)
  mkdir -p "$stages.tmp"
  cp "$kwok_dir"/kustomize/stage/node/fast/node-initialize.yaml \
     "$kwok_dir"/kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
     "$kwok_dir"/kustomize/stage/pod/fast/pod-{ready,complete,delete}.yaml "$stages.tmp/"
  chmod u+w "$stages.tmp"/*
  mv "$stages.tmp" "$stages"
fi
echo "cluster-bin: kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl, etcd, kwok, helm, kstatus in $bin"
# actionlint (`make lint`) is pinned in its go.mod only, not in versions.env (whose hash keys every binary): the
# file is named by that version, so a bump builds only this one; `actionlint` points at the current one.
alver=$(awk '$1 == "github.com/rhysd/actionlint" {print $2}' "$here/actionlint/go.mod")
build actionlint "actionlint-$alver" github.com/rhysd/actionlint/cmd/actionlint "-X github.com/rhysd/actionlint.version=$alver"
ln -sfn "actionlint-$alver" "$bin/actionlint"
