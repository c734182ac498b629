//go:build identityd_bpf_variant

package bpf

import (
	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// applyVariant, in a build with the identityd_bpf_variant tag, gives the
// sockops program one more instruction, a no-op at its entry: a program
// that differs from the shipped one while doing the same. Tests upgrade
// between the two builds to prove that a changed program is replaced in
// place while tokens are being served.
func applyVariant(spec *ebpf.CollectionSpec) {
	p := spec.Programs[attribProgRecordConnect]
	if p == nil || len(p.Instructions) == 0 {
		return
	}
	first := p.Instructions[0]
	nop := asm.Mov.Reg(asm.R1, asm.R1)
	// The entry's symbol, function and line information move to the new
	// first instruction.
	nop.Metadata = first.Metadata
	first.Metadata = asm.Metadata{}
	p.Instructions = append(asm.Instructions{nop, first}, p.Instructions[1:]...)
}
