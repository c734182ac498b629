// Package client fetches a sandbox's identity token from identityd, for
// workloads running inside a sandbox. It speaks the token endpoint contract
// (GET MIREN_IDENTITY_TOKEN_URL with "Authorization: Bearer <secret>") and
// depends on nothing else in identityd, so a workload imports only this.
//
// Tokens are cached per audience set until half their lifetime has passed;
// a refresh retries with backoff from 1 s doubling to 30 s, bounded by the
// caller's context. The bearer secret is read from
// MIREN_IDENTITY_TOKEN_SECRET_FILE on every fetch when that file is set and
// readable (identityd rotates it), else from MIREN_IDENTITY_TOKEN_SECRET.
// A workload that only wants the default audience's token can read the token
// file that identityd keeps fresh (MIREN_IDENTITY_TOKEN_PATH) instead of
// calling the server at all.
//
// The client reads a token's exp from its payload without verifying the
// signature: the workload presents tokens, it is not their relying party.
package client

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The environment variables of the token endpoint contract.
const (
	EnvTokenURL   = "MIREN_IDENTITY_TOKEN_URL"
	EnvSecret     = "MIREN_IDENTITY_TOKEN_SECRET"
	EnvSecretFile = "MIREN_IDENTITY_TOKEN_SECRET_FILE"
	EnvTokenPath  = "MIREN_IDENTITY_TOKEN_PATH"
	EnvIssuerURL  = "MIREN_OIDC_ISSUER_URL"
)

const (
	firstBackoff      = time.Second
	defaultMaxBackoff = 30 * time.Second
	// A token file that does not parse is being replaced or was written by
	// something else; it is read again this often, a few times.
	fileRetryDelay = 50 * time.Millisecond
	fileAttempts   = 5
)

// Client fetches and caches identity tokens. It is safe for concurrent use.
type Client struct {
	url        string
	secret     string
	secretFile string
	tokenFile  string
	// fileOnly: the token file is the only source (FromFile).
	fileOnly    bool
	ttl         int
	maxBackoff  time.Duration
	maxAttempts int
	onRetry     func(err error, wait time.Duration)
	http        *http.Client

	// Hooks for tests: the clock and the wait between attempts.
	now   func() time.Time
	sleep func(ctx context.Context, d time.Duration) error

	mu    sync.Mutex
	cache map[string]cached
}

type cached struct {
	token   string
	refresh time.Time // half the token's lifetime after it was fetched
	exp     time.Time
	// After a failed refresh: no new attempt before retryAt.
	retryAt time.Time
	backoff time.Duration
}

// Option configures a Client.
type Option func(*Client)

// WithURL sets the token endpoint (default: $MIREN_IDENTITY_TOKEN_URL in FromEnv).
func WithURL(u string) Option { return func(c *Client) { c.url = u } }

// WithSecret sets the bearer secret used when no secret file is readable.
func WithSecret(s string) Option { return func(c *Client) { c.secret = s } }

// WithSecretFile names a file holding the current secret; it is read again
// on every fetch, and preferred to WithSecret while it is readable.
func WithSecretFile(path string) Option { return func(c *Client) { c.secretFile = path } }

// WithTokenFile names a file holding a token for the default audience,
// kept fresh by identityd; Token with no audience reads it instead of
// calling the server (and falls back to the server, when one is
// configured, if the file holds no valid token).
func WithTokenFile(path string) Option { return func(c *Client) { c.tokenFile = path } }

// WithTTL asks the server for tokens of this lifetime (it clamps the value
// into [60 s, 86400 s]); zero leaves the server's default.
func WithTTL(d time.Duration) Option { return func(c *Client) { c.ttl = int(d / time.Second) } }

// WithMaxBackoff caps the wait between failed attempts (default 30 s).
func WithMaxBackoff(d time.Duration) Option { return func(c *Client) { c.maxBackoff = d } }

