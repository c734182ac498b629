package controllers

// Credentials that refresh themselves. Every sandbox made or adopted here
// has a credentials directory (internal/credsdir) mounted into it: a secret
// file that always holds the current secret, and a token file that always
// holds a token for the default audience. The secret is rotated on a
// schedule and on demand, its predecessor accepted for a grace window; the
// token file is replaced at half its token's lifetime. Both schedules are
// rebuilt from disk at every start: the store's issue time of each secret,
// and the iat and exp of each token file, so a token that would expire
// while the daemon was down is replaced as soon as it is back.

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"slices"
	"time"

	"github.com/identityd/identityd/internal/credsdir"
	"github.com/identityd/identityd/internal/registry"
	"github.com/identityd/identityd/internal/secretstore"
)

// DefaultCredentialsMount is where a sandbox's credentials directory
// appears inside it, unless configured otherwise.
const DefaultCredentialsMount = "/run/secrets/identityd"

// TokenIssuer signs the token kept in a sandbox's token file (the default
// audience and lifetime), and forgets the tokens it cached for a sandbox
// whose secret was rotated or that is gone. *tokenserver.Server is the
// real one.
type TokenIssuer interface {
	TokenFor(ctx context.Context, sb registry.Sandbox) (string, error)
	Forget(sandboxID string)
}

// Credentials says where a sandbox's credentials directory is on the host
// (Dir, to bind-mount, read-only, as a directory) and where its
// environment expects it inside the sandbox (Mount).
type Credentials struct {
	Dir   string `json:"dir"`
	Mount string `json:"mount"`
}

// credSchedule is when a sandbox's credentials are next renewed.
type credSchedule struct {
	rotate time.Time // zero: never on a schedule
	token  time.Time // zero: no token file
	// backoff is the wait after the last failed token renewal, doubling
	// from tokenRetryMin to tokenRetryMax; zero after a success.
	backoff time.Duration
}

// Retry pacing of a failed token renewal, as the contract's clients do.
const (
	tokenRetryMin = time.Second
	tokenRetryMax = 30 * time.Second
)

// credsTick paces the renewal loop: the precision of both schedules.
const credsTick = 500 * time.Millisecond

// checkMount refuses a mount point that is not a clean absolute path
// below the root.
func checkMount(p string) error {
	if !filepath.IsAbs(p) || filepath.Clean(p) != p || p == "/" {
		return fmt.Errorf("%w: credentials mount %q: want a clean absolute path below /", ErrInvalid, p)
	}
	return nil
}

// credentials is what Created reports of r's directory; nil for a sandbox
// without one.
func (c *Controller) credentials(r *Record) *Credentials {
	if r.CredentialsMount == "" {
		return nil
	}
	return &Credentials{Dir: c.creds.Path(r.ID), Mount: r.CredentialsMount}
}

// makeCredentials gives r a fresh credentials directory holding secret,
// readable by gid. A directory left by an earlier sandbox of that id (no
// live one has it: the caller checked) is replaced.
func (c *Controller) makeCredentials(r *Record, gid uint32, secret string) error {
	if err := c.creds.Remove(r.ID); err != nil {
		return err
	}
	if err := c.creds.Create(r.ID, gid, secret); err != nil {
		return err
	}
	return nil
}

// dropCredentials removes sandbox id's credentials directory and schedule,
// once its secret is revoked. A failure is logged: the start sweeps
// directories no record names.
func (c *Controller) dropCredentials(id, doing string) {
	delete(c.schedule, id)
	c.forgetTokens(id)
	if err := c.creds.Remove(id); err != nil {
		c.log.Warn(doing+": remove the credentials directory; removed at the next start", "sandbox", id, "error", err)
	}
}

// schedule sets r's renewal times from what is on disk, with mu held (or
// during the start): the secret's issue time, and the token file's times
// (a missing or unreadable token file is due now).
func (c *Controller) scheduleCredentials(r *Record, now time.Time) {
	if r.CredentialsMount == "" {
		return
	}
	s := &credSchedule{}
	if c.cfg.SecretRotation > 0 {
		st, err := c.secrets.Status(r.ID)
		switch {
		case err != nil:
			c.log.Warn("cannot read when the secret was made; rotated at the next check", "sandbox", r.ID, "error", err)
			s.rotate = now
		case st.Issued.IsZero():
			s.rotate = now.Add(c.cfg.SecretRotation)
		default:
			s.rotate = st.Issued.Add(c.cfg.SecretRotation)
		}
	}
	if c.cfg.Tokens != nil {
		s.token = now
		if _, t, err := c.creds.Token(r.ID); err == nil {
			s.token = t.RefreshAt()
		}
	}
	c.schedule[r.ID] = s
}

