# Run as root: the tests load eBPF programs and create cgroups and network
# namespaces (inside namespaces they make themselves; see README.md).
GO ?= go

.PHONY: test demo build generate deps

# The whole test suite, with the race detector. This is what CI runs.
test: deps
	$(GO) test -race -count=1 -timeout 30m ./...

# The original bug's repro, end to end, in a closed network world.
demo: build
	./bin/identityd demo

build:
	$(GO) build -o bin/ ./cmd/...

# Regenerates the committed bpf2go output (needs clang, llvm, libbpf-dev).
generate:
	$(GO) generate ./bpf/...

# Debian packages the suite needs at run time, installed when missing.
deps:
	@./scripts/install-deps.sh
