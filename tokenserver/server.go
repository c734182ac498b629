package tokenserver

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/google/uuid"
	"golang.org/x/time/rate"

	"github.com/identityd/identityd/bpf"
	"github.com/identityd/identityd/internal/registry"
	"github.com/identityd/identityd/internal/secretstore"
)

// Attester reports what the kernel recorded about the client socket of an
// accepted connection, given the server's side of it; *bpf.Installation is
// the real one.
type Attester interface {
	Lookup(c syscall.Conn) (bpf.Record, error)
}

// Registry ties an attested caller to a live sandbox; *registry.Index is
// the real one.
type Registry interface {
	Resolve(cgroupID, netnsCookie uint64) (registry.Sandbox, error)
}

// Secrets checks a bearer against the sandbox's persisted secret;
// *secretstore.Store is the real one.
type Secrets interface {
	Verify(sandboxID, bearer string) (bool, error)
}

// KeySet signs tokens and publishes the keys that verify them; *Keys is the
// real one.
type KeySet interface {
	Sign(claims any) (string, error)
	JWKS() jose.JSONWebKeySet
	Algorithms() []string
	// SignableUntil is until when the key that signs now is guaranteed to
	// stay published (in a fleet, as long as its lease in the shared store
	// is sure to last). No token is issued with an exp past it.
	SignableUntil() time.Time
}

// Defaults for Config.
const (
	DefaultTTL       = 3600 * time.Second
	MinTTL           = 60 * time.Second
	DefaultRateLimit = rate.Limit(10)
	DefaultBurst     = 20
)

// Config wires a Server to its parts.
type Config struct {
	// Issuer is the iss claim and the base of the discovery URLs.
	Issuer string
	// DefaultAudience is used when a request names none; ["miren"] if nil.
	DefaultAudience []string
	Attester        Attester
	Registry        Registry
	Secrets         Secrets
	Keys            KeySet
	// MaxTTL is the longest token lifetime served: requests asking more
	// (or a default longer than it) are clamped to it. [MaxTTL] if zero;
	// at least [MinTTL] and at most [MaxTTL]. A fleet's key lifetime is
	// derived from it, so a small one makes a dead node's keys leave soon.
	MaxTTL time.Duration
	// RateLimit and Burst bound each sandbox's requests (token bucket);
	// DefaultRateLimit and DefaultBurst if zero.
	RateLimit rate.Limit
	Burst     int
	// Conns bound the open connections, per caller and in all.
	Conns ConnLimits
	// DisableTokenCache makes every request signed anew. By default a
	// token is reused for a request of the same sandbox, secret,
	// audiences and ttl while more than half of its lifetime remains and
	// its key still signs (so its jti repeats within that window); the
	// KeySet must implement CurrentKey for that.
	DisableTokenCache bool
	// TokenCacheBytes bounds the token cache; DefaultTokenCacheBytes if
	// zero.
	TokenCacheBytes int
	// IdleTimeout closes keep-alive connections left idle;
	// DefaultIdleTimeout if zero.
	IdleTimeout time.Duration
	// Probe, if set, sees every accepted connection's attribution first; a
	// connection it claims (the daemon's own readiness probe) is closed
	// without being served or counted.
	Probe func(remote netip.AddrPort, rec bpf.Record, err error) bool
	// Node names this host in every line the server logs, so that a log
	// merged from many hosts says where a token was issued or refused;
	// os.Hostname() if empty.
	Node    string
	Logger  *slog.Logger
	Metrics *Metrics
	Now     func() time.Time
}

// Server serves the token endpoint and OIDC discovery.
type Server struct {
	cfg Config
	log *slog.Logger

	conns *connTable
	// cache is nil when off (Config.DisableTokenCache, or keys that do
	// not say which key signs now).
	cache *tokenCache

	mu        sync.Mutex
	limiters  map[string]*limiter
	lastSweep time.Time
}

type limiter struct {
	*rate.Limiter
	lastUsed time.Time
}

