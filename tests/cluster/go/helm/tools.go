//go:build tools

// Package tools records the helm command built from this module, so `go mod tidy` keeps its dependencies in go.sum.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
