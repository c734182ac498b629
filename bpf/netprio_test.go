package bpf

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/internal/sandboxtest"
)

// NetPrioEnv enables TestOwnerWithNetPrioActive. vmtest sets it for a run of
// that test alone, after every other test of the guest: net_prio stays in use
// until the kernel reboots, and on the host it would stay so.
const NetPrioEnv = "IDENTITYD_BPF_TEST_NETPRIO"

// TestOwnerWithNetPrioActive puts a cgroup v1 net_prio hierarchy to use, as
// hosts mixing cgroup v1 and v2 do. On the kernels Install accepts, a socket
// keeps its cgroup pointer beside the net_prio and net_cls data, and records
// stay attested with the right owner. (Older kernels stopped recording the
// cgroup of new sockets then, and took them for the root's.)
func TestOwnerWithNetPrioActive(t *testing.T) {
	if os.Getenv(NetPrioEnv) == "" {
		t.Skip("changes the kernel's socket cgroup accounting until reboot; run by vmtest, last in its guests")
	}
	in, _ := install(t)
	dir := t.TempDir()
	require.NoError(t, unix.Mount("identityd-test", dir, "cgroup", 0, "net_prio"), "mount a cgroup v1 net_prio hierarchy")
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	// Setting a priority is what makes the kernel give up the cgroup
	// pointers of sockets on kernels with the old union (cgroup_sk_alloc_disable).
	require.NoError(t, os.WriteFile(filepath.Join(dir, "net_prio.ifpriomap"), []byte("lo 1"), 0o644))

	w := sandboxtest.New(t)
	a := w.AddSandbox("a")
	srv := listen(t, w, fmt.Sprintf(":%d", tokenPort))
	require.NoError(t, in.SetEndpoints([]netip.AddrPort{netip.AddrPortFrom(w.Router4, tokenPort)}))
	client := a.Start(t)
	fd, err := client.Socket(4)
	require.NoError(t, err)
	_, err = client.Connect(fd, netip.AddrPortFrom(w.Router4, tokenPort))
	require.NoError(t, err)
	rec, err := in.Lookup(srv.accept())
	require.NoError(t, err, "the socket keeps a cgroup pointer of its own (Install refuses kernels without)")
	assert.Equal(t, a.CgroupID, rec.CgroupID)
	assert.Equal(t, a.NetnsCookie, rec.NetnsCookie)
}
