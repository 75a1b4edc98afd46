//go:build tools

// Package tools pins the kwok command that build.sh compiles from this module.
package tools

import _ "sigs.k8s.io/kwok/pkg/kwok/cmd"
