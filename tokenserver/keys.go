package tokenserver

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/identityd/identityd/internal/atomicfile"
)

// Supported signing algorithms; RS256 is the default for drop-in
// compatibility.
const (
	RS256 = string(jose.RS256)
	ES256 = string(jose.ES256)
	EdDSA = string(jose.EdDSA)
)

// MaxTTL is the longest lifetime a token can be issued with. A retired key
// stays published this long after its retirement (plus clock skew), so every
// token it signed can still be verified until it expires.
const (
	MaxTTL     = 86400 * time.Second
	clockSkew  = 5 * time.Minute
	keyFileExt = ".jwk.json"
)

// Keys holds the signing keys, persisted one file per key (0600 in a 0700
// directory). The newest unretired key signs; retired keys stay in the
// published set until every token they signed has expired.
type Keys struct {
	dir string
	alg jose.SignatureAlgorithm
	now func() time.Time

	mu     sync.RWMutex
	keys   []*signingKey // oldest first; the last one signs
	signer jose.Signer
}

type signingKey struct {
	Created time.Time       `json:"created"`
	Retired *time.Time      `json:"retired,omitempty"`
	Key     jose.JSONWebKey `json:"key"`
	file    string
}

// OpenKeys loads the keys in dir, creating a first one (or a new one, if the
// configured algorithm changed) with alg. Key files that others can read are
// refused.
func OpenKeys(dir, alg string, now func() time.Time) (*Keys, error) {
	if now == nil {
		now = time.Now
	}
	switch alg {
	case RS256, ES256, EdDSA:
	default:
		return nil, fmt.Errorf("unsupported signing algorithm %q (want %s, %s or %s)", alg, RS256, ES256, EdDSA)
	}
	if err := atomicfile.MkdirPrivate(dir); err != nil {
		return nil, fmt.Errorf("open signing keys: %w", err)
	}
	if err := atomicfile.RemoveTemps(dir); err != nil {
		return nil, fmt.Errorf("open signing keys: %w", err)
	}
	k := &Keys{dir: dir, alg: jose.SignatureAlgorithm(alg), now: now}
	if err := k.load(); err != nil {
		return nil, err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if cur := k.current(); cur == nil || cur.Key.Algorithm != alg {
		if err := k.rotateLocked(); err != nil {
			return nil, err
		}
	} else if err := k.useLocked(cur); err != nil {
		return nil, err
	}
	return k, k.pruneLocked()
}

func (k *Keys) load() error {
	entries, err := os.ReadDir(k.dir)
	if err != nil {
		return fmt.Errorf("read signing keys: %w", err)
	}
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), keyFileExt) {
			continue
		}
		p := filepath.Join(k.dir, e.Name())
		st, err := os.Stat(p)
		if err != nil {
			return fmt.Errorf("read signing key: %w", err)
		}
		if st.Mode().Perm()&0o077 != 0 {
			return fmt.Errorf("signing key %s has mode %o: group or others can read it (want 0600)", p, st.Mode().Perm())
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return fmt.Errorf("read signing key: %w", err)
		}
		var sk signingKey
		if err := json.Unmarshal(b, &sk); err != nil {
			return fmt.Errorf("signing key %s is corrupt: %w", p, err)
		}
		if sk.Key.IsPublic() || !sk.Key.Valid() {
			return fmt.Errorf("signing key %s holds no valid private key", p)
		}
		sk.file = p
		k.keys = append(k.keys, &sk)
	}
	slices.SortFunc(k.keys, func(a, b *signingKey) int { return a.Created.Compare(b.Created) })
	return nil
}

// current is the newest unretired key, or nil.
func (k *Keys) current() *signingKey {
	if n := len(k.keys); n > 0 && k.keys[n-1].Retired == nil {
		return k.keys[n-1]
	}
	return nil
}

// Rotate makes a new key sign from now on. The previous key is retired but
// stays published until every token it signed has expired.
func (k *Keys) Rotate() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.rotateLocked(); err != nil {
		return err
	}
	return k.pruneLocked()
}