// WithMaxAttempts makes a fetch give up after n failed attempts; zero (the
// default) retries until the context ends.
func WithMaxAttempts(n int) Option { return func(c *Client) { c.maxAttempts = n } }

// WithRetryHook is called after each failed attempt that will be retried,
// with the error and the wait before the next attempt (for logging).
func WithRetryHook(f func(err error, wait time.Duration)) Option {
	return func(c *Client) { c.onRetry = f }
}

// WithHTTPClient replaces the HTTP client. The default opens a fresh
// connection per request: identityd attributes each connection to its
// sandbox when it is made.
func WithHTTPClient(h *http.Client) Option { return func(c *Client) { c.http = h } }

// New returns a Client configured by opts alone.
func New(opts ...Option) *Client {
	c := &Client{
		maxBackoff: defaultMaxBackoff,
		http: &http.Client{
			Timeout:   10 * time.Second,
			Transport: &http.Transport{DisableKeepAlives: true},
			// The contract has no redirects; following one could carry
			// the secret elsewhere.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		now:   time.Now,
		sleep: sleepCtx,
		cache: map[string]cached{},
	}
	for _, o := range opts {
		o(c)
	}
	return c
}

// FromEnv returns a Client configured from the contract's environment
// variables; opts are applied after them. It fails when neither the token
// endpoint with a secret nor a token file is given.
func FromEnv(opts ...Option) (*Client, error) {
	env := []Option{
		WithURL(os.Getenv(EnvTokenURL)),
		WithSecret(os.Getenv(EnvSecret)),
		WithSecretFile(os.Getenv(EnvSecretFile)),
		WithTokenFile(os.Getenv(EnvTokenPath)),
	}
	c := New(append(env, opts...)...)
	if c.url != "" && (c.secret != "" || c.secretFile != "") {
		return c, nil
	}
	if c.tokenFile != "" {
		return c, nil
	}
	return nil, fmt.Errorf("%s and %s (or %s) must be set (run inside a sandbox, e.g. with identityctl run)",
		EnvTokenURL, EnvSecret, EnvSecretFile)
}

// FromFile returns a Client that only reads the token file at path: Token
// accepts no audience and never calls the server.
func FromFile(path string, opts ...Option) *Client {
	c := New(append(opts, WithTokenFile(path))...)
	c.fileOnly = true
	return c
}

// IssuerURL returns $MIREN_OIDC_ISSUER_URL, the iss of the sandbox's tokens.
func IssuerURL() string { return os.Getenv(EnvIssuerURL) }

// Token returns a token for the audiences (none: the server's default
// audience), from the cache while less than half its lifetime has passed,
// else freshly fetched. With a token file configured and no audience, the
// file is read instead. Past half-life, while the cached token is still
// valid, a refresh is tried once per call and its failure returns the cached
// token (later calls retry after 1 s, doubling to the maximum backoff); with
// no valid token it retries with backoff until it succeeds or ctx ends.
func (c *Client) Token(ctx context.Context, audience ...string) (string, error) {
	if c.tokenFile != "" && len(audience) == 0 {
		tok, ferr := c.readTokenFile(ctx)
		if ferr == nil || c.fileOnly || c.url == "" {
			return tok, ferr
		}
		// The file holds no valid token (identityd down for long?): ask the server.
		tok, err := c.token(ctx, audience)
		if err != nil {
			return "", fmt.Errorf("%w (and %v)", err, ferr)
		}
		return tok, nil
	}
	if c.fileOnly {
		return "", errors.New("a client reading only a token file has no token for other audiences")
	}
	return c.token(ctx, audience)
}

// token serves audience from the cache or the server.
func (c *Client) token(ctx context.Context, audience []string) (string, error) {
	key := strings.Join(audience, "\x00")
	c.mu.Lock()
	e, ok := c.cache[key]
	c.mu.Unlock()
	now := c.now()
	if !ok || !now.Before(e.exp) {
		return c.Fetch(ctx, audience...)
	}
	if now.Before(e.refresh) || now.Before(e.retryAt) {
		return e.token, nil
	}
	// Past half-life with a token still valid: one attempt now, and on
	// failure the cached token, with the next attempt backed off, so that
	// callers are not held up while the server is away.
	u, err := c.requestURL(audience)
	if err != nil {
		return "", err
	}
	tok, err := c.attempt(ctx, u)
	if err == nil {
		c.store(key, tok)
		return tok, nil
	}
	e.backoff = min(max(2*e.backoff, firstBackoff), c.maxBackoff)
	e.retryAt = c.now().Add(e.backoff)
	if c.onRetry != nil {
		c.onRetry(err, e.backoff)
	}
	c.mu.Lock()
	c.cache[key] = e
	c.mu.Unlock()
	return e.token, nil
}

// Fetch asks the server for a fresh token, whatever the cache holds,
// retrying with backoff until it succeeds, ctx ends or the attempts set by
// WithMaxAttempts are used up; it returns the last attempt's error. The
// token is cached for Token.
func (c *Client) Fetch(ctx context.Context, audience ...string) (string, error) {
	u, err := c.requestURL(audience)
	if err != nil {
		return "", err
	}
	backoff := min(firstBackoff, c.maxBackoff)
	for failures := 0; ; {
		tok, err := c.attempt(ctx, u)
		if err == nil {
			c.store(strings.Join(audience, "\x00"), tok)
			return tok, nil
		}
		if ctx.Err() != nil {
			return "", err
		}
		failures++
		if c.maxAttempts > 0 && failures >= c.maxAttempts {
			return "", err
		}
		if c.onRetry != nil {
			c.onRetry(err, backoff)
		}
		if serr := c.sleep(ctx, backoff); serr != nil {
			return "", fmt.Errorf("%w (gave up waiting: %w)", err, serr)
		}
		backoff = min(2*backoff, c.maxBackoff)
	}
}

// requestURL is the token URL with the audiences and ttl in its query.
func (c *Client) requestURL(audience []string) (string, error) {
	if c.url == "" {
		return "", errors.New("no token endpoint configured")
	}
	u, err := url.Parse(c.url)
	if err != nil {
		return "", fmt.Errorf("parse token URL: %w", err)
	}
	q := u.Query()
	for _, a := range audience {
		q.Add("audience", a)
	}
	if c.ttl > 0 {
		q.Set("ttl", strconv.Itoa(c.ttl))
	}
	u.RawQuery = q.Encode()
	return u.String(), nil
}

// attempt is one request with the current secret.
func (c *Client) attempt(ctx context.Context, u string) (string, error) {
	secret, err := c.currentSecret()
	if err != nil {
		return "", err
	}
	tok, err := c.fetchOnce(ctx, u, secret)
	var refused *RefusedError
	if errors.As(err, &refused) && refused.Message == "invalid token" && c.secretFile != "" {
		// The secret may have been rotated since it was read: read the
		// file again and, if it changed, try again at once.
		if again, rerr := c.currentSecret(); rerr == nil && again != secret {
			tok, err = c.fetchOnce(ctx, u, again)
		}
	}
	return tok, err
}

func (c *Client) store(key, tok string) {
	now := c.now()
	e := cached{token: tok, refresh: now, exp: now}
	if exp, err := Expiry(tok); err == nil {
		e.exp = exp
		e.refresh = now.Add(exp.Sub(now) / 2)
	}
	c.mu.Lock()
	c.cache[key] = e
	c.mu.Unlock()
}

// currentSecret prefers the secret file, read afresh, to the fixed secret.
func (c *Client) currentSecret() (string, error) {
	if c.secretFile != "" {
		b, err := os.ReadFile(c.secretFile)
		if s := strings.TrimSpace(string(b)); err == nil && s != "" {
			return s, nil
		}
	}
	if c.secret == "" {
		return "", fmt.Errorf("no secret: %s unreadable or empty and %s not set", c.secretFile, EnvSecret)
	}
	return c.secret, nil
}

// RefusedError is the server's answer to a request it refused: the HTTP
// status and the contract's error message.
type RefusedError struct {
	Status  string // e.g. "403 Forbidden"
	Code    int
	Message string // e.g. "invalid token"
}

func (e *RefusedError) Error() string {
	return fmt.Sprintf("token server refused: %s: %s", e.Status, e.Message)
}

func (c *Client) fetchOnce(ctx context.Context, u, secret string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return "", fmt.Errorf("build token request: %w", err)
	}
	req.Header.Set("Authorization", "Bearer "+secret)
	resp, err := c.http.Do(req)
	if err != nil {
		return "", fmt.Errorf("token server unreachable: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return "", fmt.Errorf("read token response: %w", err)
	}
	var out struct {
		Value string `json:"value"`
		Error string `json:"error"`
	}
	jerr := json.Unmarshal(body, &out)
	if resp.StatusCode != http.StatusOK {
		why := out.Error
		if why == "" {
			why = strings.TrimSpace(string(body))
		}
		return "", &RefusedError{Status: resp.Status, Code: resp.StatusCode, Message: why}
	}
	if jerr != nil {
		return "", fmt.Errorf("decode token response: %w", jerr)
	}
	if out.Value == "" {
		return "", errors.New("token server answered 200 without a token")
	}
	return out.Value, nil
}

// readTokenFile reads the whole token file. The file is replaced by rename,
// so one open sees one version whole; a content that does not parse is read
// again shortly, a few times, in case something rewrote it in place.
func (c *Client) readTokenFile(ctx context.Context) (string, error) {
	var err error
	for i := 0; i < fileAttempts; i++ {
		if i > 0 {
			if serr := c.sleep(ctx, fileRetryDelay); serr != nil {
				return "", fmt.Errorf("%w (gave up waiting: %w)", err, serr)
			}
		}
		var b []byte
		b, err = os.ReadFile(c.tokenFile)
		if err != nil {
			// Missing or unreadable is not a file caught mid-write: a
			// rename never leaves the name absent.
			return "", fmt.Errorf("read token file: %w", err)
		}
		tok := parseTokenFile(b)
		var exp time.Time
		exp, err = Expiry(tok)
		if err != nil {
			err = fmt.Errorf("token file %s: %w", c.tokenFile, err)
			continue
		}
		if !c.now().Before(exp) {
			return "", fmt.Errorf("token file %s: token expired at %s", c.tokenFile, exp.UTC().Format(time.RFC3339))
		}
		return tok, nil
	}
	return "", err
}

// parseTokenFile accepts the bare JWT or the endpoint's {"value": ...}.
func parseTokenFile(b []byte) string {
	s := strings.TrimSpace(string(b))
	if strings.HasPrefix(s, "{") {
		var v struct {
			Value string `json:"value"`
		}
		if json.Unmarshal([]byte(s), &v) == nil {
			return v.Value
		}
	}
	return s
}

// Claims decodes a JWT's payload without verifying it.
func Claims(token string) (map[string]any, error) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return nil, errors.New("malformed token: not three dot-separated parts")
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return nil, fmt.Errorf("decode token payload: %w", err)
	}
	var claims map[string]any
	if err := json.Unmarshal(payload, &claims); err != nil {
		return nil, fmt.Errorf("decode token payload: %w", err)
	}
	return claims, nil
}

// Expiry returns a JWT's exp, read without verifying the token.
func Expiry(token string) (time.Time, error) {
	claims, err := Claims(token)
	if err != nil {
		return time.Time{}, err
	}
	exp, ok := claims["exp"].(float64)
	if !ok {
		return time.Time{}, errors.New("token has no exp")
	}
	return time.Unix(int64(exp), 0), nil
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
