package tokenserver

import (
	"context"
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
	"log/slog"
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

// DefaultPublishDelay is how long a new key is published before it signs:
// the lifetime of a verifier's cached copy of the JWKS (our responses say
// Cache-Control: max-age=60), so that a verifier that refetches the JWKS on
// an unknown kid always finds it.
const DefaultPublishDelay = 60 * time.Second

// Keys holds the signing keys, persisted one file per key (0600 in a 0700
// directory). A new key is published at once and signs from its SignsFrom
// time on (after the publish delay); the key it replaces signs until then,
// and both stay published until every token they signed has expired.
type Keys struct {
	dir     string
	alg     jose.SignatureAlgorithm
	delay   time.Duration
	publish func(context.Context, jose.JSONWebKey) error
	now     func() time.Time
	// firstWaits: a first key waits the publish delay too (KeysConfig).
	firstWaits bool

	mu   sync.RWMutex
	keys []*signingKey // oldest first
}

type signingKey struct {
	Created time.Time `json:"created"`
	// SignsFrom is when the key starts signing; Created if absent (keys
	// written before keys were published ahead of use).
	SignsFrom *time.Time `json:"signs_from,omitempty"`
	// Retired is when the key stops signing: when a newer key starts, which
	// may be in the future while that key is being published.
	Retired *time.Time      `json:"retired,omitempty"`
	Key     jose.JSONWebKey `json:"key"`
	file    string
	signer  jose.Signer
}

func (sk *signingKey) signsFrom() time.Time {
	if sk.SignsFrom != nil {
		return *sk.SignsFrom
	}
	return sk.Created
}

// signsAt reports whether sk is the key that signs at t (given that no
// newer key signs at t).
func (sk *signingKey) signsAt(t time.Time) bool {
	return !sk.signsFrom().After(t) && (sk.Retired == nil || sk.Retired.After(t))
}

// expired reports whether every token sk can have signed has expired at t.
func (sk *signingKey) expired(t time.Time) bool {
	return sk.Retired != nil && t.After(sk.Retired.Add(MaxTTL+clockSkew))
}

// KeysConfig configures [LoadKeys].
type KeysConfig struct {
	// Dir holds the key files (0700, created if missing).
	Dir string
	// Alg is the signing algorithm: RS256, ES256 or EdDSA.
	Alg string
	// PublishDelay is how long [Keys.Rotate] publishes a new key before it
	// signs (see DefaultPublishDelay); 0 makes it sign at once.
	PublishDelay time.Duration
	// FirstKeyWaits makes a first key, made when there is none, wait the
	// publish delay too. A single host has no verifier that could hold a
	// JWKS without it; a fleet node's verifiers hold the other nodes'.
	FirstKeyWaits bool
	// Publish, if set, is called with the public half of every new key
	// before the key is used at all: a key whose Publish fails is dropped
	// and the rotation (or the start) fails with its error. A fleet's
	// shared store hooks in here, so that the publish delay runs from the
	// moment every node can serve the key.
	Publish func(ctx context.Context, key jose.JSONWebKey) error
	Now     func() time.Time
}

// OpenKeys loads the keys in dir with no publish delay; see [LoadKeys].
func OpenKeys(dir, alg string, now func() time.Time) (*Keys, error) {
	return LoadKeys(context.Background(), KeysConfig{Dir: dir, Alg: alg, Now: now})
}

// LoadKeys loads the keys in cfg.Dir, creating a first one (signing at
// once) if there is none, or a new one with cfg.Alg (published for the
// publish delay before it signs) if the configured algorithm changed. Key
// files that others can read are refused.
func LoadKeys(ctx context.Context, cfg KeysConfig) (*Keys, error) {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	switch cfg.Alg {
	case RS256, ES256, EdDSA:
	default:
		return nil, fmt.Errorf("unsupported signing algorithm %q (want %s, %s or %s)", cfg.Alg, RS256, ES256, EdDSA)
	}
	if cfg.PublishDelay < 0 {
		return nil, fmt.Errorf("negative key publish delay %s", cfg.PublishDelay)
	}
	if err := atomicfile.MkdirPrivate(cfg.Dir); err != nil {
		return nil, fmt.Errorf("open signing keys: %w", err)
	}
	if err := atomicfile.RemoveTemps(cfg.Dir); err != nil {
		return nil, fmt.Errorf("open signing keys: %w", err)
	}
	k := &Keys{dir: cfg.Dir, alg: jose.SignatureAlgorithm(cfg.Alg), delay: cfg.PublishDelay, publish: cfg.Publish, now: cfg.Now,
		firstWaits: cfg.FirstKeyWaits}
	if err := k.load(); err != nil {
		return nil, err
	}
	k.mu.Lock()
	err := k.pruneLocked()
	n := len(k.keys)
	// A last key that waits to sign (a first key's publication, cut short
	// by a restart) is not replaced: it signs when its time comes.
	waiting := n > 0 && k.keys[n-1].Retired == nil && k.keys[n-1].signsFrom().After(k.now())
	need := n == 0 || k.keys[n-1].Retired != nil || k.keys[n-1].Key.Algorithm != cfg.Alg || (k.signerLocked(k.now()) == nil && !waiting)
	k.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if need {
		if err := k.rotate(ctx, false); err != nil {
			return nil, err
		}
	}
	return k, nil
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
		if sk.signer, err = newSigner(sk.Key); err != nil {
			return fmt.Errorf("signing key %s: %w", p, err)
		}
		k.keys = append(k.keys, &sk)
	}
	slices.SortFunc(k.keys, func(a, b *signingKey) int { return a.Created.Compare(b.Created) })
	return nil
}

