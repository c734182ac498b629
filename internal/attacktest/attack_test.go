package attacktest_test

import (
	"fmt"
	"net/http"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/internal/attacktest"
	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/sandboxtest"
)

func TestMain(m *testing.M) {
	sandboxtest.RunChildIfRequested()
	m.Run()
}

// victimWorld is a bridge world with victim A, attacker B, and an HTTP
// server in the host netns that answers with the caller's address as it
// saw it.
func victimWorld(t *testing.T) (w *sandboxtest.World, a, b *sandboxtest.Sandbox, endpoint netip.AddrPort) {
	w = sandboxtest.New(t)
	a, b = w.AddSandbox("a"), w.AddSandbox("b")
	require.NoError(t, netnsutil.SetSysctl(b.Netns, "net/ipv4/conf/all/forwarding", "0"))
	endpoint = netip.AddrPortFrom(w.Router4, 8123)
	ln, err := w.Listen("tcp", endpoint.String())
	require.NoError(t, err)
	srv := &http.Server{Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		fmt.Fprint(rw, r.RemoteAddr)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return w, a, b, endpoint
}

// neighbor returns the hardware address the netns at path has for ip.
func neighbor(t *testing.T, path string, ip netip.Addr) string {
	h, err := netnsutil.Handle(path)
	require.NoError(t, err)
	defer h.Close()
	neighs, err := h.NeighList(0, 0)
	require.NoError(t, err)
	for _, n := range neighs {
		if a, ok := netip.AddrFromSlice(n.IP); ok && a.Unmap() == ip {
			return n.HardwareAddr.String()
		}
	}
	return ""
}

func mac(t *testing.T, path string) string {
	h, err := netnsutil.Handle(path)
	require.NoError(t, err)
	defer h.Close()
	l, err := h.LinkByName("eth0")
	require.NoError(t, err)
	return l.Attrs().HardwareAddr.String()
}

// TestHijackUnderVictimsTuple: B poisons the host's and A's ARP caches,
// swallows A's SYN, and completes a handshake with raw packets under A's
// 4-tuple; a real kernel's server answers B's request and saw A's address
// and port. This is the tool the identityd attack tests rely on.
func TestHijackUnderVictimsTuple(t *testing.T) {
	w, a, b, endpoint := victimWorld(t)
	ca, cb := a.Start(t), b.Start(t)
	for _, p := range []attacktest.PoisonSpec{{Claim: a.Addr4, Target: w.Router4}, {Claim: w.Router4, Target: a.Addr4}} {
		p.Duration = 20 * time.Second
		id, err := cb.Poison(p)
		require.NoError(t, err)
		defer func() {
			var r attacktest.PoisonReport
			require.NoError(t, cb.StopAttack(id, &r))
			t.Logf("poisoned %s about %s: %+v", p.Target, p.Claim, r)
			assert.NotEmpty(t, r.TargetHW, "the target answered ARP")
		}()
	}
	macB := mac(t, b.Netns)
	require.Eventually(t, func() bool {
		return neighbor(t, w.HostNetns, a.Addr4) == macB && neighbor(t, a.Netns, w.Router4) == macB
	}, 5*time.Second, 50*time.Millisecond, "the caches are poisoned")

	got := make(chan attacktest.HijackResult, 1)
	go func() {
		r, err := cb.Hijack(attacktest.HijackSpec{Victim: a.Addr4, Endpoint: endpoint, Target: "/whoami", Timeout: 10 * time.Second})
		assert.NoError(t, err)
		got <- r
	}()
	fd, err := ca.Socket(4)
	require.NoError(t, err)
	require.NoError(t, ca.ConnectNonblock(fd, endpoint))
	r := <-got
	t.Logf("hijack: %+v", r)
	require.Empty(t, r.Error)
	assert.True(t, r.SawVictimSYN)
	assert.True(t, r.Established)
	assert.Equal(t, 200, r.Status)
	assert.Equal(t, a.Addr4, r.Source.Addr())
	assert.Equal(t, r.Source.String(), r.Body, "the server saw A's address and port")
}

// TestFloodOnVictimsAddress: sockets bound to A's address with
// IP_TRANSPARENT leave B's netns and are answered to A, so none connects;
// with A's address and the endpoint's on a veth pair inside B's netns,
// every one completes its handshake with B's fake endpoint.
func TestFloodOnVictimsAddress(t *testing.T) {
	_, a, b, endpoint := victimWorld(t)
	cb := b.Start(t)
	const first, last = 41000, 41099

	id, rep, err := cb.Flood(attacktest.FloodSpec{Source: a.Addr4, FirstPort: first, LastPort: last, Endpoint: endpoint,
		Transparent: true, Duration: 10 * time.Second})
	require.NoError(t, err)
	t.Logf("transparent flood: %+v", rep)
	assert.Equal(t, last-first+1, rep.Sockets, rep.FirstError)
	assert.Zero(t, rep.Connected, "the SYN-ACKs went to A, which reset them")
	require.NoError(t, cb.StopAttack(id, &rep))

	fid, err := cb.FakeEndpoint(attacktest.FakeEndpointSpec{Victim: a.Addr4, Endpoint: endpoint, Duration: 10 * time.Second})
	require.NoError(t, err)
	id, rep, err = cb.Flood(attacktest.FloodSpec{Source: a.Addr4, FirstPort: first, LastPort: last, Endpoint: endpoint,
		Duration: 10 * time.Second})
	require.NoError(t, err)
	t.Logf("flood against the fake endpoint: %+v", rep)
	assert.Equal(t, last-first+1, rep.Sockets, rep.FirstError)
	assert.Equal(t, last-first+1, rep.Connected)
	require.NoError(t, cb.StopAttack(id, &rep))
	var fr attacktest.FakeEndpointReport
	require.NoError(t, cb.StopAttack(fid, &fr))
	t.Logf("fake endpoint: %+v", fr)
	assert.Equal(t, last-first+1, fr.Accepted)

	h, err := netnsutil.Handle(b.Netns)
	require.NoError(t, err)
	defer h.Close()
	_, err = h.LinkByName("atk0")
	assert.Error(t, err, "stopping removes the fake endpoint's veth pair")
}
