"""The llm-endpoints dev stack: what `make run`, the tests and the benchmarks start on this machine.

`controlplane` (etcd, kube-apiserver, controllers, kwok, built from the Go modules in devstack/tools),
`node` (a real node: containerd, kubelet and kube-proxy on this machine), `images` (`make images`),
`processes` (the operator and gateway as real subprocesses), `__main__` (`make run`). Importing this
package imports nothing else, so that `ports` also serves scripts run without the project's virtualenv.
"""