func (k *Keys) rotateLocked() error {
	priv, err := generate(k.alg)
	if err != nil {
		return fmt.Errorf("generate %s signing key: %w", k.alg, err)
	}
	jwk := jose.JSONWebKey{Key: priv, Algorithm: string(k.alg), Use: "sig"}
	tp, err := jwk.Thumbprint(crypto.SHA256)
	if err != nil {
		return fmt.Errorf("thumbprint signing key: %w", err)
	}
	// RFC 7638 thumbprint as the key id: stable, and derived from the key.
	jwk.KeyID = base64.RawURLEncoding.EncodeToString(tp)
	now := k.now().UTC()
	sk := &signingKey{Created: now, Key: jwk, file: filepath.Join(k.dir, jwk.KeyID+keyFileExt)}
	// The new key is durable before the old one is marked retired, so a
	// crash in between leaves two active keys (the newest signs), never none.
	if err := k.write(sk); err != nil {
		return err
	}
	if old := k.current(); old != nil {
		old.Retired = &now
		if err := k.write(old); err != nil {
			return err
		}
	}
	k.keys = append(k.keys, sk)
	return k.useLocked(sk)
}

func (k *Keys) useLocked(sk *signingKey) error {
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.SignatureAlgorithm(sk.Key.Algorithm), Key: sk.Key},
		(&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return fmt.Errorf("signer for key %s: %w", sk.Key.KeyID, err)
	}
	k.signer = signer
	return nil
}

func (k *Keys) write(sk *signingKey) error {
	b, err := json.Marshal(sk)
	if err != nil {
		return fmt.Errorf("encode signing key: %w", err)
	}
	if err := atomicfile.WriteFile(sk.file, b, 0o600); err != nil {
		return fmt.Errorf("persist signing key: %w", err)
	}
	return nil
}

// pruneLocked deletes retired keys whose every token has expired. Older
// unretired keys (left by a crash during rotation) are retired now.
func (k *Keys) pruneLocked() error {
	now := k.now()
	var keep []*signingKey
	var errs []error
	for i, sk := range k.keys {
		if sk.Retired == nil && i != len(k.keys)-1 {
			t := now.UTC()
			sk.Retired = &t
			errs = append(errs, k.write(sk))
		}
		if sk.Retired != nil && now.After(sk.Retired.Add(MaxTTL+clockSkew)) {
			if err := atomicfile.Remove(sk.file); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, fmt.Errorf("remove expired signing key: %w", err))
				keep = append(keep, sk)
			}
			continue
		}
		keep = append(keep, sk)
	}
	k.keys = keep
	return errors.Join(errs...)
}

// Sign serializes claims as a compact JWS signed by the current key, with
// kid and typ in the header.
func (k *Keys) Sign(claims any) (string, error) {
	payload, err := json.Marshal(claims)
	if err != nil {
		return "", fmt.Errorf("encode claims: %w", err)
	}
	k.mu.RLock()
	signer := k.signer
	k.mu.RUnlock()
	jws, err := signer.Sign(payload)
	if err != nil {
		return "", fmt.Errorf("sign token: %w", err)
	}
	return jws.CompactSerialize()
}

// JWKS returns the public keys relying parties should accept: the current
// one and every retired one that may still have unexpired tokens.
func (k *Keys) JWKS() jose.JSONWebKeySet {
	k.mu.RLock()
	defer k.mu.RUnlock()
	now := k.now()
	var set jose.JSONWebKeySet
	for _, sk := range k.keys {
		if sk.Retired != nil && now.After(sk.Retired.Add(MaxTTL+clockSkew)) {
			continue
		}
		set.Keys = append(set.Keys, sk.Key.Public())
	}
	return set
}

// Algorithms lists the algorithms of the published keys.
func (k *Keys) Algorithms() []string {
	var algs []string
	for _, key := range k.JWKS().Keys {
		if !slices.Contains(algs, key.Algorithm) {
			algs = append(algs, key.Algorithm)
		}
	}
	return algs
}

func generate(alg jose.SignatureAlgorithm) (crypto.Signer, error) {
	switch alg {
	case jose.RS256:
		return rsa.GenerateKey(rand.Reader, 2048)
	case jose.ES256:
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case jose.EdDSA:
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		return priv, err
	}
	return nil, fmt.Errorf("unsupported algorithm %s", alg)
}
