// Package tokenserver serves the token endpoint sandboxes call
// (GET /v1/token) and issues their JWTs. It decides who is calling from the
// kernel's attribution record for the accepted connection (package bpf), and
// checks the bearer secret against the copy persisted on disk.
package tokenserver