// New checks cfg and returns a Server.
func New(cfg Config) (*Server, error) {
	switch {
	case cfg.Issuer == "":
		return nil, errors.New("token server: no issuer URL")
	case cfg.Attester == nil || cfg.Registry == nil || cfg.Secrets == nil || cfg.Keys == nil:
		return nil, errors.New("token server: attester, registry, secrets and keys are all required")
	}
	cfg.Issuer = strings.TrimRight(cfg.Issuer, "/")
	if cfg.MaxTTL == 0 {
		cfg.MaxTTL = MaxTTL
	}
	if cfg.MaxTTL < MinTTL || cfg.MaxTTL > MaxTTL {
		return nil, fmt.Errorf("token server: max TTL %s: want %s to %s", cfg.MaxTTL, MinTTL, MaxTTL)
	}
	if cfg.DefaultAudience == nil {
		cfg.DefaultAudience = []string{"miren"}
	}
	if cfg.RateLimit == 0 {
		cfg.RateLimit = DefaultRateLimit
	}
	if cfg.Burst == 0 {
		cfg.Burst = DefaultBurst
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Node == "" {
		host, err := os.Hostname()
		if err != nil {
			return nil, fmt.Errorf("token server: host name for the log: %w", err)
		}
		cfg.Node = host
	}
	if cfg.Metrics == nil {
		cfg.Metrics, _ = NewMetrics(nil, nil)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	cfg.Conns = cfg.Conns.withDefaults()
	if cfg.TokenCacheBytes == 0 {
		cfg.TokenCacheBytes = DefaultTokenCacheBytes
	}
	if cfg.TokenCacheBytes < 0 {
		return nil, fmt.Errorf("token server: token cache size %d: want 0 (the default) or more", cfg.TokenCacheBytes)
	}
	s := &Server{
		cfg: cfg, log: cfg.Logger.With("node", cfg.Node), limiters: map[string]*limiter{},
		conns: &connTable{limits: cfg.Conns, sandbox: map[string]int{}},
	}
	if _, ok := cfg.Keys.(CurrentKey); ok && !cfg.DisableTokenCache {
		s.cache = newTokenCache(cfg.TokenCacheBytes)
	}
	return s, nil
}

// Forget drops the tokens cached for sandbox id. The daemon calls it when
// the sandbox is deleted and when its secret is rotated, once the secret
// store has the change: no token asked for before is handed out after.
// (Without it a token is still never reused across either: the cache is
// keyed by the sandbox's cgroup and netns and by the secret shown.)
func (s *Server) Forget(sandboxID string) {
	if s.cache != nil {
		s.cache.forget(sandboxID)
	}
}

// HTTPServer returns an http.Server for the token endpoint with the
// timeouts and limits a sandbox-facing server needs. Serve it on
// [Server.Listener] around any listener, including one inherited from a
// previous daemon: that is where connections are attributed and counted.
func (s *Server) HTTPServer() *http.Server {
	return &http.Server{
		Handler:           s.Handler(),
		ConnContext:       s.ConnContext,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		IdleTimeout:       s.cfg.IdleTimeout,
		MaxHeaderBytes:    8 << 10,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
}

type attestationKey struct{}

// attestation is the kernel's answer for one connection, shared by every
// request that arrives on it.
type attestation struct {
	rec bpf.Record
	err error
}

// ConnContext hands each request the kernel's answer for its connection,
// which [Server.Listener] obtained when it accepted it; keep-alive requests
// reuse it. A connection that did not come through Listener is attributed
// here.
func (s *Server) ConnContext(ctx context.Context, c net.Conn) context.Context {
	att := &attestation{}
	if cc, ok := c.(*countedConn); ok {
		att = cc.att
	} else {
		att = s.attest(c)
	}
	return context.WithValue(ctx, attestationKey{}, att)
}

// attest asks the kernel who opened the accepted connection c.
func (s *Server) attest(c net.Conn) *attestation {
	att := &attestation{}
	if sc, ok := c.(syscall.Conn); ok {
		att.rec, att.err = s.cfg.Attester.Lookup(sc)
	} else {
		att.err = fmt.Errorf("connection %s -> %s is not a socket: %w", c.RemoteAddr(), c.LocalAddr(), bpf.ErrNoRecord)
	}
	return att
}

// Handler routes the sandbox-facing paths. Paths are matched exactly: no
// redirects, no prefix matches; anything else is a JSON 404.
func (s *Server) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/token" {
			s.serveToken(w, r)
			return
		}
		s.servePublic(w, r)
	})
}

// DiscoveryHandler serves OIDC discovery and the JWKS only, for a listener
// of its own behind the issuer URL (a load balancer's backend); anything
// else, the token endpoint included, is a JSON 404.
func (s *Server) DiscoveryHandler() http.Handler { return http.HandlerFunc(s.servePublic) }

// servePublic serves what anyone may read: discovery and the JWKS.
func (s *Server) servePublic(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case "/.well-known/openid-configuration":
		s.serveDiscovery(w, r)
	case "/.well-known/miren/jwks", "/.well-known/jwks.json":
		s.serveJWKS(w, r)
	default:
		writeError(w, http.StatusNotFound, "not found")
	}
}

