package daemon

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"net/url"

	"github.com/identityd/identityd/bpf"
	"github.com/identityd/identityd/internal/registry"
)

// Link-local endpoints (--link-local-endpoint): sandboxes' connections to a
// fixed address such as 169.254.169.254:80 are sent to the token endpoint
// by the attribution programs at connect time (bpf.Redirect), for sandboxes
// only. Two steps, around the controller's start:
//
//   - redirectLinkLocal, before the controller exists, sets the rules and
//     picks the URL sandboxes are told (--inject-link-local-url);
//   - watchLinkLocalSandboxes, once the controller rebuilt the sandboxes
//     that survive a restart, makes the kernel's set of sandboxes the
//     registry's and keeps it so (registry.Watch). Until then the set pinned
//     by the previous run stays in force, so running sandboxes are still
//     redirected while the daemon restarts; its entries of sandboxes gone
//     meanwhile name a cgroup id or netns cookie the kernel never reuses.

// redirectLinkLocal makes eps (Config.LinkLocalEndpoints) the kernel's
// link-local redirects to the token endpoint (none: removes those of an
// earlier run), and returns ep with the token URL sandboxes are told: the
// first link-local endpoint's with inject (Config.InjectLinkLocalURL).
func redirectLinkLocal(ep tokenEndpoint, in *bpf.Installation, eps []netip.AddrPort, inject bool, log *slog.Logger) (tokenEndpoint, error) {
	rules, err := linkLocalRedirects(eps, ep)
	if err != nil {
		return ep, err
	}
	if err := in.SetLinkLocal(rules); err != nil {
		return ep, err
	}
	if len(rules) == 0 {
		if inject {
			return ep, errors.New("--inject-link-local-url needs a --link-local-endpoint")
		}
		return ep, nil
	}
	for _, r := range rules {
		log.Info("link-local endpoint: sandboxes' connections are sent to the token endpoint", "link_local", r.From.String(), "token_endpoint", r.To.String())
	}
	if inject {
		ep.tokenURL = linkLocalURL(rules[0].From)
	}
	return ep, nil
}

// linkLocalRedirects pairs each link-local endpoint with the token
// endpoint's address as sandboxes reach it (the router's when the listener
// is bound to every address).
func linkLocalRedirects(eps []netip.AddrPort, ep tokenEndpoint) ([]bpf.Redirect, error) {
	if len(eps) == 0 {
		return nil, nil
	}
	u, err := url.Parse(ep.tokenURL)
	if err != nil {
		return nil, fmt.Errorf("link-local endpoints: token URL %q: %w", ep.tokenURL, err)
	}
	to, err := netip.ParseAddrPort(u.Host)
	if err != nil {
		return nil, fmt.Errorf("link-local endpoints: token URL %q does not name an address and port: %w", ep.tokenURL, err)
	}
	to = netip.AddrPortFrom(to.Addr().Unmap(), to.Port())
	seen := make(map[netip.AddrPort]bool)
	var rules []bpf.Redirect
	for _, from := range eps {
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		if seen[from] {
			continue
		}
		seen[from] = true
		if from.Addr().Is4() && !to.Addr().Is4() {
			return nil, fmt.Errorf("--link-local-endpoint %s: the token endpoint %s is IPv6, and an IPv4 connection can only be sent to IPv4", from, to)
		}
		rules = append(rules, bpf.Redirect{From: from, To: to})
	}
	return rules, nil
}

// linkLocalURL is the token URL at a link-local endpoint.
func linkLocalURL(ap netip.AddrPort) string {
	host := ap.String()
	if ap.Port() == 80 {
		host = ap.Addr().String()
		if ap.Addr().Is6() {
			host = "[" + host + "]"
		}
	}
	return "http://" + host + "/v1/token"
}

// watchLinkLocalSandboxes keeps the kernel's set of sandboxes, the only
// sockets link-local endpoints redirect, equal to the registry's: from now
// on every registration is in the kernel before Add returns (or is refused
// with the kernel's error), and every retirement follows Remove. Without
// link-local endpoints (enabled false) the set is emptied and not kept.
func watchLinkLocalSandboxes(in *bpf.Installation, reg *registry.Index, enabled bool, log *slog.Logger) error {
	if !enabled {
		return in.SetSandboxes(nil)
	}
	w := linkLocalWatcher{in: in, log: log}
	return reg.Watch(func(now []registry.Sandbox) error {
		keys := make([]bpf.SandboxKey, 0, len(now))
		for _, sb := range now {
			keys = append(keys, sandboxKey(sb))
		}
		if err := in.SetSandboxes(keys); err != nil {
			return fmt.Errorf("link-local endpoints: %w", err)
		}
		log.Info("link-local endpoints: sandboxes redirected", "sandboxes", len(keys))
		return nil
	}, w)
}

func sandboxKey(sb registry.Sandbox) bpf.SandboxKey {
	return bpf.SandboxKey{CgroupID: sb.CgroupID, NetnsCookie: sb.NetnsCookie}
}

// linkLocalWatcher copies the registry's changes to the kernel.
type linkLocalWatcher struct {
	in  *bpf.Installation
	log *slog.Logger
}

func (w linkLocalWatcher) SandboxAdded(sb registry.Sandbox) error {
	return w.in.AddSandbox(sandboxKey(sb))
}

// SandboxRemoved cannot fail the removal: an entry left behind names a
// cgroup or netns that no longer exists, and ids are never reused.
func (w linkLocalWatcher) SandboxRemoved(sb registry.Sandbox) {
	if err := w.in.RemoveSandbox(sandboxKey(sb)); err != nil {
		w.log.Warn("link-local endpoints: remove a retired sandbox", "sandbox", sb.ID, "error", err)
	}
}