// recoverRotations finishes the rotations a crash interrupted: one whose
// next secret the store committed is published; one it did not is
// abandoned (the old secret, in the file and the store, stays current).
// Then directories no live sandbox has are removed.
func (c *Controller) recoverRotations() {
	staged, err := c.creds.StagedIDs()
	if err != nil {
		c.log.Warn("cannot look for interrupted secret rotations; looked for again at the next start", "error", err)
	}
	for _, id := range staged {
		c.recoverRotation(id)
	}
	ids, err := c.creds.IDs()
	if err != nil {
		c.log.Warn("cannot look for credentials directories no record names; looked for again at the next start", "error", err)
	}
	for _, id := range ids {
		if _, ok := c.live[id]; !ok {
			if err := c.creds.Remove(id); err != nil {
				c.log.Warn("remove a credentials directory no live sandbox has", "sandbox", id, "error", err)
			}
		}
	}
}

func (c *Controller) recoverRotation(id string) {
	next, ok, err := c.creds.Staged(id)
	if err != nil || !ok {
		c.log.Warn("interrupted secret rotation: cannot read the staged secret; left for the next start", "sandbox", id, "error", err)
		return
	}
	if _, live := c.live[id]; !live {
		if err := c.creds.Discard(id); err != nil {
			c.log.Warn("interrupted secret rotation of a sandbox no longer here: discard it", "sandbox", id, "error", err)
		}
		return
	}
	committed, err := c.secrets.IsCurrent(id, next)
	if err != nil {
		c.log.Warn("interrupted secret rotation: cannot read the secret store; left for the next start", "sandbox", id, "error", err)
		return
	}
	if committed {
		if err := c.creds.Publish(id); err != nil {
			c.log.Error("interrupted secret rotation: publish the committed secret; the previous one is accepted until its grace window ends", "sandbox", id, "error", err)
			return
		}
		c.log.Info("secret rotation a crash interrupted finished", "sandbox", id)
		return
	}
	if err := c.creds.Discard(id); err != nil {
		c.log.Warn("interrupted secret rotation: discard the uncommitted secret", "sandbox", id, "error", err)
		return
	}
	c.log.Info("secret rotation a crash interrupted abandoned; the secret is unchanged", "sandbox", id)
}

// RotateSecret replaces sandbox id's secret now. The previous one stays
// accepted for the configured grace window, or not at all with
// revokePrevious (a secret believed leaked). The new secret is never
// returned: the sandbox reads it from its secret file.
func (c *Controller) RotateSecret(ctx context.Context, id string, revokePrevious bool) (secretstore.Status, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return secretstore.Status{}, err
	}
	r, ok := c.live[id]
	if !ok {
		return secretstore.Status{}, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	grace := c.cfg.SecretGrace
	if revokePrevious {
		grace = 0
	}
	if err := c.rotate(r, grace, "on demand"); err != nil {
		return secretstore.Status{}, err
	}
	return c.secrets.Status(id)
}

// rotate replaces r's secret, with mu held: staged out of the sandbox's
// sight, committed in the store (from here the new secret is accepted, and
// the old one for grace), then published by a rename into the directory.
// A crash at any point leaves the old secret current in both, or the new
// one committed and published at the next start (recoverRotation).
func (c *Controller) rotate(r *Record, grace time.Duration, why string) error {
	if r.CredentialsMount == "" {
		return fmt.Errorf("%w: sandbox %s was made before credentials directories and has no secret file to rotate", ErrInvalid, r.ID)
	}
	next := newSecret()
	if err := c.creds.Stage(r.ID, next); err != nil {
		return fmt.Errorf("rotate secret of %s: %w", r.ID, err)
	}
	c.at("rotate:staged")
	if err := c.secrets.Rotate(r.ID, next, grace); err != nil {
		if derr := c.creds.Discard(r.ID); derr != nil {
			c.log.Warn("undo a failed rotation", "sandbox", r.ID, "error", derr)
		}
		return fmt.Errorf("rotate secret of %s: %w", r.ID, err)
	}
	c.at("rotate:committed")
	if err := c.creds.Publish(r.ID); err != nil {
		// Committed: the next start publishes it. Until then the file
		// holds the previous secret, accepted for the grace window.
		c.log.Error("secret rotated but its file not replaced; the next start replaces it", "sandbox", r.ID, "error", err)
		return fmt.Errorf("rotate secret of %s: %w", r.ID, err)
	}
	c.at("rotate:published")
	c.rotations.Add(1)
	c.forgetTokens(r.ID)
	if s := c.schedule[r.ID]; s != nil && c.cfg.SecretRotation > 0 {
		s.rotate = time.Now().Add(c.cfg.SecretRotation)
	}
	c.log.Info("secret rotated", "sandbox", r.ID, "why", why, "previous_accepted_for", grace)
	return nil
}