// Refusal reasons, as counted in metrics and logged.
const (
	reasonMethod        = "method_not_allowed"
	reasonAuthorization = "bad_authorization_header"
	reasonNoRecord      = "no_record"
	reasonUnattested    = "unattested"
	reasonUnknown       = "unknown_sandbox"
	reasonRateLimited   = "rate_limited"
	reasonBadSecret     = "bad_secret"
	reasonBadTTL        = "bad_ttl"
	reasonBadAudience   = "bad_audience"
)

// Failure reasons: a valid request the server could not serve (500), as
// counted in identityd_token_failures_total and logged.
const (
	failSecretStore    = "secret_store"
	failSign           = "sign"
	failKeyPublication = "key_publication_expiring"
)

// Messages of the contract; sandboxes' clients may match on them.
const (
	msgMethod        = "only GET is allowed"
	msgAuthorization = "missing or invalid Authorization header"
	msgUnknownSource = "unknown source address"
	msgInvalidToken  = "invalid token"
	msgBadTTL        = "ttl must be a positive integer (seconds)"
	msgBadAudience   = "audience must not be empty"
	msgIssueFailed   = "failed to issue token"
	msgRateLimited   = "rate limit exceeded"
)

func (s *Server) serveToken(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	outcome := "failed"
	defer func() { s.cfg.Metrics.observe(outcome, time.Since(start)) }()

	att, _ := r.Context().Value(attestationKey{}).(*attestation)
	if att == nil {
		att = &attestation{err: bpf.ErrNoRecord}
	}
	refuse := func(status int, msg, reason string, sandbox string, cause error) {
		outcome = "refused"
		s.cfg.Metrics.refused(reason)
		attrs := []any{"status", status, "reason", reason, "remote", r.RemoteAddr, "caller", att.rec}
		if sandbox != "" {
			attrs = append(attrs, "sandbox", sandbox)
		}
		if cause != nil {
			attrs = append(attrs, "error", cause.Error())
		}
		s.log.Warn("token request refused", attrs...)
		writeError(w, status, msg)
	}

	if r.Method != http.MethodGet {
		refuse(http.StatusMethodNotAllowed, msgMethod, reasonMethod, "", nil)
		return
	}
	bearer, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		refuse(http.StatusUnauthorized, msgAuthorization, reasonAuthorization, "", nil)
		return
	}
	if att.err != nil {
		refuse(http.StatusForbidden, msgUnknownSource, attestationReason(att.err), "", att.err)
		return
	}
	sb, err := s.cfg.Registry.Resolve(att.rec.CgroupID, att.rec.NetnsCookie)
	if err != nil {
		refuse(http.StatusForbidden, msgUnknownSource, reasonUnknown, "", err)
		return
	}
	if wait, ok := s.allow(sb.ID); !ok {
		w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(wait.Seconds()))))
		refuse(http.StatusTooManyRequests, msgRateLimited, reasonRateLimited, sb.ID, nil)
		return
	}
	gen := s.cacheGeneration()
	valid, err := s.cfg.Secrets.Verify(sb.ID, bearer)
	switch {
	case errors.Is(err, secretstore.ErrNotFound):
		refuse(http.StatusForbidden, msgInvalidToken, reasonBadSecret, sb.ID, err)
		return
	case err != nil:
		s.cfg.Metrics.failed(failSecretStore)
		s.log.Error("verify secret", "reason", failSecretStore, "sandbox", sb.ID, "caller", att.rec, "error", err)
		writeError(w, http.StatusInternalServerError, msgIssueFailed)
		return
	case !valid:
		refuse(http.StatusForbidden, msgInvalidToken, reasonBadSecret, sb.ID, nil)
		return
	}
	q := r.URL.Query()
	ttl, ok := parseTTL(q, s.cfg.MaxTTL)
	if !ok {
		refuse(http.StatusBadRequest, msgBadTTL, reasonBadTTL, sb.ID, nil)
		return
	}
	aud := q["audience"]
	if slices.Contains(aud, "") {
		refuse(http.StatusBadRequest, msgBadAudience, reasonBadAudience, sb.ID, nil)
		return
	}
	if len(aud) == 0 {
		aud = s.cfg.DefaultAudience
	}
	t, err := s.signOrReuse(sb, bearer, aud, ttl, gen)
	if err != nil {
		reason := failSign
		if errors.Is(err, errKeyPublicationExpiring) {
			reason = failKeyPublication
		}
		s.cfg.Metrics.failed(reason)
		s.log.Error("issue token", "reason", reason, "sandbox", sb.ID, "caller", att.rec, "error", err)
		writeError(w, http.StatusInternalServerError, msgIssueFailed)
		return
	}
	outcome = "issued"
	s.audit(r.Context(), r.RemoteAddr, sb.ID, t, att.rec)
	writeToken(w, t.token)
}

