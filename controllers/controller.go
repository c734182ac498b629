package controllers

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/credsdir"
	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/registry"
	"github.com/identityd/identityd/internal/secretstore"
)

// Errors callers can tell apart (the admin API maps them to statuses).
var (
	ErrInvalid  = errors.New("invalid request")
	ErrExists   = errors.New("sandbox already exists")
	ErrNotFound = errors.New("no such sandbox")
	ErrBusy     = errors.New("sandbox still has running tasks")
	// ErrHeld is the error of an IDs.Reserve whose id another node of the
	// fleet holds (the admin API answers 409); ErrIDsUnavailable of one
	// that could not reach the fleet's store (503).
	ErrHeld           = errors.New("sandbox id held by another node")
	ErrIDsUnavailable = errors.New("fleet store unreachable")
)

// IDs makes sandbox ids unique across a fleet of hosts: Reserve claims an
// id for this node before a sandbox is made under it (failing with an error
// matching ErrHeld or ErrIDsUnavailable), Release gives it back once the
// sandbox is gone. Reserving an id this node already holds succeeds.
type IDs interface {
	Reserve(ctx context.Context, id string) error
	Release(ctx context.Context, id string) error
}

// Config says where the controller keeps its state and builds sandboxes.
type Config struct {
	// StateDir holds records and secrets (0700).
	StateDir string
	// CgroupParent is where sandbox cgroups are created; default
	// <cgroup2 root>/identityd.
	CgroupParent string
	// HostNetns is the netns holding the router address and the host ends
	// of the sandboxes' veths (a path); empty means the controller's own.
	// Tests point it at a namespace they made.
	HostNetns string
	// NetnsPrefix begins the name of every network namespace this
	// controller creates under /run/netns, and only names with it are ever
	// scanned or cleaned up; default "identityd-". Instances that share a
	// host (several daemons, a test suite beside a real identityd) each use
	// their own.
	NetnsPrefix string
	// Bridge is the device holding the router address; default identityd0.
	// Sandboxes get routed links of their own, not ports on it (only
	// sandboxes made by older versions are).
	Bridge string
	// Subnet is the sandbox address pool, IPv4 only; its first address is
	// the router (on Bridge). Default 10.88.0.0/16.
	Subnet netip.Prefix
	// TokenURL and Issuer are handed to sandboxes as
	// MIREN_IDENTITY_TOKEN_URL and MIREN_OIDC_ISSUER_URL: the daemon passes
	// the URL of the listener it opened and the iss of the tokens it signs.
	// TokenURL defaults to http://<router>:7123/v1/token.
	TokenURL string
	Issuer   string
	// Registry and Secrets are the stores the controller writes and the
	// token server reads; the daemon builds both and hands them to each.
	// If nil, the controller opens its own (and closes them).
	Registry *registry.Index    `json:"-"`
	Secrets  *secretstore.Store `json:"-"`
	// ResyncInterval is how often live sandboxes are checked against the
	// kernel; one removed underneath the controller is retired at the
	// second check that finds it gone, so within two intervals. Default 2s.
	ResyncInterval time.Duration
	// IDs, if set, reserves every sandbox id in the fleet before the
	// sandbox is made or adopted, and releases it once it is gone; nil on
	// a single host.
	IDs IDs `json:"-"`
	// CredentialsMount is where a sandbox's credentials directory appears
	// inside it (see credentials.go); DefaultCredentialsMount if empty.
	// An adoption may name another.
	CredentialsMount string
	// SecretRotation replaces each sandbox's secret when it is this old (0:
	// only on demand); SecretGrace is how long a replaced secret is still
	// accepted (0: not at all).
	SecretRotation time.Duration
	SecretGrace    time.Duration
	// Tokens, if set, signs the token kept in each sandbox's token file;
	// nil: sandboxes get no token file.
	Tokens TokenIssuer  `json:"-"`
	Logger *slog.Logger `json:"-"`
}

// Controller owns the sandboxes' lifecycle and is the token server's
// registry.
type Controller struct {
	cfg         Config
	log         *slog.Logger
	reg         *registry.Index
	ownReg      bool // opened by the controller, closed by Close
	secrets     *secretstore.Store
	creds       *credsdir.Dirs
	records     *recordStore
	host        *netlink.Handle
	bridgeIndex int
	router      netip.Addr

	mu   sync.Mutex // serialises lifecycle operations
	live map[string]*Record
	// unreleased holds the ids of sandboxes gone from here whose release
	// in the fleet failed (under mu); Run retries them.
	unreleased map[string]bool
	// doubts holds what the previous resync saw of sandboxes that did not
	// look plainly alive (under mu).
	doubts map[string]*doubt
	// schedule holds when each sandbox's secret is rotated and its token
	// file replaced next (under mu).
	schedule map[string]*credSchedule
	// inconclusive counts checks that could not tell whether a sandbox is
	// alive.
	inconclusive atomic.Uint64
	// rotations counts secrets rotated; tokenFileFailures token files
	// that could not be renewed when due (each retried).
	rotations, tokenFileFailures atomic.Uint64
	// confirmWait separates the rebuild's two looks at a sandbox it found
	// gone; tests replace it.
	confirmWait func(context.Context) error
	// fault, if set, is called at named points inside Create and Delete;
	// crash tests set it to kill the process there.
	fault func(point string)
}

