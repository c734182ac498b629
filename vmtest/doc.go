// Package vmtest runs the project's kernel tests inside QEMU on other
// kernels than the host's, so that the eBPF programs are proven on the oldest
// kernels users run.
package vmtest
