# Run as root: the tests load eBPF programs and create cgroups and network
# namespaces (inside namespaces they make themselves; see README.md).
GO ?= go

.PHONY: test demo generate deps

# The whole test suite, with the race detector. This is what CI runs.
test: deps
	$(GO) test -race -count=1 -timeout 30m ./...

demo: deps
	$(GO) test -count=1 -v -run 'TestAttributesSandboxConnection|TestConcurrentSandboxesNeverMisattributed' ./bpf/

# Regenerates the committed bpf2go output (needs clang, llvm, libbpf-dev).
generate:
	$(GO) generate ./bpf/...

# Debian packages the suite needs at run time, installed when missing.
deps:
	@./scripts/install-deps.sh