// at marks a point inside Create or Delete that crash tests stop at.
func (c *Controller) at(point string) {
	if c.fault != nil {
		c.fault(point)
	}
}

// doubt is what the resync remembers of a sandbox between two checks.
type doubt struct {
	// gone is why the sandbox looked gone; it is retired only if the next
	// conclusive check agrees.
	gone string
	// unknown is set while checks are inconclusive (logged once).
	unknown int
}

// New opens the state, rebuilds the sandboxes from their records and the
// live cgroups and network namespaces, and returns a ready controller.
func New(ctx context.Context, cfg Config) (*Controller, error) {
	c, err := open(cfg)
	if err != nil {
		return nil, err
	}
	if err := c.rebuild(ctx); err != nil {
		c.Close()
		return nil, err
	}
	c.checkLinks(ctx)
	return c, nil
}

// open is New without the rebuild: the state opened, nothing registered.
func open(cfg Config) (*Controller, error) {
	root, err := cgroup2.Root()
	if err != nil {
		return nil, err
	}
	if cfg.CgroupParent == "" {
		cfg.CgroupParent = filepath.Join(root, "identityd")
	}
	cfg = cfg.withHostDefaults()
	if cfg.TokenURL == "" {
		cfg.TokenURL = fmt.Sprintf("http://%s/v1/token", netip.AddrPortFrom(Router(cfg.Subnet), DefaultTokenPort))
	}
	if cfg.ResyncInterval == 0 {
		cfg.ResyncInterval = 2 * time.Second
	}
	if cfg.NetnsPrefix, err = cfg.netnsPrefix(); err != nil {
		return nil, err
	}
	if cfg.CredentialsMount == "" {
		cfg.CredentialsMount = DefaultCredentialsMount
	}
	if err := checkMount(cfg.CredentialsMount); err != nil {
		return nil, err
	}
	c := &Controller{cfg: cfg, log: cfg.Logger, live: map[string]*Record{}, unreleased: map[string]bool{}, doubts: map[string]*doubt{},
		schedule: map[string]*credSchedule{}, router: Router(cfg.Subnet),
		confirmWait: func(ctx context.Context) error { return sleep(ctx, confirmDelay) }}
	if err := os.MkdirAll(cfg.CgroupParent, 0o755); err != nil {
		return nil, fmt.Errorf("create cgroup parent: %w", err)
	}
	c.reg, c.secrets = cfg.Registry, cfg.Secrets
	if c.reg == nil {
		if c.reg, err = registry.New(root); err != nil {
			return nil, err
		}
		c.ownReg = true
	}
	if c.secrets == nil {
		if c.secrets, err = secretstore.Open(secretstore.Dir(cfg.StateDir)); err != nil {
			return nil, err
		}
	}
	if c.records, err = openRecords(cfg.StateDir); err != nil {
		return nil, err
	}
	if c.creds, err = credsdir.Open(credsdir.Root(cfg.StateDir)); err != nil {
		return nil, err
	}
	if c.host, err = netnsutil.Handle(cfg.HostNetns); err != nil {
		return nil, err
	}
	if err := c.ensureBridge(); err != nil {
		return nil, err
	}
	return c, nil
}

// Close releases the controller's handles; sandboxes are left as they are.
func (c *Controller) Close() error {
	c.host.Close()
	if c.ownReg {
		return c.reg.Close()
	}
	return nil
}

// DefaultTokenPort is the token endpoint's port on the router address.
const DefaultTokenPort = 7123

// Router is the router address of a sandbox subnet: its first address, on
// the host side of every sandbox's link, where the token endpoint listens.
func Router(subnet netip.Prefix) netip.Addr { return subnet.Masked().Addr().Next() }

func (cfg Config) withHostDefaults() Config {
	if cfg.Bridge == "" {
		cfg.Bridge = "identityd0"
	}
	if !cfg.Subnet.IsValid() {
		cfg.Subnet = netip.MustParsePrefix("10.88.0.0/16")
	}
	cfg.Subnet = cfg.Subnet.Masked()
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return cfg
}

// PrepareHost sets up the router device in cfg.HostNetns as New does, and
// returns the router address: the daemon binds the token endpoint to it,
// and so knows the URL it serves, before it builds the controller.
func PrepareHost(cfg Config) (netip.Addr, error) {
	cfg = cfg.withHostDefaults()
	h, err := netnsutil.Handle(cfg.HostNetns)
	if err != nil {
		return netip.Addr{}, err
	}
	defer h.Close()
	c := &Controller{cfg: cfg, log: cfg.Logger, host: h, router: Router(cfg.Subnet)}
	if err := c.ensureBridge(); err != nil {
		return netip.Addr{}, err
	}
	return c.router, nil
}

// Len returns the number of live sandboxes.
func (c *Controller) Len() int { return c.reg.Len() }

// Router returns the router address sandboxes call.
func (c *Controller) Router() netip.Addr { return c.router }