// issued is a token served, with what its audit line says of it.
type issued struct {
	token    string
	claims   Claims
	alg, kid string
	// cached: signed for an earlier request, and reused.
	cached bool
}

// cacheGeneration is taken before a request's secret is checked (see
// tokenCache.generation); zero without a cache.
func (s *Server) cacheGeneration() uint64 {
	if s.cache == nil {
		return 0
	}
	return s.cache.generation()
}

// signOrReuse returns a token for sb, whose secret the request proved:
// one cached for the same sandbox, secret, audiences and ttl if it may be
// reused, else a new one, which is cached unless a Forget came after gen.
func (s *Server) signOrReuse(sb registry.Sandbox, secret string, aud []string, ttl time.Duration, gen uint64) (issued, error) {
	var kid string
	if s.cache != nil {
		kid = s.cfg.Keys.(CurrentKey).SigningKeyID()
	}
	if kid == "" {
		token, c, err := s.issue(sb, aud, ttl)
		alg, signer := signedBy(token)
		return issued{token: token, claims: c, alg: alg, kid: signer}, err
	}
	key := newCacheKey(sb, secret, aud, ttl)
	now, until := s.cfg.Now().Unix(), s.cfg.Keys.SignableUntil().Unix()
	// Nothing is reused once nothing would be signed (the key's
	// publication no longer covers MinTTL): the refusal, its 500 and its
	// log line are what tell the operator, cache or not.
	if until-now >= int64(MinTTL/time.Second) {
		if t, ok := s.cache.get(key, kid, now, until); ok {
			return issued{token: t.token, claims: t.claims, alg: t.alg, kid: t.kid, cached: true}, nil
		}
	}
	token, c, err := s.issue(sb, aud, ttl)
	if err != nil {
		return issued{}, err
	}
	t := &cachedToken{key: key, token: token, claims: c}
	t.alg, t.kid = signedBy(token)
	s.cache.put(t, gen)
	return issued{token: token, claims: c, alg: t.alg, kid: t.kid}, nil
}

// TokenFor signs a token naming sb for the default audience and lifetime,
// for the token file kept in the sandbox, and logs its audit line (remote
// "token-file": no connection asked for it). The sandbox's rate limit does
// not apply: the daemon paces these itself. The token cache is neither
// read nor filled: the daemon renews the file at half-life, when the cache
// would hand back the token it replaces.
func (s *Server) TokenFor(ctx context.Context, sb registry.Sandbox) (string, error) {
	if err := ctx.Err(); err != nil {
		return "", err
	}
	token, c, err := s.issue(sb, s.cfg.DefaultAudience, min(DefaultTTL, s.cfg.MaxTTL))
	if err != nil {
		reason := failSign
		if errors.Is(err, errKeyPublicationExpiring) {
			reason = failKeyPublication
		}
		s.cfg.Metrics.failed(reason)
		return "", fmt.Errorf("issue token file of %s: %w", sb.ID, err)
	}
	alg, kid := signedBy(token)
	s.audit(ctx, "token-file", sb.ID, issued{token: token, claims: c, alg: alg, kid: kid}, bpf.Record{})
	return token, nil
}

// audit counts an issued token and logs its line of the audit trail: with
// the node (on s.log) and the kernel's record of the caller, it answers
// which process on which host obtained jti X. It never logs the token nor
// anything of the request but its remote address. A token reused from the
// cache has its line too, with cached=true and the jti it was signed with.
func (s *Server) audit(ctx context.Context, remote, sandbox string, t issued, caller bpf.Record) {
	s.cfg.Metrics.issued(t.alg, t.cached)
	c := t.claims
	// Typed attributes: one line per token, so no boxing of each value.
	s.log.LogAttrs(ctx, slog.LevelInfo, "token issued",
		slog.String("sandbox", sandbox), slog.String("jti", c.ID), slog.String("sub", c.Subject), slog.Any("aud", c.Audience),
		slog.Int64("iat", c.IssuedAt), slog.Int64("exp", c.Expiry), slog.String("alg", t.alg), slog.String("kid", t.kid),
		slog.Bool("cached", t.cached), slog.String("remote", remote), slog.Any("caller", caller))
}

