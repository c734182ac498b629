package controllers

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/netnsutil"
)

// Fsck compares records, secrets, cgroups and network namespaces and
// returns every inconsistency it finds, as sentences; a sandbox it cannot
// check (out of descriptors, say) is reported as such, never as gone, by
// the rule the daemon uses (probe). It only reads: run it
// while the daemon is stopped or idle (an operation in flight looks like an
// inconsistency until it finishes, and the next start repairs what a crash
// left).
func Fsck(cfg Config) ([]string, error) {
	if cfg.CgroupParent == "" {
		root, err := cgroup2.Root()
		if err != nil {
			return nil, err
		}
		cfg.CgroupParent = filepath.Join(root, "identityd")
	}
	var problems []string
	report := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }

	recs, errs := list(filepath.Join(cfg.StateDir, "sandboxes"))
	for _, err := range errs {
		report("%v", err)
	}
	pending, _ := list(filepath.Join(cfg.StateDir, "pending"))
	for _, p := range pending {
		report("sandbox %s: a create was interrupted (the next start cleans it up)", p.ID)
	}
	byID := map[string]*Record{}
	owned := map[string]bool{} // cgroup paths and netns names of owned sandboxes
	for _, r := range recs {
		byID[r.ID] = r
		if _, err := os.Stat(filepath.Join(cfg.StateDir, "secrets", r.ID+".json")); missing(err) {
			report("sandbox %s: record without a secret (an interrupted delete)", r.ID)
		} else if err != nil {
			report("sandbox %s: cannot check its secret: %v", r.ID, err)
		}
		switch l := probe(r, true); l.State {
		case gone:
			report("sandbox %s: %s", r.ID, l.Reason)
		case unknown:
			report("sandbox %s: cannot check its %s: %v", r.ID, l.Object, l.Err)
		}
		if r.Owned {
			owned[r.CgroupPath] = true
			owned[filepath.Base(r.NetnsPath)] = true
		}
	}
	if entries, err := os.ReadDir(filepath.Join(cfg.StateDir, "secrets")); err == nil {
		for _, e := range entries {
			if id, ok := strings.CutSuffix(e.Name(), ".json"); ok && byID[id] == nil {
				report("secret %s has no record", id)
			}
			if strings.HasPrefix(e.Name(), ".tmp-") {
				report("temporary file %s left by an interrupted write", e.Name())
			}
		}
	}
	if entries, err := os.ReadDir(cfg.CgroupParent); err == nil {
		for _, e := range entries {
			if p := filepath.Join(cfg.CgroupParent, e.Name()); e.IsDir() && !owned[p] {
				report("cgroup %s has no record", p)
			}
		}
	}
	if entries, err := os.ReadDir(netnsutil.Dir); err == nil {
		for _, e := range entries {
			id, ok := strings.CutPrefix(e.Name(), "identityd-")
			if ok && !owned[e.Name()] && byID[id] == nil {
				report("netns %s has no record", filepath.Join(netnsutil.Dir, e.Name()))
			}
		}
	}
	return problems, nil
}