// env is the environment to inject into sandbox r's processes.
func (c *Controller) env(r *Record, secret string) map[string]string {
	env := map[string]string{
		"MIREN_IDENTITY_TOKEN_URL":    c.cfg.TokenURL,
		"MIREN_IDENTITY_TOKEN_SECRET": secret,
		"MIREN_OIDC_ISSUER_URL":       c.cfg.Issuer,
	}
	if r.CredentialsMount != "" {
		env["MIREN_IDENTITY_TOKEN_SECRET_FILE"] = path.Join(r.CredentialsMount, credsdir.SecretFile)
		if c.cfg.Tokens != nil {
			env["MIREN_IDENTITY_TOKEN_PATH"] = path.Join(r.CredentialsMount, credsdir.TokenFile)
		}
	}
	return env
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$`)

func validate(id, app, org string) error {
	if !secretstore.ValidID(id) {
		return fmt.Errorf("%w: sandbox id %q: want 1-128 of [A-Za-z0-9_.-], not starting with . - or _", ErrInvalid, id)
	}
	if !nameRE.MatchString(app) {
		return fmt.Errorf("%w: app %q: want 1-63 of [A-Za-z0-9_.-] (no ':', which the token's sub uses)", ErrInvalid, app)
	}
	if org != "" && !nameRE.MatchString(org) {
		return fmt.Errorf("%w: org %q: want 1-63 of [A-Za-z0-9_.-] (no ':', which the token's sub uses)", ErrInvalid, org)
	}
	return nil
}

func newID() string {
	var b [6]byte
	rand.Read(b[:])
	return "sb-" + hex.EncodeToString(b[:])
}

func newSecret() string {
	var b [32]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// CreateRequest names a new sandbox; ID is generated when empty.
type CreateRequest struct {
	ID  string `json:"id,omitempty"`
	App string `json:"app"`
	Org string `json:"org,omitempty"`
	// Group is the group (a host gid) that may read the sandbox's
	// credentials files: the workload's. 0 (root) if absent.
	Group uint32 `json:"group,omitempty"`
}

// Created is what Create and Adopt return: the record, the environment
// (with the secret) to inject into the sandbox's processes, and the
// credentials directory to mount into it.
type Created struct {
	Sandbox     Record            `json:"sandbox"`
	Env         map[string]string `json:"env"`
	Credentials *Credentials      `json:"credentials,omitempty"`
}

// Create makes a sandbox: a cgroup, a netns with a routed link, and a
// fresh secret. When it returns, the record and the secret are durable. A
// cgroup, netns or veth of that name that Create did not make is never
// touched: Create answers ErrExists. A Create that fails removes only what
// it made itself.
func (c *Controller) Create(ctx context.Context, req CreateRequest) (*Created, error) {
	if req.ID == "" {
		req.ID = newID()
	}
	if err := validate(req.ID, req.App, req.Org); err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := ctx.Err(); err != nil { // the caller left while it waited
		return nil, err
	}
	if err := c.unused(req.ID); err != nil {
		return nil, err
	}
	if err := c.reserve(ctx, req.ID, "create"); err != nil {
		return nil, fmt.Errorf("create %s: %w", req.ID, err)
	}
	// Until the sandbox is committed, a failure gives the id back.
	committed := false
	defer func() {
		if !committed {
			c.release(req.ID, "undo a failed create")
		}
	}()
	addr, err := c.allocate()
	if err != nil {
		return nil, err
	}
	r := &Record{
		ID: req.ID, App: req.App, Org: req.Org, Owned: true, Created: time.Now().UTC(),
		CgroupPath: filepath.Join(c.cfg.CgroupParent, req.ID),
		NetnsPath:  filepath.Join(netnsutil.Dir, c.netnsName(req.ID)),
		Veth:       c.vethName(req.ID),
		Addresses:  []netip.Prefix{addr},
	}
	// Whatever already carries one of the sandbox's names belongs to
	// someone else. Checked before the pending marker, whose cleanup after
	// a crash removes everything it names.
	if err := c.untaken(r); err != nil {
		return nil, fmt.Errorf("create %s: %w", r.ID, err)
	}
	if err := c.records.putPending(r); err != nil {
		return nil, fmt.Errorf("create %s: %w", r.ID, err)
	}
	c.at("create:pending")
	made := &Record{ID: r.ID} // what this Create made: all a failure removes
	secretPut := false
	fail := func(err error) (*Created, error) {
		if terr := c.teardown(made, true); terr != nil {
			c.log.Warn("undo a failed create", "sandbox", r.ID, "error", terr)
		}
		if secretPut {
			if derr := c.secrets.Delete(r.ID); derr != nil {
				c.log.Warn("undo a failed create", "sandbox", r.ID, "error", derr)
			}
			c.dropCredentials(r.ID, "undo a failed create")
		}
		if perr := c.records.removePending(r.ID); perr != nil {
			c.log.Warn("undo a failed create: the next start finishes it", "sandbox", r.ID, "error", perr)
		}
		return nil, fmt.Errorf("create %s: %w", r.ID, err)
	}
	if err := os.Mkdir(r.CgroupPath, 0o755); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fail(fmt.Errorf("%w: cgroup %s already exists and is not this sandbox's; left untouched", ErrExists, r.CgroupPath))
		}
		return fail(fmt.Errorf("create cgroup: %w", err))
	}
	made.CgroupPath = r.CgroupPath
	if r.CgroupID, err = cgroup2.ID(r.CgroupPath); err != nil {
		return fail(err)
	}
	made.CgroupID = r.CgroupID
	c.at("create:cgroup")
	// untaken found neither the netns nor the veth, and both names are
	// derived from the id: from here on they are this Create's.
	made.NetnsPath, made.Veth = r.NetnsPath, r.Veth
	if err := c.createNetwork(r, addr); err != nil {
		return fail(err)
	}
	if r.NetnsCookie, err = netnsutil.Cookie(r.NetnsPath); err != nil {
		return fail(err)
	}
	c.at("create:network")
	secret := newSecret()
	secretPut = true
	if err := c.secrets.Put(r.ID, secret); err != nil {
		return fail(err)
	}
	r.CredentialsMount = c.cfg.CredentialsMount
	if err := c.makeCredentials(r, req.Group, secret); err != nil {
		return fail(err)
	}
	c.at("create:secret")
	if err := c.records.put(r); err != nil {
		return fail(err)
	}
	c.at("create:record")
	if err := c.register(r); err != nil {
		// Not served: take the record back so that no restart serves it.
		if rerr := c.records.remove(r.ID); rerr != nil {
			c.log.Warn("undo a failed create", "sandbox", r.ID, "error", rerr)
		}
		return fail(err)
	}
	if err := c.records.removePending(r.ID); err != nil {
		c.log.Warn("remove pending marker", "sandbox", r.ID, "error", err)
	}
	committed = true
	c.log.Info("sandbox created", "sandbox", r.ID, "app", r.App, "cgroup", r.CgroupPath, "cgroup_id", r.CgroupID,
		"netns", r.NetnsPath, "address", addr, "credentials", c.creds.Path(r.ID))
	c.scheduleCredentials(r, time.Now())
	// Committed: a caller that went away meanwhile does not undo it.
	c.firstToken(context.WithoutCancel(ctx), r)
	return &Created{Sandbox: *r, Env: c.env(r, secret), Credentials: c.credentials(r)}, nil
}

// unused refuses an id that a live sandbox or a record already has.
func (c *Controller) unused(id string) error {
	if _, ok := c.live[id]; ok {
		return fmt.Errorf("%w: %s", ErrExists, id)
	}
	has, err := c.records.exists(id)
	if err != nil {
		return err
	}
	if has {
		return fmt.Errorf("%w: %s", ErrExists, id)
	}
	return nil
}

// untaken returns an ErrExists error naming the first of r's cgroup, netns
// and veth that already exists.
func (c *Controller) untaken(r *Record) error {
	for _, p := range []struct{ what, path string }{{"cgroup", r.CgroupPath}, {"netns", r.NetnsPath}} {
		_, err := os.Lstat(p.path)
		if err == nil {
			return fmt.Errorf("%w: %s %s already exists and is not this sandbox's; left untouched", ErrExists, p.what, p.path)
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("check %s %s: %w", p.what, p.path, err)
		}
	}
	_, err := c.host.LinkByName(r.Veth)
	if err == nil {
		return fmt.Errorf("%w: veth %s already exists and is not this sandbox's; left untouched", ErrExists, r.Veth)
	}
	var notFound netlink.LinkNotFoundError
	if !errors.As(err, &notFound) {
		return fmt.Errorf("check veth %s: %w", r.Veth, err)
	}
	return nil
}

// allocate picks the lowest free address of the pool.
func (c *Controller) allocate() (netip.Prefix, error) {
	used := map[netip.Addr]bool{c.router: true}
	for _, r := range c.live {
		for _, a := range r.Addresses {
			used[a.Addr()] = true
		}
	}
	for a := c.router.Next(); c.cfg.Subnet.Contains(a); a = a.Next() {
		if !used[a] && c.cfg.Subnet.Contains(a.Next()) { // not the broadcast address
			return netip.PrefixFrom(a, a.BitLen()), nil // routed: the sandbox has no on-link neighbours
		}
	}
	return netip.Prefix{}, fmt.Errorf("address pool %s is exhausted", c.cfg.Subnet)
}

func (c *Controller) register(r *Record) error {
	if err := c.reg.Add(registry.Sandbox{ID: r.ID, App: r.App, Org: r.Org,
		CgroupPath: r.CgroupPath, CgroupID: r.CgroupID, NetnsCookie: r.NetnsCookie}); err != nil {
		return err
	}
	c.live[r.ID] = r
	delete(c.doubts, r.ID) // what was seen of an earlier sandbox of that id
	return nil
}

// AdoptRequest registers a sandbox another runtime made, by its cgroup, its
// netns, or both.
type AdoptRequest struct {
	ID         string `json:"id,omitempty"`
	App        string `json:"app"`
	Org        string `json:"org,omitempty"`
	CgroupPath string `json:"cgroup_path,omitempty"`
	NetnsPath  string `json:"netns_path,omitempty"`
	// Group is the host gid that may read the credentials files (the
	// workload's, as the host sees it); root if absent.
	Group uint32 `json:"group,omitempty"`
	// CredentialsMount is where the other runtime mounts the credentials
	// directory inside the sandbox; the daemon's default if empty.
	CredentialsMount string `json:"credentials_mount,omitempty"`
}

// adoptRecord checks an adoption against the live system and returns the
// record it would make.
func adoptRecord(req AdoptRequest) (*Record, error) {
	if req.CgroupPath == "" && req.NetnsPath == "" {
		return nil, fmt.Errorf("%w: adopt needs a cgroup path, a netns path, or both", ErrInvalid)
	}
	r := &Record{ID: req.ID, App: req.App, Org: req.Org, Created: time.Now().UTC(), CredentialsMount: req.CredentialsMount}
	if r.CredentialsMount != "" {
		if err := checkMount(r.CredentialsMount); err != nil {
			return nil, err
		}
	}
	if req.CgroupPath != "" {
		root, _ := cgroup2.Root()
		p := filepath.Clean(req.CgroupPath)
		ok, err := cgroup2.IsCgroup2(p)
		if !filepath.IsAbs(p) || !cgroup2.Within(root, p) || p == filepath.Clean(root) || err != nil || !ok {
			return nil, fmt.Errorf("%w: cgroup path %q is not a cgroup below the cgroup2 root %s", ErrInvalid, req.CgroupPath, root)
		}
		r.CgroupPath = p
		if r.CgroupID, err = cgroup2.ID(p); err != nil {
			return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
		}
	}
	if req.NetnsPath != "" {
		if !netnsutil.IsNetns(req.NetnsPath) {
			return nil, fmt.Errorf("%w: %q is not a network namespace", ErrInvalid, req.NetnsPath)
		}
		r.NetnsPath = req.NetnsPath
		var err error
		if r.NetnsCookie, err = netnsutil.Cookie(req.NetnsPath); err != nil {
			return nil, err
		}
	}
	return r, nil
}

// Adopt registers an existing sandbox and hands back its secret and
// environment. Nothing is created.
func (c *Controller) Adopt(ctx context.Context, req AdoptRequest) (*Created, error) {
	if req.ID == "" {
		req.ID = newID()
	}
	if err := validate(req.ID, req.App, req.Org); err != nil {
		return nil, err
	}
	r, err := adoptRecord(req)
	if err != nil {
		return nil, err
	}
	if r.CredentialsMount == "" {
		r.CredentialsMount = c.cfg.CredentialsMount
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := c.unused(r.ID); err != nil {
		return nil, err
	}
	if err := c.reserve(ctx, r.ID, "adopt"); err != nil {
		return nil, fmt.Errorf("adopt %s: %w", r.ID, err)
	}
	// A secret without a record is swept at the next start, so the secret
	// goes first and the record commits the adoption.
	secret := newSecret()
	if err := c.secrets.Put(r.ID, secret); err != nil {
		c.release(r.ID, "undo a failed adoption")
		return nil, err
	}
	undo := func(what string, err error) {
		if err != nil {
			c.log.Warn("undo a failed adoption: "+what, "sandbox", r.ID, "error", err)
		}
	}
	if err := c.makeCredentials(r, req.Group, secret); err != nil {
		undo("delete secret", c.secrets.Delete(r.ID))
		c.dropCredentials(r.ID, "undo a failed adoption")
		c.release(r.ID, "undo a failed adoption")
		return nil, err
	}
	if err := c.records.put(r); err != nil {
		undo("delete secret", c.secrets.Delete(r.ID))
		c.dropCredentials(r.ID, "undo a failed adoption")
		c.release(r.ID, "undo a failed adoption")
		return nil, err
	}
	if err := c.register(r); err != nil {
		undo("delete secret", c.secrets.Delete(r.ID))
		c.dropCredentials(r.ID, "undo a failed adoption")
		undo("remove record", c.records.remove(r.ID))
		c.release(r.ID, "undo a failed adoption")
		return nil, fmt.Errorf("%w: %v", ErrExists, err)
	}
	c.log.Info("sandbox adopted", "sandbox", r.ID, "app", r.App, "cgroup", r.CgroupPath, "cgroup_id", r.CgroupID, "netns", r.NetnsPath,
		"credentials", c.creds.Path(r.ID), "credentials_mount", r.CredentialsMount)
	c.warnSharedL2(r)
	c.scheduleCredentials(r, time.Now())
	// Committed: a caller that went away meanwhile does not undo it.
	c.firstToken(context.WithoutCancel(ctx), r)
	return &Created{Sandbox: *r, Env: c.env(r, secret), Credentials: c.credentials(r)}, nil
}

// Delete revokes a sandbox (its secret is durably gone before anything
// else) and, for a sandbox created here, removes its veth, netns and cgroup.
// Tasks still running in the cgroup are killed when kill is set; otherwise
// Delete refuses with ErrBusy and changes nothing.
func (c *Controller) Delete(ctx context.Context, id string, kill bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return err
	}
	r, ok := c.live[id]
	if !ok {
		return fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	if r.Owned && !kill && r.CgroupPath != "" {
		busy, err := cgroup2.Populated(r.CgroupPath)
		if err != nil && !missing(err) {
			return fmt.Errorf("delete %s: cannot tell whether tasks still run in it: %w", id, err)
		}
		if busy {
			return fmt.Errorf("%w: %s (delete with kill to stop them)", ErrBusy, id)
		}
	}
	if err := c.secrets.Delete(id); err != nil {
		return fmt.Errorf("revoke %s: %w", id, err)
	}
	c.at("delete:revoked")
	c.reg.Remove(id)
	delete(c.live, id)
	delete(c.doubts, id)
	c.dropCredentials(id, "delete")
	if r.Owned {
		if err := c.teardown(r, kill); err != nil {
			c.log.Warn("tear down sandbox", "sandbox", id, "error", err)
		}
	}
	c.at("delete:teardown")
	if err := c.records.remove(id); err != nil {
		return fmt.Errorf("remove record of %s: %w", id, err)
	}
	c.release(id, "delete")
	c.log.Info("sandbox deleted", "sandbox", id)
	return nil
}

// reserve claims id in the fleet (see Config.IDs) for a create or an
// adopt (doing); a no-op on a single host.
func (c *Controller) reserve(ctx context.Context, id, doing string) error {
	if c.cfg.IDs == nil {
		return nil
	}
	err := c.cfg.IDs.Reserve(ctx, id)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, ErrIDsUnavailable):
		c.log.Warn(doing+" refused: the sandbox id cannot be reserved, fleet store unreachable (running sandboxes keep getting tokens)", "sandbox", id, "error", err)
		return fmt.Errorf("%w: %s refused, the sandbox id cannot be reserved (sandboxes already running keep getting tokens): %v", ErrIDsUnavailable, doing, err)
	case errors.Is(err, ErrHeld):
		c.log.Warn(doing+" refused: sandbox id held by another node", "sandbox", id, "error", err)
		return err
	}
	return fmt.Errorf("reserve the sandbox id in the fleet: %w", err)
}

// release gives id back to the fleet once no sandbox of it is left here,
// with mu held (or during the start). A failure leaves the id held by this
// node (a create of it here succeeds; elsewhere it is refused) and is
// logged; Run retries it (retryReleases).
func (c *Controller) release(id, doing string) {
	if c.cfg.IDs == nil {
		return
	}
	// The caller's context may be gone: the sandbox is, and so must its
	// reservation be.
	if err := c.cfg.IDs.Release(context.Background(), id); err != nil {
		c.unreleased[id] = true
		c.log.Warn(doing+": release the sandbox id in the fleet; it stays held by this node until a retry succeeds", "sandbox", id, "error", err)
		return
	}
	delete(c.unreleased, id)
}

// retryReleases retries the releases that failed, for ids no sandbox here
// has taken again, until one fails (the store is still out of reach).
func (c *Controller) retryReleases(ctx context.Context) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for id := range c.unreleased {
		if ctx.Err() != nil {
			return
		}
		if _, ok := c.live[id]; ok {
			delete(c.unreleased, id) // a sandbox of this id holds it rightly
			continue
		}
		if err := c.cfg.IDs.Release(ctx, id); err != nil {
			return
		}
		delete(c.unreleased, id)
		c.log.Info("sandbox id released in the fleet after a failed release", "sandbox", id)
	}
}

// reserveConcurrency bounds the reservations reserveLive has in flight.
const reserveConcurrency = 16

// reserveLive re-reserves the ids of the live sandboxes, so that a
// reservation lost (or a fleet joined after they were made) is held again.
// One it cannot reserve is kept and logged: it runs here already. It runs
// beside the token server rather than before it (thousands of sandboxes
// are thousands of etcd requests), holding the lock only to check that a
// sandbox it reserved was not deleted meanwhile, whose id it gives back.
func (c *Controller) reserveLive(ctx context.Context) {
	if c.cfg.IDs == nil {
		return
	}
	c.mu.Lock()
	ids := make([]string, 0, len(c.live))
	for id := range c.live {
		ids = append(ids, id)
	}
	c.mu.Unlock()
	start := time.Now()
	var wg sync.WaitGroup
	sem := make(chan struct{}, reserveConcurrency)
	for _, id := range ids {
		if ctx.Err() != nil {
			break
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			err := c.cfg.IDs.Reserve(ctx, id)
			if err != nil && ctx.Err() == nil {
				level := slog.LevelWarn
				if errors.Is(err, ErrHeld) {
					// Two nodes run a sandbox under one id: an
					// operator must decide which one goes.
					level = slog.LevelError
				}
				c.log.Log(ctx, level, "cannot reserve the sandbox id of a sandbox running here; kept", "sandbox", id, "error", err)
			}
			if err != nil {
				return
			}
			c.mu.Lock()
			defer c.mu.Unlock()
			if _, ok := c.live[id]; !ok {
				c.release(id, "deleted while its id was reserved again")
			}
		}()
	}
	wg.Wait()
	c.log.Info("sandbox ids reserved in the fleet", "sandboxes", len(ids), "took", time.Since(start))
}

// List returns the live sandboxes, by id.
func (c *Controller) List() []Record {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]Record, 0, len(c.live))
	for _, r := range c.live {
		out = append(out, *r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Get returns one live sandbox.
func (c *Controller) Get(id string) (Record, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r, ok := c.live[id]
	if !ok {
		return Record{}, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	return *r, nil
}

// rebuild turns the records on disk and the live kernel state into the
// registry: it finishes or undoes operations a crash interrupted, retires
// sandboxes whose cgroup or netns is gone (or was re-created), and logs live
// cgroups under the parent that no record names. Only definite evidence,
// seen twice, retires a sandbox (see probe): a start on a host short of
// descriptors or memory keeps every sandbox it cannot check, as recorded,
// or refuses to start; it never removes what it could not look at.
func (c *Controller) rebuild(ctx context.Context) error {
	start := time.Now()
	if err := c.finishPending(); err != nil {
		return err
	}

	recs, errs := list(c.records.dir)
	for _, err := range errs {
		if !errors.Is(err, errCorrupt) {
			// An unread record may be a live sandbox: without it, the
			// sweep below would revoke its secret.
			return fmt.Errorf("read sandbox records: %w", err)
		}
		c.log.Error("corrupt sandbox record, not trusted", "error", err)
	}
	known := map[string]bool{}
	var doubtful []*Record
	retired := 0
	for _, r := range recs {
		if err := ctx.Err(); err != nil {
			return err
		}
		known[r.ID] = true
		l := c.probeAtStart(r)
		if l.State == gone {
			c.log.Info("sandbox looks gone; looking again before retiring it", "sandbox", r.ID, "reason", l.Reason)
			doubtful = append(doubtful, r)
			continue
		}
		ok, err := c.admit(r, l)
		if err != nil {
			return err
		}
		if !ok {
			retired++
		}
	}
	// A sandbox seen gone is looked at once more before anything of it is
	// removed.
	if len(doubtful) > 0 {
		if err := c.confirmWait(ctx); err != nil {
			return err
		}
	}
	for _, r := range doubtful {
		l := c.probeAtStart(r)
		if l.State == gone {
			c.retire(r, l.Reason, true)
			retired++
			continue
		}
		c.log.Warn("sandbox looked gone at start, then did not; kept", "sandbox", r.ID, "now", l.State.String())
		ok, err := c.admit(r, l)
		if err != nil {
			return err
		}
		if !ok {
			retired++
		}
	}

	// Secrets nobody's record names: an adoption or a create cut short.
	ids, err := c.secrets.IDs()
	if err != nil {
		c.log.Warn("cannot look for secrets no record names; looked for again at the next start", "error", err)
	}
	for _, id := range ids {
		if !known[id] {
			if err := c.secrets.Delete(id); err != nil {
				c.log.Warn("remove a secret no record names", "sandbox", id, "error", err)
			}
		}
	}
	c.recoverRotations()
	now := time.Now()
	for _, r := range c.live {
		c.scheduleCredentials(r, now)
	}
	c.warnUnknown()
	c.log.Info("sandboxes rebuilt", "live", len(c.live), "retired", retired, "took", time.Since(start))
	return nil
}

// confirmDelay separates the two looks the start takes at a sandbox before
// it retires it.
const confirmDelay = 100 * time.Millisecond

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// finishPending undoes the creates a crash interrupted, from their pending
// markers. A marker whose cleanup fails stays for the next start.
func (c *Controller) finishPending() error {
	pending, errs := list(c.records.pending)
	for _, err := range errs {
		c.log.Warn("unreadable pending marker; left for the next start", "error", err)
	}
	for _, p := range pending {
		done, err := c.records.exists(p.ID)
		if err != nil {
			return fmt.Errorf("finish an interrupted create: %w", err)
		}
		if !done {
			c.log.Warn("cleaning up a create that did not finish", "sandbox", p.ID)
			if err := c.teardown(p, true); err != nil {
				c.log.Warn("clean up a create that did not finish; retried at the next start", "sandbox", p.ID, "error", err)
				continue
			}
			if err := c.secrets.Delete(p.ID); err != nil {
				c.log.Warn("clean up a create that did not finish; retried at the next start", "sandbox", p.ID, "error", err)
				continue
			}
			c.dropCredentials(p.ID, "clean up a create that did not finish")
			c.release(p.ID, "clean up a create that did not finish")
		}
		// Either Create finished and only the marker was left, or its
		// leftovers are gone.
		if err := c.records.removePending(p.ID); err != nil {
			c.log.Warn("remove pending marker", "sandbox", p.ID, "error", err)
		}
	}
	return nil
}

// probeAtStart is probe, deep, after the state directory's own evidence: a
// record whose secret is gone is a delete that a crash interrupted.
func (c *Controller) probeAtStart(r *Record) liveness {
	has, err := c.secrets.Has(r.ID)
	switch {
	case err != nil:
		return liveness{State: unknown, Object: "secret", Err: err}
	case !has:
		return liveness{State: gone, Reason: "its secret is gone: a delete was interrupted"}
	}
	return probe(r, true)
}

// admit registers a sandbox the start found alive or could not check, and
// reports whether it is live. One it could not check is registered as
// recorded, and the resync keeps looking at it.
func (c *Controller) admit(r *Record, l liveness) (bool, error) {
	switch l.State {
	case alive:
		if l.Cookie != 0 {
			r.NetnsCookie = l.Cookie
		}
	case unknown:
		c.inconclusive.Add(1)
		c.log.Warn("cannot check sandbox at start; kept as recorded", "sandbox", r.ID, "object", l.Object, "error", l.Err)
		if r.NetnsPath != "" && r.NetnsCookie == 0 {
			return false, fmt.Errorf("sandbox %s: cannot check %s (%w) and its record holds no netns cookie to serve it by; not starting rather than guessing", r.ID, l.Object, l.Err)
		}
	}
	if err := c.register(r); err != nil {
		// Two records claim one cgroup or netns: the resources are the
		// other sandbox's, so only this one's identity goes.
		c.retire(r, err.Error(), false)
		return false, nil
	}
	if l.State == unknown {
		c.doubts[r.ID] = &doubt{unknown: 1} // the resync says when it can check again
	}
	return true, nil
}

// mayBeSandbox reports whether a directory under the cgroup parent could
// be a sandbox's: its name is a sandbox id. Others (the daemon's readiness
// probe's .probe) are none of the sandboxes' business.
func mayBeSandbox(name string) bool { return secretstore.ValidID(name) }

// warnUnknown logs the cgroups under the sandbox parent and this
// instance's named netns that no live sandbox has: they are never trusted
// (nor removed: what made them is unknown).
func (c *Controller) warnUnknown() {
	cgroups := make(map[string]bool, len(c.live))
	netns := make(map[string]bool, len(c.live))
	for _, r := range c.live {
		cgroups[r.CgroupPath] = true
		netns[r.NetnsPath] = true
	}
	entries, err := os.ReadDir(c.cfg.CgroupParent)
	if err != nil {
		c.log.Warn("cannot look for cgroups no record names", "error", err)
	}
	for _, e := range entries {
		p := filepath.Join(c.cfg.CgroupParent, e.Name())
		if e.IsDir() && mayBeSandbox(e.Name()) && !cgroups[p] {
			c.log.Warn("cgroup under the sandbox parent has no record; never trusted", "cgroup", p)
		}
	}
	names, err := ListNetns(c.cfg.NetnsPrefix)
	if err != nil {
		c.log.Warn("cannot look for network namespaces no record names", "error", err)
	}
	for _, name := range names {
		if p := filepath.Join(netnsutil.Dir, name); !netns[p] {
			c.log.Warn("network namespace with this instance's prefix has no record; never trusted", "netns", p, "prefix", c.cfg.NetnsPrefix)
		}
	}
}

// retire revokes a sandbox that is gone and removes its record and, if it
// was created here and teardown is set, whatever is left of it.
func (c *Controller) retire(r *Record, why string, teardown bool) {
	c.log.Warn("sandbox retired", "sandbox", r.ID, "reason", why)
	if err := c.secrets.Delete(r.ID); err != nil {
		// The record goes all the same: a secret without a record is
		// swept at the next start, and nothing resolves to it meanwhile.
		c.log.Warn("retire sandbox: revoke its secret", "sandbox", r.ID, "error", err)
	}
	c.reg.Remove(r.ID)
	delete(c.live, r.ID)
	delete(c.doubts, r.ID)
	c.dropCredentials(r.ID, "retire sandbox")
	if r.Owned && teardown {
		if err := c.teardown(r, true); err != nil {
			c.log.Warn("retire sandbox: tear it down", "sandbox", r.ID, "error", err)
		}
	}
	if err := c.records.remove(r.ID); err != nil {
		c.log.Warn("retire sandbox: remove its record; the next start retires it again", "sandbox", r.ID, "error", err)
		return
	}
	c.release(r.ID, "retire sandbox")
}

// Run notices sandboxes that disappear underneath the controller (a cgroup
// or netns removed by another runtime) and retires them, until ctx ends. In
// a fleet it first reserves the live sandboxes' ids again (reserveLive),
// beside the resync.
func (c *Controller) Run(ctx context.Context) {
	reserved := make(chan struct{})
	go func() { defer close(reserved); c.reserveLive(ctx) }()
	defer func() { <-reserved }()
	renewing := make(chan struct{})
	go func() { defer close(renewing); c.renewCredentials(ctx) }()
	defer func() { <-renewing }()
	t := time.NewTicker(c.cfg.ResyncInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			c.Resync()
			if c.cfg.IDs != nil {
				c.retryReleases(ctx)
			}
		}
	}
}

// Resync checks every live sandbox against the kernel once, without
// entering its netns (a stat and an open each). A sandbox is retired when
// this check and the previous conclusive one both found it gone; one that
// cannot be checked is kept.
func (c *Controller) Resync() {
	c.mu.Lock()
	defer c.mu.Unlock()
	ids := make([]string, 0, len(c.live))
	for id := range c.live {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		r := c.live[id]
		c.judge(r, probe(r, false))
	}
	for id := range c.doubts {
		if _, ok := c.live[id]; !ok {
			delete(c.doubts, id)
		}
	}
}

// judge acts on one resync's check of a live sandbox.
func (c *Controller) judge(r *Record, l liveness) {
	d := c.doubts[r.ID]
	switch l.State {
	case alive:
		if d == nil {
			return
		}
		if d.unknown > 0 {
			c.log.Info("sandbox can be checked again", "sandbox", r.ID, "inconclusive_checks", d.unknown)
		}
		if d.gone != "" {
			c.log.Warn("sandbox looked gone, then alive; kept", "sandbox", r.ID, "reason", d.gone)
		}
		delete(c.doubts, r.ID)
	case unknown:
		c.inconclusive.Add(1)
		if d == nil {
			d = &doubt{}
			c.doubts[r.ID] = d
		}
		if d.unknown == 0 {
			c.log.Warn("cannot check sandbox; kept", "sandbox", r.ID, "object", l.Object, "error", l.Err)
		}
		d.unknown++
	case gone:
		if d != nil && d.gone != "" {
			c.retire(r, l.Reason, true)
			return
		}
		if d == nil {
			d = &doubt{}
			c.doubts[r.ID] = d
		}
		d.gone = l.Reason
		c.log.Info("sandbox looks gone; retired if the next check agrees", "sandbox", r.ID, "reason", l.Reason)
	}
}

// InconclusiveChecks counts the checks, at start and by the resync, that
// could not tell whether a sandbox is alive (and so kept it).
func (c *Controller) InconclusiveChecks() uint64 { return c.inconclusive.Load() }
