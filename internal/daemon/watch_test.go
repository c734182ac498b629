package daemon

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/bpf"
	"github.com/identityd/identityd/internal/cgroup2"
)

// installIn installs the programs on a cgroup of the test's own, so that
// the test can remove that cgroup from under them.
func installIn(t *testing.T) (*bpf.Installation, bpf.Options) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to load BPF programs")
	}
	root, err := cgroup2.Root()
	require.NoError(t, err)
	cg := filepath.Join(root, fmt.Sprintf("identityd-test-watch-%d", os.Getpid()))
	require.NoError(t, os.Mkdir(cg, 0o755))
	t.Cleanup(func() { os.Remove(cg) })
	opts := bpf.Options{
		PinDir:     filepath.Join(bpf.DefaultBPFFS, fmt.Sprintf("identityd-test-%d-%s", os.Getpid(), t.Name())),
		CgroupRoot: cg,
		Logger:     slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	in, err := bpf.Install(context.Background(), opts)
	require.NoError(t, err)
	t.Cleanup(func() {
		in.Close()
		assert.NoError(t, bpf.Uninstall(context.Background(), opts))
	})
	return in, opts
}

func TestWatchRepairsAnUninstall(t *testing.T) {
	in, opts := installIn(t)
	reg := prometheus.NewRegistry()
	w, err := newAttributionWatch(in, nil, slog.New(slog.NewTextHandler(io.Discard, nil)), reg)
	require.NoError(t, err)

	w.check(context.Background())
	assert.NoError(t, w.Err())
	assert.Zero(t, testutil.CollectAndCount(w.repairs), "nothing to repair")

	require.NoError(t, bpf.Uninstall(context.Background(), opts))
	w.check(context.Background())
	assert.NoError(t, w.Err())
	assert.Equal(t, 1.0, testutil.ToFloat64(w.repairs.WithLabelValues("ok")))
	assert.NoError(t, in.Check())
}

func TestWatchReportsAFailedRepair(t *testing.T) {
	in, opts := installIn(t)
	w, err := newAttributionWatch(in, nil, slog.New(slog.NewTextHandler(io.Discard, nil)), prometheus.NewRegistry())
	require.NoError(t, err)

	// The cgroup the programs were attached to is gone: nothing can be
	// attached there again.
	require.NoError(t, os.Remove(opts.CgroupRoot))
	// The kernel releases a removed cgroup's programs from a workqueue.
	require.Eventually(t, func() bool { return in.Check() != nil }, 10*time.Second, 10*time.Millisecond)
	w.check(context.Background())
	assert.Error(t, w.Err(), "readiness reports the failed repair")
	assert.Equal(t, 1.0, testutil.ToFloat64(w.repairs.WithLabelValues("failed")))
}
