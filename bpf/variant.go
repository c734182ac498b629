//go:build !identityd_bpf_variant

package bpf

import "github.com/cilium/ebpf"

// applyVariant changes nothing in the shipped build; see variant_on.go.
func applyVariant(*ebpf.CollectionSpec) {}
