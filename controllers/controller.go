package controllers

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/identityd/identityd/internal/cgroup2"
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
)

// Config says where the controller keeps its state and builds sandboxes.
type Config struct {
	// StateDir holds records and secrets (0700).
	StateDir string
	// CgroupParent is where sandbox cgroups are created; default
	// <cgroup2 root>/identityd.
	CgroupParent string
	// HostNetns is the netns holding the bridge (a path); empty means the
	// controller's own. Tests point it at a namespace they made.
	HostNetns string
	// Bridge is the bridge sandboxes are joined to; default identityd0.
	Bridge string
	// Subnet is the sandbox address pool; its first address is the router
	// (on the bridge). Default 10.88.0.0/16.
	Subnet netip.Prefix
	// TokenPort is where the token endpoint listens on the router; 7123.
	TokenPort int
	// Issuer is handed to sandboxes as MIREN_OIDC_ISSUER_URL.
	Issuer string
	// ResyncInterval bounds how long a sandbox removed underneath the
	// controller stays registered; default 2s.
	ResyncInterval time.Duration
	Logger         *slog.Logger `json:"-"`
	// Fault, if set, is called at named points inside Create and Delete;
	// crash tests kill the process there.
	Fault func(point string) `json:"-"`
}

// Controller owns the sandboxes' lifecycle and is the token server's
// registry.
type Controller struct {
	cfg         Config
	log         *slog.Logger
	reg         *registry.Index
	secrets     *secretstore.Store
	records     *recordStore
	host        *netlink.Handle
	bridgeIndex int
	router      netip.Addr

	mu   sync.Mutex // serialises lifecycle operations
	live map[string]*Record
}