// signedBy reads alg and kid from the header of a compact JWS the server
// has just signed: the values in the token itself, whichever KeySet signed
// it. alg is "unknown" if the header cannot be read.
func signedBy(token string) (alg, kid string) {
	var h struct {
		Alg string `json:"alg"`
		Kid string `json:"kid"`
	}
	head, _, _ := strings.Cut(token, ".")
	b, err := base64.RawURLEncoding.DecodeString(head)
	if err != nil || json.Unmarshal(b, &h) != nil || h.Alg == "" {
		return "unknown", h.Kid
	}
	return h.Alg, h.Kid
}

func attestationReason(err error) string {
	switch {
	case errors.Is(err, bpf.ErrUnattested):
		return reasonUnattested
	}
	return reasonNoRecord
}

// parseTTL reads the ttl parameter: absent means the default; otherwise a
// positive decimal integer, clamped into [MinTTL, maxTTL].
func parseTTL(q map[string][]string, maxTTL time.Duration) (time.Duration, bool) {
	v, present := q["ttl"]
	if !present || len(v) == 0 {
		return min(DefaultTTL, maxTTL), true
	}
	s := v[0]
	if s == "" || strings.TrimLeft(s, "0123456789") != "" || strings.TrimLeft(s, "0") == "" {
		return 0, false
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n > int64(maxTTL/time.Second) {
		// Digits only, so the only error is overflow: clamp.
		return maxTTL, true
	}
	return min(max(time.Duration(n)*time.Second, MinTTL), maxTTL), true
}

// Claims is the token's payload, as the contract lists it. aud is always an
// array, even with one audience.
type Claims struct {
	Issuer         string   `json:"iss"`
	Subject        string   `json:"sub"`
	Audience       []string `json:"aud"`
	IssuedAt       int64    `json:"iat"`
	NotBefore      int64    `json:"nbf"`
	Expiry         int64    `json:"exp"`
	ID             string   `json:"jti"`
	App            string   `json:"app,omitempty"`
	SandboxID      string   `json:"sandbox_id"`
	OrganizationID string   `json:"organization_id,omitempty"`
	IdentityType   string   `json:"identity_type"`
}

// Subject builds sub: org:<org>:app:<app>:sandbox:<id>, leaving out empty
// org and app parts. A part containing ':' would make sub ambiguous.
func Subject(org, app, sandboxID string) (string, error) {
	var b strings.Builder
	for _, p := range [][2]string{{"org", org}, {"app", app}, {"sandbox", sandboxID}} {
		if strings.Contains(p[1], ":") {
			return "", fmt.Errorf("%s %q contains ':'", p[0], p[1])
		}
		if p[1] == "" {
			if p[0] == "sandbox" {
				return "", errors.New("empty sandbox id")
			}
			continue
		}
		if b.Len() > 0 {
			b.WriteByte(':')
		}
		b.WriteString(p[0] + ":" + p[1])
	}
	return b.String(), nil
}

// errKeyPublicationExpiring: the signing key's publication is not
// guaranteed for the contract's minimum token lifetime.
var errKeyPublicationExpiring = errors.New("the signing key is not guaranteed to stay published for the minimum token lifetime")

// issue signs a token for sb and returns it with its claims, which the
// audit line reports. exp never outlives the signing key's guaranteed
// publication, so that no verifier rejects a token before it expires; when
// that leaves less than MinTTL, no token is issued
// (errKeyPublicationExpiring).
func (s *Server) issue(sb registry.Sandbox, aud []string, ttl time.Duration) (string, Claims, error) {
	sub, err := Subject(sb.Org, sb.App, sb.ID)
	if err != nil {
		return "", Claims{}, err
	}
	now := s.cfg.Now().Unix()
	exp := now + int64(ttl/time.Second)
	if until := s.cfg.Keys.SignableUntil().Unix(); exp > until {
		if until-now < int64(MinTTL/time.Second) {
			return "", Claims{}, fmt.Errorf("%w: published until %s, %ds from now",
				errKeyPublicationExpiring, time.Unix(until, 0).UTC().Format(time.RFC3339), until-now)
		}
		exp = until
	}
	c := Claims{
		Issuer:         s.cfg.Issuer,
		Subject:        sub,
		Audience:       aud,
		IssuedAt:       now,
		NotBefore:      now,
		Expiry:         exp,
		ID:             uuid.NewString(),
		App:            sb.App,
		SandboxID:      sb.ID,
		OrganizationID: sb.Org,
		IdentityType:   "sandbox",
	}
	token, err := s.cfg.Keys.Sign(c)
	return token, c, err
}

// allow takes a token from the sandbox's bucket, or says how long to wait.
func (s *Server) allow(id string) (time.Duration, bool) {
	now := s.cfg.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	// Drop the buckets of sandboxes idle for long, so that sandbox churn
	// does not grow the map for ever.
	if now.Sub(s.lastSweep) > time.Minute {
		for k, l := range s.limiters {
			if now.Sub(l.lastUsed) > 10*time.Minute {
				delete(s.limiters, k)
			}
		}
		s.lastSweep = now
	}
	l, ok := s.limiters[id]
	if !ok {
		l = &limiter{Limiter: rate.NewLimiter(s.cfg.RateLimit, s.cfg.Burst)}
		s.limiters[id] = l
	}
	l.lastUsed = now
	r := l.ReserveN(now, 1)
	if d := r.DelayFrom(now); d > 0 {
		r.CancelAt(now)
		return d, false
	}
	return 0, true
}

func (s *Server) serveDiscovery(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		writeError(w, http.StatusMethodNotAllowed, msgMethod)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"issuer":                                s.cfg.Issuer,
		"jwks_uri":                              s.cfg.Issuer + "/.well-known/jwks.json",
		"response_types_supported":              []string{"id_token"},
		"subject_types_supported":               []string{"public"},
		"id_token_signing_alg_values_supported": s.cfg.Keys.Algorithms(),
		"claims_supported": []string{"iss", "sub", "aud", "iat", "nbf", "exp", "jti",
			"app", "sandbox_id", "organization_id", "identity_type"},
	})
}

