package controllers

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/sandboxtest"
	"github.com/identityd/identityd/internal/secretstore"
)

// populate writes n records of adopted, cgroup-only sandboxes with real
// cgroups, as a daemon that ran for a while would have left them. Files are
// written without fsync: the subject is the rebuild, not the setup.
func populate(tb testing.TB, cfg Config, n int) []string {
	tb.Helper()
	store, err := secretstore.Open(secretstore.Dir(cfg.StateDir))
	require.NoError(tb, err)
	require.NoError(tb, store.Put("template", "s3cret"))
	template, err := store.Path("template")
	require.NoError(tb, err)
	secret, err := os.ReadFile(template)
	require.NoError(tb, err)
	require.NoError(tb, store.Delete("template"))
	records, err := openRecords(cfg.StateDir)
	require.NoError(tb, err)
	require.NoError(tb, os.MkdirAll(cfg.CgroupParent, 0o755))
	ids := make([]string, n)
	for i := range n {
		id := fmt.Sprintf("s%05d", i)
		ids[i] = id
		dir := filepath.Join(cfg.CgroupParent, id)
		require.NoError(tb, os.Mkdir(dir, 0o755))
		cg, err := cgroup2.ID(dir)
		require.NoError(tb, err)
		b, err := json.Marshal(Record{ID: id, App: "app", CgroupPath: dir, CgroupID: cg, Created: time.Now()})
		require.NoError(tb, err)
		require.NoError(tb, os.WriteFile(filepath.Join(records.dir, id+".json"), b, 0o600))
		p, err := store.Path(id)
		require.NoError(tb, err)
		require.NoError(tb, os.WriteFile(p, secret, 0o600))
	}
	return ids
}

func TestRebuildAtScale(t *testing.T) {
	for _, n := range []int{100, 1000, 10000} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			w := sandboxtest.New(t)
			cfg := testConfig(t, w)
			ids := populate(t, cfg, n)
			t0 := time.Now()
			c := start(t, cfg)
			t.Logf("rebuilt %d sandboxes in %s", n, time.Since(t0))
			require.Equal(t, n, c.Len())
			last, err := c.Get(ids[n-1])
			require.NoError(t, err)
			sb, err := c.reg.Resolve(last.CgroupID, 0)
			require.NoError(t, err)
			require.Equal(t, ids[n-1], sb.ID)
		})
	}
}

// BenchmarkRebuild measures a controller start over N live sandboxes
// against the floor of stat-ing N cgroup directories and reading N records,
// measured alternately in the same run.
//
//	go test -run '^$' -bench Rebuild -benchtime 5x ./controllers/
//
// Reported: ns per rebuild and per floor, their ratio (target <= 3), and
// the heap the rebuilt controller holds.
func BenchmarkRebuild(b *testing.B) {
	for _, n := range []int{100, 1000, 10000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			w := sandboxtest.New(b)
			cfg := Config{
				StateDir:     filepath.Join(b.TempDir(), "state"),
				CgroupParent: filepath.Join(w.CgroupDir, "sandboxes"),
				HostNetns:    w.HostNetns,
				NetnsPrefix:  testNetnsPrefix(b),
				Logger:       quiet,
			}
			ids := populate(b, cfg, n)
			var rebuild, floor time.Duration
			var heap uint64
			for b.Loop() {
				t0 := time.Now()
				for _, id := range ids {
					if _, err := cgroup2.ID(filepath.Join(cfg.CgroupParent, id)); err != nil {
						b.Fatal(err)
					}
					if _, err := os.ReadFile(filepath.Join(recordDirs(cfg.StateDir).dir, id+".json")); err != nil {
						b.Fatal(err)
					}
				}
				floor += time.Since(t0)

				var before, after runtime.MemStats
				runtime.GC()
				runtime.ReadMemStats(&before)
				t0 = time.Now()
				c, err := New(context.Background(), cfg)
				if err != nil {
					b.Fatal(err)
				}
				rebuild += time.Since(t0)
				runtime.GC()
				runtime.ReadMemStats(&after)
				heap = after.HeapAlloc - before.HeapAlloc
				if c.Len() != n {
					b.Fatalf("rebuilt %d of %d", c.Len(), n)
				}
				c.Close()
			}
			b.ReportMetric(float64(rebuild.Nanoseconds())/float64(b.N), "ns/rebuild")
			b.ReportMetric(float64(floor.Nanoseconds())/float64(b.N), "ns/floor")
			b.ReportMetric(float64(rebuild)/float64(floor), "ratio")
			b.ReportMetric(float64(heap), "heap-bytes")
			b.ReportMetric(float64(vmRSS()), "process-rss-bytes")
		})
	}
}

// vmRSS is the resident set of this process, from /proc/self/status.
func vmRSS() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			var kb int64
			fmt.Sscanf(strings.TrimSpace(v), "%d", &kb)
			return kb * 1024
		}
	}
	return 0
}
