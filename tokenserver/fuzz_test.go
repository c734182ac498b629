package tokenserver

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/identityd/identityd/bpf"
	"github.com/identityd/identityd/internal/registry"
)

// Fakes for the fuzz target, which exercises the HTTP layer alone; the
// kernel path is covered by the tests over real connections.
type fakeAttester struct{ ok bool }

func (f fakeAttester) Lookup(syscall.Conn) (bpf.Record, error) {
	if !f.ok {
		return bpf.Record{}, bpf.ErrNoRecord
	}
	return bpf.Record{CgroupID: 10, NetnsCookie: 20}, nil
}

type fakeRegistry struct{}

func (fakeRegistry) Resolve(cg, _ uint64) (registry.Sandbox, error) {
	if cg != 10 {
		return registry.Sandbox{}, registry.ErrUnknownCaller
	}
	return registry.Sandbox{ID: "sb-a", App: "web"}, nil
}

const fuzzSecret = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

type fakeSecrets struct{}

func (fakeSecrets) Verify(id, bearer string) (bool, error) {
	if id != "sb-a" {
		return false, errors.New("unexpected sandbox")
	}
	return bearer == fuzzSecret, nil
}

type fakeConn struct{ net.Conn }

func (fakeConn) LocalAddr() net.Addr  { return &net.TCPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 7123} }
func (fakeConn) RemoteAddr() net.Addr { return &net.TCPAddr{IP: net.IPv4(10, 0, 0, 2), Port: 40000} }

// SyscallConn makes fakeConn look like a socket; fakeAttester never uses it.
func (fakeConn) SyscallConn() (syscall.RawConn, error) { return nil, nil }

// FuzzTokenRequest throws arbitrary methods, targets and Authorization
// headers at the handler. Whatever comes in, the answer is JSON with one of
// the contract's statuses, and a token is issued only to an attested caller
// with the right secret asking GET /v1/token.
func FuzzTokenRequest(f *testing.F) {
	for _, seed := range []struct {
		method, target, auth string
		attested             bool
	}{
		{"GET", "/v1/token", "Bearer " + fuzzSecret, true},
		{"GET", "/v1/token?audience=a&audience=b&ttl=120", "Bearer " + fuzzSecret, true},
		{"GET", "/v1/token?ttl=-1", "Bearer " + fuzzSecret, true},
		{"GET", "/v1/token?ttl=99999999999999999999", "Bearer " + fuzzSecret, true},
		{"POST", "/v1/token", "Bearer x", true},
		{"GET", "/v1/token", "bearer " + fuzzSecret, true},
		{"GET", "/v1/token", "Bearer " + fuzzSecret, false},
		{"GET", "/.well-known/openid-configuration", "", false},
		{"GET", "/.well-known/miren/jwks", "", false},
		{"GET", "/v1/token/../token", "Bearer " + fuzzSecret, true},
		{"GET", "/v1/token?ttl=%00", "Bearer " + fuzzSecret, true},
	} {
		f.Add(seed.method, seed.target, seed.auth, seed.attested)
	}
	keys, err := OpenKeys(filepath.Join(f.TempDir(), "keys"), EdDSA, nil)
	if err != nil {
		f.Fatal(err)
	}
	servers := map[bool]*Server{}
	for _, attested := range []bool{true, false} {
		servers[attested], err = New(Config{Issuer: "http://issuer.test", Attester: fakeAttester{attested},
			Registry: fakeRegistry{}, Secrets: fakeSecrets{}, Keys: keys, Logger: quiet, Burst: 1 << 30, RateLimit: 1 << 30})
		if err != nil {
			f.Fatal(err)
		}
	}
	allowed := map[int]bool{200: true, 400: true, 401: true, 403: true, 404: true, 405: true, 429: true}

	f.Fuzz(func(t *testing.T, method, target, auth string, attested bool) {
		req, err := http.NewRequest(method, "http://issuer.test"+target, nil)
		if err != nil {
			return // net/http would not have parsed it either
		}
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		srv := servers[attested]
		req = req.WithContext(srv.ConnContext(context.Background(), fakeConn{}))
		rec := httptest.NewRecorder()
		srv.Handler().ServeHTTP(rec, req)

		if !allowed[rec.Code] {
			t.Fatalf("status %d is not in the contract", rec.Code)
		}
		if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
			t.Fatalf("Content-Type %q", ct)
		}
		var body map[string]any
		if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
			t.Fatalf("body is not JSON: %q", rec.Body.String())
		}
		_, isToken := body["value"]
		if isToken {
			if req.URL.Path != "/v1/token" || req.Method != "GET" || !attested ||
				!strings.HasPrefix(auth, "Bearer ") || strings.TrimPrefix(auth, "Bearer ") != fuzzSecret {
				t.Fatalf("issued a token to %s %q auth=%q attested=%v", method, target, auth, attested)
			}
		}
	})
}