func (s *Server) serveJWKS(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		writeError(w, http.StatusMethodNotAllowed, msgMethod)
		return
	}
	w.Header().Set("Cache-Control", jwksCacheControl)
	if enc, ok := s.cfg.Keys.(EncodedJWKS); ok {
		if b, err := enc.JWKSJSON(); err == nil {
			writeBody(w, http.StatusOK, b)
			return
		}
	}
	writeJSON(w, http.StatusOK, s.cfg.Keys.JWKS())
}

// EncodedJWKS is a KeySet that keeps its JWKS encoded (a fleet's, of
// hundreds of keys, re-encoded only when it changes); the server then
// serves those bytes instead of encoding JWKS() per request.
type EncodedJWKS interface {
	JWKSJSON() ([]byte, error)
}

// jwksCacheControl lets verifiers cache the JWKS for DefaultPublishDelay,
// the time a new key is published before it signs.
var jwksCacheControl = "max-age=" + strconv.Itoa(int(DefaultPublishDelay/time.Second))

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"error": msg})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status, b = http.StatusInternalServerError, []byte(`{"error":"`+msgIssueFailed+`"}`)
	}
	writeBody(w, status, b)
}

// writeBody writes a JSON body b (not modified) and a newline.
func writeBody(w http.ResponseWriter, status int, b []byte) {
	writeJSONHeader(w, status, len(b)+1)
	w.Write(b)
	w.Write(newline)
}

// writeToken answers a token as {"value":"<token>"} and a newline, in one
// buffer and without encoding/json, which was an eighth of what a cached
// answer allocated: a compact JWS (base64url parts and dots) holds nothing
// JSON escapes. Anything else goes through encoding/json.
func writeToken(w http.ResponseWriter, token string) {
	for i := 0; i < len(token); i++ {
		if c := token[i]; !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_' || c == '.') {
			writeJSON(w, http.StatusOK, map[string]string{"value": token})
			return
		}
	}
	const open, end = `{"value":"`, "\"}\n"
	b := make([]byte, 0, len(open)+len(token)+len(end))
	b = append(append(append(b, open...), token...), end...)
	writeJSONHeader(w, http.StatusOK, len(b))
	w.Write(b)
}

// jsonContentType is the Content-Type header's value, shared by every
// answer rather than allocated with each (net/http only reads it).
var jsonContentType = []string{"application/json"}

var newline = []byte{'\n'}

// writeJSONHeader writes the header of a JSON answer of n bytes.
func writeJSONHeader(w http.ResponseWriter, status, n int) {
	h := w.Header()
	h["Content-Type"] = jsonContentType
	h["Content-Length"] = []string{strconv.Itoa(n)}
	w.WriteHeader(status)
}
