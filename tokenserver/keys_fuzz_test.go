package tokenserver

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzKeyFile throws arbitrary bytes at the signing-key loader: it never
// panics, and whatever it accepts signs tokens and publishes only public
// keys.
func FuzzKeyFile(f *testing.F) {
	seedDir := filepath.Join(f.TempDir(), "seed")
	if _, err := OpenKeys(seedDir, EdDSA, nil); err != nil {
		f.Fatal(err)
	}
	files, _ := filepath.Glob(filepath.Join(seedDir, "*"+keyFileExt))
	for _, p := range files {
		b, _ := os.ReadFile(p)
		f.Add(b)
	}
	f.Add([]byte(`{"created":"2026-01-01T00:00:00Z","key":{"kty":"OKP","crv":"Ed25519","x":"AAAA"}}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"key":{"kty":"RSA","n":"AQAB","e":"AQAB","d":"AQAB"}}`))
	n := 0
	f.Fuzz(func(t *testing.T, body []byte) {
		n++
		dir := filepath.Join(t.TempDir(), "keys")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "k"+keyFileExt), body, 0o600); err != nil {
			t.Fatal(err)
		}
		k, err := OpenKeys(dir, EdDSA, nil)
		if err != nil {
			return
		}
		if _, err := k.Sign(Claims{Subject: "s"}); err != nil {
			t.Fatalf("loaded keys cannot sign: %v", err)
		}
		for _, key := range k.JWKS().Keys {
			if !key.IsPublic() {
				t.Fatal("a private key is published")
			}
			if strings.Contains(string(must(key.MarshalJSON())), `"d"`) {
				t.Fatal("private material in the JWKS")
			}
		}
	})
}

func must(b []byte, _ error) []byte { return b }
