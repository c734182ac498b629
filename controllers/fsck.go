package controllers

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/identityd/identityd/internal/atomicfile"
	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/credsdir"
	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/secretstore"
)

// Fsck compares records, secrets, cgroups and network namespaces (only
// those of cfg's netns prefix: other instances' are none of its business)
// and returns every inconsistency it finds, as sentences; a sandbox it cannot
// check (out of descriptors, say) is reported as such, never as gone, by
// the rule the daemon uses (probe). It only reads: run it
// while the daemon is stopped or idle (an operation in flight looks like an
// inconsistency until it finishes, and the next start repairs what a crash
// left).
func Fsck(cfg Config) ([]string, error) {
	prefix, err := cfg.netnsPrefix()
	if err != nil {
		return nil, err
	}
	if cfg.CgroupParent == "" {
		root, err := cgroup2.Root()
		if err != nil {
			return nil, err
		}
		cfg.CgroupParent = filepath.Join(root, "identityd")
	}
	var problems []string
	report := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }

	dirs := recordDirs(cfg.StateDir)
	secretsDir := secretstore.Dir(cfg.StateDir)
	secrets := secretstore.At(secretsDir)
	creds := credsdir.At(credsdir.Root(cfg.StateDir))
	recs, errs := list(dirs.dir)
	for _, err := range errs {
		report("%v", err)
	}
	pending, _ := list(dirs.pending)
	// What records and pending markers name is theirs; anything else under
	// the cgroup parent or with this instance's netns prefix is not.
	cgroups := map[string]bool{}
	netns := map[string]bool{}
	for _, p := range pending {
		report("sandbox %s: a create was interrupted (the next start cleans it up)", p.ID)
		cgroups[p.CgroupPath] = true
		netns[p.NetnsPath] = true
	}
	byID := map[string]*Record{}
	for _, r := range recs {
		byID[r.ID] = r
		if has, err := secrets.Has(r.ID); err != nil {
			report("sandbox %s: cannot check its secret: %v", r.ID, err)
		} else if !has {
			report("sandbox %s: record without a secret (an interrupted delete)", r.ID)
		}
		switch l := probe(r, true); l.State {
		case gone:
			report("sandbox %s: %s", r.ID, l.Reason)
		case unknown:
			report("sandbox %s: cannot check its %s: %v", r.ID, l.Object, l.Err)
		}
		checkCredentials(r, creds, secrets, report)
		if r.Owned {
			cgroups[r.CgroupPath] = true
		}
		netns[r.NetnsPath] = true
	}
	ids, err := secrets.IDs()
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		report("cannot check the secrets: %v", err)
	}
	for _, id := range ids {
		if byID[id] == nil {
			report("secret %s has no record", id)
		}
	}
	if ids, err := creds.IDs(); err == nil {
		for _, id := range ids {
			if byID[id] == nil {
				report("credentials directory %s has no record", creds.Path(id))
			}
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		report("cannot check the credentials directories: %v", err)
	}
	if ids, err := creds.StagedIDs(); err == nil {
		for _, id := range ids {
			report("sandbox %s: a secret rotation was interrupted (the next start finishes or abandons it)", id)
		}
	}
	for _, dir := range []string{dirs.dir, dirs.pending, secretsDir} {
		temps, err := atomicfile.Temps(dir)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			report("%v", err)
		}
		for _, p := range temps {
			report("temporary file %s left by an interrupted write", p)
		}
	}
	if entries, err := os.ReadDir(cfg.CgroupParent); err == nil {
		for _, e := range entries {
			if p := filepath.Join(cfg.CgroupParent, e.Name()); e.IsDir() && mayBeSandbox(e.Name()) && !cgroups[p] {
				report("cgroup %s has no record", p)
			}
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		report("cannot check the cgroups under %s: %v", cfg.CgroupParent, err)
	}
	names, err := ListNetns(prefix)
	if err != nil {
		report("cannot check the network namespaces: %v", err)
	}
	for _, name := range names {
		if p := filepath.Join(netnsutil.Dir, name); !netns[p] {
			report("netns %s has no record", p)
		}
	}
	return problems, nil
}

// checkCredentials reports a sandbox whose secret file is missing or holds
// a secret the store does not accept.
func checkCredentials(r *Record, creds *credsdir.Dirs, secrets *secretstore.Store, report func(string, ...any)) {
	if r.CredentialsMount == "" {
		return
	}
	secret, err := creds.Secret(r.ID)
	if err != nil {
		report("sandbox %s: cannot read its secret file: %v", r.ID, err)
		return
	}
	if ok, err := secrets.Verify(r.ID, secret); err == nil && !ok {
		report("sandbox %s: its secret file holds a secret the store does not accept", r.ID)
	}
}