// signerLocked is the key that signs at t: the newest one whose time has
// come and that is not retired; nil if there is none.
func (k *Keys) signerLocked(t time.Time) *signingKey {
	for i := len(k.keys) - 1; i >= 0; i-- {
		if sk := k.keys[i]; !sk.signsFrom().After(t) {
			if sk.signsAt(t) {
				return sk
			}
			return nil
		}
	}
	return nil
}

// Rotate makes a new key: published at once, signing after the publish
// delay, while the current key signs until then. Every key it replaces
// stays published until every token it signed has expired.
func (k *Keys) Rotate(ctx context.Context) error { return k.rotate(ctx, false) }

// RotateNow makes a new key that signs at once: the emergency rotation, for
// a key believed compromised. A verifier whose cached JWKS predates the new
// key must refetch it to verify the new tokens (go-oidc does so on an
// unknown kid; a verifier that does not rejects them until its cache
// expires).
func (k *Keys) RotateNow(ctx context.Context) error { return k.rotate(ctx, true) }

// rotate makes a new key, has it published (Publish), then adds it. The
// slow parts, generating and publishing, hold no lock: Sign goes on.
func (k *Keys) rotate(ctx context.Context, now bool) error {
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
	if k.publish != nil {
		if err := k.publish(ctx, jwk.Public()); err != nil {
			return fmt.Errorf("publish signing key %s: %w", jwk.KeyID, err)
		}
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.addLocked(jwk, now); err != nil {
		return err
	}
	return k.pruneLocked()
}

// addLocked adds a new key that signs after the publish delay, or at once
// if now is set or no key signs now (nothing else could sign).
func (k *Keys) addLocked(jwk jose.JSONWebKey, now bool) error {
	t := k.now().UTC()
	created := t
	if n := len(k.keys); n > 0 && !created.After(k.keys[n-1].Created) {
		// Creation orders the keys on disk: keep it strict, whatever the
		// clock's resolution (or a clock set back).
		created = k.keys[n-1].Created.Add(time.Nanosecond)
	}
	from := t
	if !now && (k.signerLocked(t) != nil || k.firstWaits) {
		from = t.Add(k.delay)
	}
	sk := &signingKey{Created: created, SignsFrom: &from, Key: jwk, file: filepath.Join(k.dir, jwk.KeyID+keyFileExt)}
	var err error
	if sk.signer, err = newSigner(jwk); err != nil {
		return err
	}
	// The new key is durable before the older ones are told when they stop
	// signing, so a crash in between leaves keys that LoadKeys retires when
	// the new one starts, never no key.
	if err := k.write(sk); err != nil {
		return err
	}
	k.keys = append(k.keys, sk)
	var errs []error
	for _, old := range k.keys[:len(k.keys)-1] {
		if old.Retired == nil || old.Retired.After(from) {
			old.Retired = &from
			errs = append(errs, k.write(old))
		}
	}
	return errors.Join(errs...)
}

func newSigner(jwk jose.JSONWebKey) (jose.Signer, error) {
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.SignatureAlgorithm(jwk.Algorithm), Key: jwk},
		(&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return nil, fmt.Errorf("signer for key %s: %w", jwk.KeyID, err)
	}
	return signer, nil
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

// pruneLocked deletes retired keys whose every token has expired. A key
// that a newer one replaces but that was not told so (a crash during
// rotation) is retired when the newer one starts signing.
func (k *Keys) pruneLocked() error {
	now := k.now()
	var errs []error
	var next *time.Time // the earliest start of a newer key
	for i := len(k.keys) - 1; i >= 0; i-- {
		sk := k.keys[i]
		if next != nil && (sk.Retired == nil || sk.Retired.After(*next)) {
			t := *next
			sk.Retired = &t
			errs = append(errs, k.write(sk))
		}
		if from := sk.signsFrom(); next == nil || from.Before(*next) {
			next = &from
		}
	}
	var keep []*signingKey
	for _, sk := range k.keys {
		if sk.expired(now) {
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

// Sign serializes claims as a compact JWS signed by the key that signs now,
// with kid and typ in the header.
func (k *Keys) Sign(claims any) (string, error) {
	payload, err := json.Marshal(claims)
	if err != nil {
		return "", fmt.Errorf("encode claims: %w", err)
	}
	k.mu.RLock()
	sk := k.signerLocked(k.now())
	k.mu.RUnlock()
	if sk == nil {
		return "", errors.New("sign token: no signing key signs now")
	}
	jws, err := sk.signer.Sign(payload)
	if err != nil {
		return "", fmt.Errorf("sign token: %w", err)
	}
	return jws.CompactSerialize()
}

// SigningKeyID is the kid of the key that signs now; empty if none does.
// A token cache compares it with the kid of the tokens it holds.
func (k *Keys) SigningKeyID() string {
	k.mu.RLock()
	defer k.mu.RUnlock()
	if sk := k.signerLocked(k.now()); sk != nil {
		return sk.Key.KeyID
	}
	return ""
}

// farFuture is what [Keys.SignableUntil] answers: a key of this host stays
// published as long as the daemon that serves it runs.
var farFuture = time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC)

// SignableUntil is how long the key that signs now is guaranteed to stay
// published: for keys served by this host alone, for ever (a retired key
// stays published until its tokens expire).
func (k *Keys) SignableUntil() time.Time { return farFuture }

// JWKS returns the public keys relying parties should accept: the key that
// signs, the next one (published ahead of signing), and every retired one
// that may still have unexpired tokens.
func (k *Keys) JWKS() jose.JSONWebKeySet {
	k.mu.RLock()
	defer k.mu.RUnlock()
	now := k.now()
	var set jose.JSONWebKeySet
	for _, sk := range k.keys {
		if !sk.expired(now) {
			set.Keys = append(set.Keys, sk.Key.Public())
		}
	}
	return set
}

// Key states in [KeyStatus].
const (
	KeySigning = "signing"
	KeyNext    = "next"
	KeyRetired = "retired"
)

// KeyStatus describes one published key, for operators.
type KeyStatus struct {
	KeyID     string     `json:"kid"`
	Algorithm string     `json:"alg"`
	State     string     `json:"state"` // signing, next or retired
	Created   time.Time  `json:"created"`
	SignsFrom time.Time  `json:"signs_from"`
	Retired   *time.Time `json:"retired,omitempty"`
}

// Status lists the published keys, oldest first.
func (k *Keys) Status() []KeyStatus {
	var out []KeyStatus
	for _, p := range k.Published() {
		out = append(out, p.KeyStatus)
	}
	return out
}

// PublishedKey is a published key's public half and schedule, as a
// fleet's shared store holds it.
type PublishedKey struct {
	KeyStatus
	Public jose.JSONWebKey
}

// Published lists the published keys with their public halves, oldest
// first: what a fleet node puts in the shared store when it starts.
func (k *Keys) Published() []PublishedKey {
	k.mu.RLock()
	defer k.mu.RUnlock()
	now := k.now()
	var out []PublishedKey
	for _, sk := range k.keys {
		if sk.expired(now) {
			continue
		}
		st := KeyStatus{KeyID: sk.Key.KeyID, Algorithm: sk.Key.Algorithm, State: KeyRetired,
			Created: sk.Created, SignsFrom: sk.signsFrom(), Retired: sk.Retired}
		switch {
		case sk.signsFrom().After(now) && (sk.Retired == nil || sk.Retired.After(sk.signsFrom())):
			st.State = KeyNext
		case sk.signsAt(now):
			st.State = KeySigning
		}
		out = append(out, PublishedKey{KeyStatus: st, Public: sk.Key.Public()})
	}
	return out
}

// NextRotation is when the newest key is period old, which is when
// [Keys.RotateEvery] replaces it. It counts from the key's creation time on
// disk, so a restart does not reset the period.
func (k *Keys) NextRotation(period time.Duration) time.Time {
	k.mu.RLock()
	defer k.mu.RUnlock()
	if len(k.keys) == 0 {
		return k.now()
	}
	return k.keys[len(k.keys)-1].Created.Add(period)
}

// rotationRetry is how long RotateEvery waits after a failed rotation (a
// full disk, say) before it tries again; the current key signs meanwhile.
const rotationRetry = time.Minute

// RotateEvery rotates the key (as [Keys.Rotate]) whenever the newest one is
// period old, until ctx ends; at once if it already is (a daemon stopped
// past the due time). It also deletes the files of keys whose tokens have
// all expired. A failed rotation is logged and retried; it never stops
// the keys from signing.
func (k *Keys) RotateEvery(ctx context.Context, period time.Duration, log *slog.Logger) {
	if period <= 0 {
		return
	}
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		due := k.NextRotation(period)
		wait := due.Sub(k.now())
		if wait <= 0 {
			wait = period
			if err := k.Rotate(ctx); err != nil {
				log.Error("rotate signing key", "error", err, "retry_in", rotationRetry)
				wait = min(rotationRetry, period)
			} else {
				log.Info("signing key rotated on schedule", "period", period, "keys", k.Status())
			}
		} else {
			log.Debug("signing key rotation scheduled", "at", due.UTC())
			k.mu.Lock()
			if err := k.pruneLocked(); err != nil {
				log.Error("delete expired signing keys", "error", err)
			}
			k.mu.Unlock()
		}
		// Wake at least hourly: the wall clock may jump, timers do not.
		timer.Reset(min(wait, time.Hour))
	}
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