// New opens the state, rebuilds the sandboxes from their records and the
// live cgroups and network namespaces, and returns a ready controller.
func New(ctx context.Context, cfg Config) (*Controller, error) {
	root, err := cgroup2.Root()
	if err != nil {
		return nil, err
	}
	if cfg.CgroupParent == "" {
		cfg.CgroupParent = filepath.Join(root, "identityd")
	}
	if cfg.Bridge == "" {
		cfg.Bridge = "identityd0"
	}
	if !cfg.Subnet.IsValid() {
		cfg.Subnet = netip.MustParsePrefix("10.88.0.0/16")
	}
	if cfg.TokenPort == 0 {
		cfg.TokenPort = 7123
	}
	if cfg.ResyncInterval == 0 {
		cfg.ResyncInterval = 2 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Fault == nil {
		cfg.Fault = func(string) {}
	}
	cfg.Subnet = cfg.Subnet.Masked()
	c := &Controller{cfg: cfg, log: cfg.Logger, live: map[string]*Record{}, router: cfg.Subnet.Addr().Next()}
	if err := os.MkdirAll(cfg.CgroupParent, 0o755); err != nil {
		return nil, fmt.Errorf("create cgroup parent: %w", err)
	}
	if c.reg, err = registry.New(root); err != nil {
		return nil, err
	}
	if c.secrets, err = secretstore.Open(filepath.Join(cfg.StateDir, "secrets")); err != nil {
		return nil, err
	}
	if c.records, err = openRecords(cfg.StateDir); err != nil {
		return nil, err
	}
	if c.host, err = netnsutil.Handle(cfg.HostNetns); err != nil {
		return nil, err
	}
	if err := c.ensureBridge(); err != nil {
		return nil, err
	}
	if err := c.rebuild(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// Close releases the controller's handles; sandboxes are left as they are.
func (c *Controller) Close() error {
	c.host.Close()
	return c.reg.Close()
}

// Resolve and Len make the controller the token server's registry.
func (c *Controller) Resolve(cgroupID, netnsCookie uint64) (registry.Sandbox, error) {
	return c.reg.Resolve(cgroupID, netnsCookie)
}

// Len returns the number of live sandboxes.
func (c *Controller) Len() int { return c.reg.Len() }

// Router returns the router address sandboxes call.
func (c *Controller) Router() netip.Addr { return c.router }

// Secrets is the store the token server checks bearers against.
func (c *Controller) Secrets() *secretstore.Store { return c.secrets }

// Env is the environment to inject into a sandbox's processes.
func (c *Controller) Env(secret string) map[string]string {
	return map[string]string{
		"MIREN_IDENTITY_TOKEN_URL":    fmt.Sprintf("http://%s/v1/token", netip.AddrPortFrom(c.router, uint16(c.cfg.TokenPort))),
		"MIREN_IDENTITY_TOKEN_SECRET": secret,
		"MIREN_OIDC_ISSUER_URL":       c.cfg.Issuer,
	}
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
}

// Created is what Create and Adopt return: the record, and the environment
// (with the secret) to inject into the sandbox's processes.
type Created struct {
	Sandbox Record            `json:"sandbox"`
	Env     map[string]string `json:"env"`
}

// Create makes a sandbox: a cgroup, a netns joined to the bridge, and a
// fresh secret. When it returns, the record and the secret are durable.
func (c *Controller) Create(ctx context.Context, req CreateRequest) (*Created, error) {
	if req.ID == "" {
		req.ID = newID()
	}
	if err := validate(req.ID, req.App, req.Org); err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.live[req.ID]; ok || c.records.exists(req.ID) {
		return nil, fmt.Errorf("%w: %s", ErrExists, req.ID)
	}
	addr, err := c.allocate()
	if err != nil {
		return nil, err
	}
	r := &Record{
		ID: req.ID, App: req.App, Org: req.Org, Owned: true, Created: time.Now().UTC(),
		CgroupPath: filepath.Join(c.cfg.CgroupParent, req.ID),
		NetnsPath:  filepath.Join(netnsutil.Dir, netnsName(req.ID)),
		Veth:       vethName(req.ID),
		Addresses:  []netip.Prefix{addr},
	}
	// The marker names everything below, so a crash anywhere until the
	// record exists is cleaned up at the next start.
	if err := c.records.putPending(r); err != nil {
		return nil, fmt.Errorf("create %s: %w", r.ID, err)
	}
	c.cfg.Fault("create:pending")
	fail := func(err error) (*Created, error) {
		c.teardown(r, true)
		c.secrets.Delete(r.ID)
		c.records.removePending(r.ID)
		return nil, fmt.Errorf("create %s: %w", r.ID, err)
	}
	if err := os.Mkdir(r.CgroupPath, 0o755); err != nil {
		return fail(fmt.Errorf("create cgroup: %w", err))
	}
	if r.CgroupID, err = cgroup2.ID(r.CgroupPath); err != nil {
		return fail(err)
	}
	c.cfg.Fault("create:cgroup")
	if err := c.createNetwork(r, addr); err != nil {
		return fail(err)
	}
	if r.NetnsCookie, err = netnsutil.Cookie(r.NetnsPath); err != nil {
		return fail(err)
	}
	c.cfg.Fault("create:network")
	secret := newSecret()
	if err := c.secrets.Put(r.ID, secret); err != nil {
		return fail(err)
	}
	c.cfg.Fault("create:secret")
	if err := c.records.put(r); err != nil {
		return fail(err)
	}
	c.cfg.Fault("create:record")
	if err := c.register(r); err != nil {
		return nil, err
	}
	if err := c.records.removePending(r.ID); err != nil {
		c.log.Warn("remove pending marker", "sandbox", r.ID, "error", err)
	}
	c.log.Info("sandbox created", "sandbox", r.ID, "app", r.App, "cgroup", r.CgroupPath, "cgroup_id", r.CgroupID,
		"netns", r.NetnsPath, "address", addr)
	return &Created{Sandbox: *r, Env: c.Env(secret)}, ctx.Err()
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
			return netip.PrefixFrom(a, c.cfg.Subnet.Bits()), nil
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
}

// adoptRecord checks an adoption against the live system and returns the
// record it would make.
func adoptRecord(req AdoptRequest) (*Record, error) {
	if req.CgroupPath == "" && req.NetnsPath == "" {
		return nil, fmt.Errorf("%w: adopt needs a cgroup path, a netns path, or both", ErrInvalid)
	}
	r := &Record{ID: req.ID, App: req.App, Org: req.Org, Created: time.Now().UTC()}
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
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.live[r.ID]; ok || c.records.exists(r.ID) {
		return nil, fmt.Errorf("%w: %s", ErrExists, r.ID)
	}
	// A secret without a record is swept at the next start, so the secret
	// goes first and the record commits the adoption.
	secret := newSecret()
	if err := c.secrets.Put(r.ID, secret); err != nil {
		return nil, err
	}
	if err := c.records.put(r); err != nil {
		c.secrets.Delete(r.ID)
		return nil, err
	}
	if err := c.register(r); err != nil {
		c.secrets.Delete(r.ID)
		c.records.remove(r.ID)
		return nil, fmt.Errorf("%w: %v", ErrExists, err)
	}
	c.log.Info("sandbox adopted", "sandbox", r.ID, "app", r.App, "cgroup", r.CgroupPath, "cgroup_id", r.CgroupID, "netns", r.NetnsPath)
	return &Created{Sandbox: *r, Env: c.Env(secret)}, ctx.Err()
}

// Delete revokes a sandbox (its secret is durably gone before anything
// else) and, for a sandbox created here, removes its veth, netns and cgroup.
// Tasks still running in the cgroup are killed when kill is set; otherwise
// Delete refuses with ErrBusy and changes nothing.
func (c *Controller) Delete(ctx context.Context, id string, kill bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	r, ok := c.live[id]
	if !ok {
		return fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	if r.Owned && !kill && r.CgroupPath != "" && populated(r.CgroupPath) {
		return fmt.Errorf("%w: %s (delete with kill to stop them)", ErrBusy, id)
	}
	if err := c.secrets.Delete(id); err != nil {
		return fmt.Errorf("revoke %s: %w", id, err)
	}
	c.cfg.Fault("delete:revoked")
	c.reg.Remove(id)
	delete(c.live, id)
	if r.Owned {
		if err := c.teardown(r, kill); err != nil {
			c.log.Warn("tear down sandbox", "sandbox", id, "error", err)
		}
	}
	c.cfg.Fault("delete:teardown")
	if err := c.records.remove(id); err != nil {
		return fmt.Errorf("remove record of %s: %w", id, err)
	}
	c.log.Info("sandbox deleted", "sandbox", id)
	return ctx.Err()
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
// cgroups under the parent that no record names.
func (c *Controller) rebuild(ctx context.Context) error {
	start := time.Now()
	pending, errs := list(c.records.pending)
	for _, err := range errs {
		c.log.Warn("unreadable pending marker", "error", err)
	}
	for _, p := range pending {
		if c.records.exists(p.ID) {
			c.records.removePending(p.ID) // Create finished; only the marker was left
			continue
		}
		c.log.Warn("cleaning up a create that did not finish", "sandbox", p.ID)
		c.teardown(p, true)
		c.secrets.Delete(p.ID)
		c.records.removePending(p.ID)
	}

	recs, errs := list(c.records.dir)
	for _, err := range errs {
		c.log.Error("unreadable sandbox record, not trusted", "error", err)
	}
	known := map[string]bool{}
	retired := 0
	for _, r := range recs {
		if err := ctx.Err(); err != nil {
			return err
		}
		known[r.ID] = true
		if why := c.check(r); why != "" {
			c.retire(r, why)
			retired++
			continue
		}
		if err := c.register(r); err != nil {
			c.retire(r, err.Error())
			retired++
		}
	}

	// Secrets nobody's record names: an adoption or a create cut short.
	if entries, err := os.ReadDir(filepath.Join(c.cfg.StateDir, "secrets")); err == nil {
		for _, e := range entries {
			id, ok := cutSuffix(e.Name(), ".json")
			if ok && !known[id] {
				c.secrets.Delete(id)
			}
		}
	}
	cgroups := make(map[string]bool, len(c.live))
	for _, r := range c.live {
		cgroups[r.CgroupPath] = true
	}
	if entries, err := os.ReadDir(c.cfg.CgroupParent); err == nil {
		for _, e := range entries {
			p := filepath.Join(c.cfg.CgroupParent, e.Name())
			if e.IsDir() && !cgroups[p] {
				c.log.Warn("cgroup under the sandbox parent has no record; never trusted", "cgroup", p)
			}
		}
	}
	c.log.Info("sandboxes rebuilt", "live", len(c.live), "retired", retired, "took", time.Since(start))
	return nil
}

func cutSuffix(s, suffix string) (string, bool) {
	if len(s) > len(suffix) && s[len(s)-len(suffix):] == suffix {
		return s[:len(s)-len(suffix)], true
	}
	return "", false
}

// check says why r is no longer a live sandbox, or "" if it is; it
// refreshes r's netns cookie from the live netns.
func (c *Controller) check(r *Record) string {
	if has, err := c.secrets.Has(r.ID); err == nil && !has {
		return "its secret is gone: a delete was interrupted"
	}
	if r.CgroupPath != "" {
		id, err := cgroup2.ID(r.CgroupPath)
		switch {
		case err != nil:
			return "its cgroup is gone"
		case id != r.CgroupID:
			return "its cgroup was re-created (id " + strconv.FormatUint(id, 10) + ", recorded " + strconv.FormatUint(r.CgroupID, 10) + ")"
		}
	}
	if r.NetnsPath != "" {
		if !netnsutil.IsNetns(r.NetnsPath) {
			return "its netns is gone"
		}
		cookie, err := netnsutil.Cookie(r.NetnsPath)
		if err != nil {
			return "its netns cannot be entered: " + err.Error()
		}
		r.NetnsCookie = cookie
	}
	return ""
}

// retire revokes a sandbox that is gone and removes its record and, if it
// was created here, whatever is left of it.
func (c *Controller) retire(r *Record, why string) {
	c.log.Warn("sandbox retired", "sandbox", r.ID, "reason", why)
	c.secrets.Delete(r.ID)
	c.reg.Remove(r.ID)
	delete(c.live, r.ID)
	if r.Owned {
		c.teardown(r, true)
	}
	c.records.remove(r.ID)
}

// Run notices sandboxes that disappear underneath the controller (a cgroup
// or netns removed by another runtime) and retires them, until ctx ends.
func (c *Controller) Run(ctx context.Context) {
	t := time.NewTicker(c.cfg.ResyncInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			c.Resync()
		}
	}
}

// Resync checks every live sandbox against the kernel once.
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
		if why := c.checkQuick(r); why != "" {
			c.retire(r, why)
		}
	}
}

// checkQuick is check without re-entering the netns: a stat each.
func (c *Controller) checkQuick(r *Record) string {
	if r.CgroupPath != "" {
		if id, err := cgroup2.ID(r.CgroupPath); err != nil || id != r.CgroupID {
			return "its cgroup is gone or was re-created"
		}
	}
	if r.NetnsPath != "" && !netnsutil.IsNetns(r.NetnsPath) {
		return "its netns is gone"
	}
	return ""
}