// forgetTokens drops the tokens the token server cached for sandbox id.
func (c *Controller) forgetTokens(id string) {
	if c.cfg.Tokens != nil {
		c.cfg.Tokens.Forget(id)
	}
}

// SecretRotations counts the secrets rotated since the start, on schedule
// or on demand.
func (c *Controller) SecretRotations() uint64 { return c.rotations.Load() }

// TokenFileFailures counts the token files that could not be written when
// due since the start (each is retried with backoff).
func (c *Controller) TokenFileFailures() uint64 { return c.tokenFileFailures.Load() }

// renewCredentials runs the two schedules until ctx ends.
func (c *Controller) renewCredentials(ctx context.Context) {
	t := time.NewTicker(credsTick)
	defer t.Stop()
	for {
		c.renewDue(ctx, time.Now())
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// renewDue rotates the secrets and replaces the token files that are due,
// soonest first. The lock is taken per sandbox, and not held while a token
// is signed, so creates and deletes are never held up for long.
func (c *Controller) renewDue(ctx context.Context, now time.Time) {
	type due struct {
		id   string
		at   time.Time
		kind string
	}
	var work []due
	c.mu.Lock()
	for id, s := range c.schedule {
		if !s.rotate.IsZero() && !now.Before(s.rotate) {
			work = append(work, due{id, s.rotate, "rotate"})
		}
		if !s.token.IsZero() && !now.Before(s.token) {
			work = append(work, due{id, s.token, "token"})
		}
	}
	c.mu.Unlock()
	slices.SortFunc(work, func(a, b due) int { return a.at.Compare(b.at) })
	for _, w := range work {
		if ctx.Err() != nil {
			return
		}
		switch w.kind {
		case "rotate":
			c.rotateScheduled(w.id)
		case "token":
			c.renewToken(ctx, w.id)
		}
	}
}

func (c *Controller) rotateScheduled(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r, ok := c.live[id]
	s := c.schedule[id]
	if !ok || s == nil {
		return
	}
	if err := c.rotate(r, c.cfg.SecretGrace, "schedule"); err != nil {
		// Retried at a later tick; the current secret stays valid.
		s.rotate = time.Now().Add(tokenRetryMax)
		c.log.Warn("scheduled secret rotation failed; retried", "sandbox", id, "error", err)
	}
}

// renewToken signs a token for sandbox id and replaces its token file.
func (c *Controller) renewToken(ctx context.Context, id string) {
	c.mu.Lock()
	r, ok := c.live[id]
	c.mu.Unlock()
	if !ok {
		return
	}
	token, t, err := c.signToken(ctx, r)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.tokenSigned(ctx, r, token, t, err)
}

// firstToken writes a new sandbox's first token file before Create or
// Adopt returns, with mu held, so that the workload finds it at start. A
// failure is logged and retried by the schedule: the file is an optional
// source, and the endpoint still serves the sandbox.
func (c *Controller) firstToken(ctx context.Context, r *Record) {
	if c.cfg.Tokens == nil || r.CredentialsMount == "" {
		return
	}
	token, t, err := c.signToken(ctx, r)
	c.tokenSigned(ctx, r, token, t, err)
}

func (c *Controller) signToken(ctx context.Context, r *Record) (string, credsdir.Times, error) {
	token, err := c.cfg.Tokens.TokenFor(ctx, registry.Sandbox{ID: r.ID, App: r.App, Org: r.Org,
		CgroupPath: r.CgroupPath, CgroupID: r.CgroupID, NetnsCookie: r.NetnsCookie})
	if err != nil {
		return "", credsdir.Times{}, err
	}
	t, err := credsdir.TimesOf(token)
	return token, t, err
}

// tokenSigned writes a token signed for r into its token file, with mu
// held, unless r was deleted (or replaced by another sandbox of its id)
// while the token was signed; or, if signing failed, schedules a retry.
func (c *Controller) tokenSigned(ctx context.Context, r *Record, token string, t credsdir.Times, err error) {
	s := c.schedule[r.ID]
	if c.live[r.ID] != r || s == nil {
		return
	}
	if err == nil {
		if err = c.creds.WriteToken(r.ID, token); err == nil {
			s.token, s.backoff = t.RefreshAt(), 0
			return
		}
	}
	if ctx.Err() != nil {
		return
	}
	c.tokenFileFailures.Add(1)
	s.backoff = min(max(2*s.backoff, tokenRetryMin), tokenRetryMax)
	s.token = time.Now().Add(s.backoff)
	level := c.log.Warn
	if errors.Is(err, fs.ErrNotExist) {
		level = c.log.Info // the directory went with a delete racing this
	}
	level("token file not renewed; retried", "sandbox", r.ID, "retry_in", s.backoff, "error", err)
}
