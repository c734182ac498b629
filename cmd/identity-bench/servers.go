package main

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/identityd/identityd/bpf"
	"github.com/identityd/identityd/internal/registry"
	"github.com/identityd/identityd/tokenserver"
)

// Ports of the in-process servers, on identityd's router address in the
// world's host netns (identityd's token endpoint has 7123).
const (
	baselinePort = 7124
	barePort     = 7125
)

// bySource is the baseline's "attestation": the caller is whoever holds
// the connection's source address, as the runtime identityd replaces
// decides it. Sandboxes are numbered; the number stands in for the cgroup
// id and netns cookie of a record. The lock is for --grow-to, which adds
// and drops sandboxes while the baseline serves (identityd's registry has
// its own).
type bySource struct {
	mu    sync.RWMutex
	next  uint64
	index map[netip.Addr]uint64
	sbs   map[uint64]registry.Sandbox
	// secrets by sandbox id, in memory.
	secrets map[string]string
}

func newBySource() *bySource {
	return &bySource{index: map[netip.Addr]uint64{}, sbs: map[uint64]registry.Sandbox{}, secrets: map[string]string{}}
}

// add makes the baseline know sbs by their addresses.
func (b *bySource) add(sbs []serverSandbox) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, sb := range sbs {
		b.next++
		b.index[sb.Addr] = b.next
		b.sbs[b.next] = registry.Sandbox{ID: sb.ID, App: sb.App, Org: sb.Org}
		b.secrets[sb.ID] = sb.Secret
	}
}

// drop forgets the sandboxes with these ids.
func (b *bySource) drop(ids []string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	gone := map[string]bool{}
	for _, id := range ids {
		gone[id] = true
		delete(b.secrets, id)
	}
	for addr, n := range b.index {
		if gone[b.sbs[n].ID] {
			delete(b.index, addr)
			delete(b.sbs, n)
		}
	}
}

func (b *bySource) Lookup(c syscall.Conn) (bpf.Record, error) {
	nc, ok := c.(net.Conn)
	if !ok {
		return bpf.Record{}, bpf.ErrNoRecord
	}
	ap, err := netip.ParseAddrPort(nc.RemoteAddr().String())
	if err != nil {
		return bpf.Record{}, bpf.ErrNoRecord
	}
	b.mu.RLock()
	n, ok := b.index[ap.Addr().Unmap()]
	b.mu.RUnlock()
	if !ok {
		return bpf.Record{}, bpf.ErrNoRecord
	}
	return bpf.Record{CgroupID: n, NetnsCookie: n}, nil
}

func (b *bySource) Resolve(cgroupID, _ uint64) (registry.Sandbox, error) {
	b.mu.RLock()
	sb, ok := b.sbs[cgroupID]
	b.mu.RUnlock()
	if !ok {
		return registry.Sandbox{}, errors.New("no such sandbox")
	}
	return sb, nil
}

func (b *bySource) Verify(id, bearer string) (bool, error) {
	b.mu.RLock()
	s, ok := b.secrets[id]
	b.mu.RUnlock()
	if !ok {
		return false, nil
	}
	return subtle.ConstantTimeCompare([]byte(s), []byte(bearer)) == 1, nil
}

// servers are the servers of modes 2 and 3, run by the server process.
type servers struct {
	baseline, bare *http.Server
	known          *bySource
	wg             sync.WaitGroup
	logf           *os.File
	tokenLen       int
}

// startServers serves the baseline and the bare handler on identityd's
// router address, with keys of spec.Alg in spec.Dir; the calling process is
// in the world's host netns.
func startServers(spec serversSpec) (*servers, error) {
	router, dir, alg := spec.Router, spec.Dir, spec.Alg
	keys, err := tokenserver.OpenKeys(filepath.Join(dir, "baseline-keys-"+alg), alg, nil)
	if err != nil {
		return nil, fmt.Errorf("baseline keys: %w", err)
	}
	src := newBySource()
	src.add(spec.Sandboxes)
	s := &servers{known: src}
	// The baseline logs its audit lines as identityd does, to a file.
	if s.logf, err = os.OpenFile(filepath.Join(dir, "baseline.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600); err != nil {
		return nil, err
	}
	ts, err := tokenserver.New(tokenserver.Config{
		Issuer: "http://" + netip.AddrPortFrom(router, baselinePort).String(), Attester: src, Registry: src, Secrets: src, Keys: keys,
		RateLimit: 1e6, Burst: 1e6, Node: "bench",
		Conns:  tokenserver.ConnLimits{Total: 1 << 20, PerSandbox: 1 << 20, Others: 256},
		Logger: slog.New(slog.NewJSONHandler(s.logf, nil)),
	})
	if err != nil {
		return nil, err
	}
	// A real token of this algorithm, for the size of the bare body.
	tok, err := keys.Sign(tokenserver.Claims{Issuer: "http://" + router.String() + ":7123", Subject: "org:bench:app:bench:sandbox:b00000",
		Audience: []string{audience}, IssuedAt: 1, NotBefore: 1, Expiry: 3601, ID: "00000000-0000-0000-0000-000000000000",
		App: "bench", SandboxID: "b00000", OrganizationID: "bench", IdentityType: "sandbox"})
	if err != nil {
		return nil, err
	}
	s.tokenLen = len(tok)
	body := []byte(`{"value":"` + strings.Repeat("x", len(tok)) + `"}` + "\n")

	bl, err := net.Listen("tcp", netip.AddrPortFrom(router, baselinePort).String())
	if err != nil {
		return nil, fmt.Errorf("baseline listener: %w", err)
	}
	bareLn, err := net.Listen("tcp", netip.AddrPortFrom(router, barePort).String())
	if err != nil {
		bl.Close()
		return nil, fmt.Errorf("bare listener: %w", err)
	}
	s.baseline = ts.HTTPServer()
	// The same server settings as the token endpoint's, with a handler that
	// only answers.
	s.bare = ts.HTTPServer()
	s.bare.ConnContext = nil
	s.bare.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(body)
	})
	s.wg.Go(func() { s.baseline.Serve(ts.Listener(bl)) })
	s.wg.Go(func() { s.bare.Serve(bareLn) })
	return s, nil
}

func (s *servers) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	s.baseline.Shutdown(ctx)
	s.bare.Shutdown(ctx)
	s.baseline.Close()
	s.bare.Close()
	s.wg.Wait()
	s.logf.Close()
}

// targetURL is where a sandbox asks target.
func targetURL(target string, router netip.Addr, sb *benchSandbox) string {
	switch target {
	case "baseline":
		return "http://" + netip.AddrPortFrom(router, baselinePort).String() + "/v1/token"
	case "http":
		return "http://" + netip.AddrPortFrom(router, barePort).String() + "/v1/token"
	}
	return sb.url
}
