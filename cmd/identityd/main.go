// Command identityd is the workload-identity token server daemon: it
// attributes every connection to its token endpoint with eBPF, rebuilds its
// sandboxes from the live kernel at start, and issues JWTs to the sandboxes
// whose bearer secret matches the copy on disk.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/alecthomas/kong"

	"github.com/identityd/identityd/bpf"
	"github.com/identityd/identityd/controllers"
	fleetstore "github.com/identityd/identityd/fleet"
	"github.com/identityd/identityd/internal/daemon"
	"github.com/identityd/identityd/tokenserver"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

type cli struct {
	Serve     serveCmd     `cmd:"" default:"withargs" help:"Run the daemon (the default command)."`
	Version   versionCmd   `cmd:"" help:"Print the version."`
	Demo      demoCmd      `cmd:"" help:"Play the original bug's repro end to end in a closed network world (needs root)."`
	Uninstall uninstallCmd `cmd:"" help:"Detach the attribution programs and remove their pins (sandboxes lose attribution). Stop the daemon first: a running daemon attaches them again."`
	Probe     probeCmd     `cmd:"" name:"__probe" hidden:"" help:"The readiness probe's client; the daemon runs it."`
}

type serveCmd struct {
	StateDir        string        `default:"/var/lib/identityd" env:"IDENTITYD_STATE_DIR" help:"Records, secrets and signing keys (0700)."`
	CgroupParent    string        `env:"IDENTITYD_CGROUP_PARENT" help:"Parent of sandbox cgroups (default <cgroup2 root>/identityd)."`
	BPFDir          string        `name:"bpf-dir" default:"/sys/fs/bpf/identityd" env:"IDENTITYD_BPF_DIR" help:"bpffs directory for the pinned programs and maps."`
	Listen          string        `env:"IDENTITYD_LISTEN" help:"Token endpoint address (default <router address>:7123)."`
	Issuer          string        `env:"IDENTITYD_ISSUER" help:"Issuer URL: the iss claim and the base of OIDC discovery (default http://<listen>; required with --etcd-endpoints, the same on every node)."`
	SigningAlg      string        `default:"RS256" enum:"RS256,ES256,EdDSA" env:"IDENTITYD_SIGNING_ALG" help:"Token signing algorithm (RS256, ES256, EdDSA)."`
	DefaultAudience []string      `default:"miren" env:"IDENTITYD_DEFAULT_AUDIENCE" help:"Audience when a request names none."`
	OperatorListen  string        `default:"127.0.0.1:9123" env:"IDENTITYD_OPERATOR_LISTEN" help:"Address for /metrics, /healthz and /readyz (empty: off)."`
	AdminSocket     string        `default:"/run/identityd/admin.sock" env:"IDENTITYD_ADMIN_SOCKET" help:"Unix socket of the admin API (0600)."`
	HostNetns       string        `env:"IDENTITYD_HOST_NETNS" help:"Network namespace (path) holding the sandboxes' host-side veths, the router address and the token endpoint (default: the daemon's own)."`
	NetnsPrefix     string        `default:"${default_netns_prefix}" env:"IDENTITYD_NETNS_PREFIX" help:"Prefix of the named network namespaces (/run/netns) of the sandboxes this instance creates; only names with it are scanned or cleaned up. Give each instance on a host its own, none a prefix of another's (the default also matches identityd-x-...)."`
	Bridge          string        `default:"identityd0" env:"IDENTITYD_BRIDGE" help:"Device in the host netns that carries the router address (a bridge with no ports; sandboxes get routed /32 veths, and only sandboxes made by earlier versions sit on it)."`
	Subnet          netip.Prefix  `default:"10.88.0.0/16" env:"IDENTITYD_SUBNET" help:"Sandbox address pool; its first address is the router."`
	RateLimit       float64       `default:"10" env:"IDENTITYD_RATE_LIMIT" help:"Token requests per second per sandbox."`
	Burst           int           `default:"20" env:"IDENTITYD_BURST" help:"Burst of token requests per sandbox."`
	MaxConns        int           `default:"4096" env:"IDENTITYD_MAX_CONNS" help:"Open token endpoint connections in all (lowered to fit the descriptor limit)."`
	MaxSandboxConns int           `name:"max-conns-per-sandbox" default:"64" env:"IDENTITYD_MAX_CONNS_PER_SANDBOX" help:"Open token endpoint connections per sandbox."`
	MaxOtherConns   int           `default:"256" env:"IDENTITYD_MAX_OTHER_CONNS" help:"Open token endpoint connections of all callers that are not a live sandbox (host processes, unattested) together."`
	IdleTimeout     time.Duration `default:"5s" env:"IDENTITYD_IDLE_TIMEOUT" help:"Close token endpoint keep-alive connections idle this long."`
	CheckInterval   time.Duration `default:"2s" env:"IDENTITYD_CHECK_INTERVAL" help:"How often the readiness probe proves attribution end to end and the attribution programs are checked (and put back if removed)."`
	NodeName        string        `env:"IDENTITYD_NODE_NAME" help:"This node's name in the log and among a fleet's nodes (default: the host name)."`
	KeyRotation     time.Duration `name:"key-rotation-period" default:"720h" env:"IDENTITYD_KEY_ROTATION_PERIOD" help:"Replace the signing key when it is this old, counted from its creation on disk (0: only identityctl rotate-key)."`
	KeyPublishDelay time.Duration `default:"60s" env:"IDENTITYD_KEY_PUBLISH_DELAY" help:"How long a new signing key is published in the JWKS before it signs: at least the verifiers' JWKS cache lifetime (our JWKS says max-age=60)."`
	DiscoveryListen string        `env:"IDENTITYD_DISCOVERY_LISTEN" help:"Address serving only OIDC discovery and the JWKS, for a load balancer behind the issuer URL (empty: off)."`
	MaxTTL          time.Duration `name:"max-ttl" default:"86400s" env:"IDENTITYD_MAX_TTL" help:"Longest token lifetime served (60s to 86400s); longer requests are clamped to it. In a fleet, a dead node's keys leave the JWKS this long (plus a few seconds) after its last renewal."`
	EtcdEndpoints   []string      `env:"IDENTITYD_ETCD_ENDPOINTS" help:"Comma-separated etcd client URLs: join the fleet whose state is there (one issuer, the union JWKS, fleet-unique sandbox ids). Empty: a single host, no etcd."`
	EtcdPrefix      string        `default:"${default_etcd_prefix}" env:"IDENTITYD_ETCD_PREFIX" help:"Root of the fleet's keys in etcd: one prefix per fleet (issuer)."`
	EtcdCA          string        `name:"etcd-ca" env:"IDENTITYD_ETCD_CA" help:"CA certificate (PEM) verifying the etcd members."`
	EtcdCert        string        `env:"IDENTITYD_ETCD_CERT" help:"Client certificate (PEM) for etcd; with --etcd-key."`
	EtcdKey         string        `env:"IDENTITYD_ETCD_KEY" help:"Client key (PEM) for etcd; with --etcd-cert."`
	SecretRotation  time.Duration `name:"secret-rotation-period" default:"24h" env:"IDENTITYD_SECRET_ROTATION_PERIOD" help:"Replace each sandbox's secret when it is this old; the sandbox reads the new one from its secret file (MIREN_IDENTITY_TOKEN_SECRET_FILE). The secret in the environment is the first one: it stops working when the first rotation's grace window ends. 0: only identityctl rotate."`
	NoTokenCache    bool          `env:"IDENTITYD_NO_TOKEN_CACHE" help:"Sign every token request anew (a new jti each time). By default a token is reused for the same sandbox, secret, audiences and ttl while more than half of its lifetime remains and its key still signs, as SPIRE's agent does."`
	SecretGrace     time.Duration `default:"1h" env:"IDENTITYD_SECRET_GRACE" help:"How long a replaced secret is still accepted."`
	CredsMount      string        `name:"credentials-mount" default:"${default_credentials_mount}" env:"IDENTITYD_CREDENTIALS_MOUNT" help:"Where each sandbox's credentials directory (secret and token files) appears inside it; identityctl run mounts it there, and an adoption may name another."`
	Pprof           bool          `env:"IDENTITYD_PPROF" help:"Serve Go's profiles (/debug/pprof/) on the operator endpoint, for measuring the daemon; anyone who reaches that address can then read them and load the daemon."`
	LogLevel        string        `default:"info" enum:"debug,info,warn,error" env:"IDENTITYD_LOG_LEVEL" help:"debug, info, warn or error."`
	LogFormat       string        `default:"text" enum:"text,json" env:"IDENTITYD_LOG_FORMAT" help:"text or json."`

	// Link-local endpoints (internal/daemon/linklocal.go).
	LinkLocal       []netip.AddrPort `name:"link-local-endpoint" env:"IDENTITYD_LINK_LOCAL_ENDPOINTS" help:"A fixed address:port (IPv4 or IPv6, e.g. 169.254.169.254:80; repeatable) whose connections from sandboxes are sent to the token endpoint in the kernel, at connect() time, for sandboxes only; getpeername still reports it. Unlike a DNAT rule, which attribution cannot see through, this keeps callers attributed. Off by default."`
	InjectLinkLocal bool             `name:"inject-link-local-url" env:"IDENTITYD_INJECT_LINK_LOCAL_URL" help:"Tell sandboxes the first --link-local-endpoint's URL (MIREN_IDENTITY_TOKEN_URL) instead of the router's."`
}

func (s *serveCmd) logger() (*slog.Logger, error) {
	level, err := daemon.LogLevel(s.LogLevel)
	if err != nil {
		return nil, err
	}
	opts := &slog.HandlerOptions{Level: level}
	if s.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
}

func (s *serveCmd) Run(ctx context.Context) error {
	log, err := s.logger()
	if err != nil {
		return err
	}
	go daemon.TuneGC(ctx)
	// SIGHUP: start the binary as it is on disk now, which takes over.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	upgrade := make(chan struct{})
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				select {
				case upgrade <- struct{}{}:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return daemon.Run(ctx, daemon.Config{
		Upgrade:  upgrade,
		StateDir: s.StateDir, CgroupParent: s.CgroupParent, BPFDir: s.BPFDir, Listen: s.Listen,
		Issuer: s.Issuer, SigningAlg: s.SigningAlg, DefaultAudience: s.DefaultAudience,
		OperatorListen: s.OperatorListen, AdminSocket: s.AdminSocket, HostNetns: s.HostNetns, NetnsPrefix: s.NetnsPrefix,
		Bridge: s.Bridge, Subnet: s.Subnet, RateLimit: s.RateLimit, Burst: s.Burst, Logger: log,
		Conns:       tokenserver.ConnLimits{Total: s.MaxConns, PerSandbox: s.MaxSandboxConns, Others: s.MaxOtherConns},
		IdleTimeout: s.IdleTimeout, CheckInterval: s.CheckInterval,
		Node: s.NodeName, KeyRotationPeriod: s.KeyRotation, KeyPublishDelay: s.KeyPublishDelay, DiscoveryListen: s.DiscoveryListen,
		MaxTTL: s.MaxTTL, EtcdEndpoints: s.EtcdEndpoints, EtcdPrefix: s.EtcdPrefix, EtcdCA: s.EtcdCA, EtcdCert: s.EtcdCert,
		EtcdKey: s.EtcdKey, Version: version,
		CredentialsMount: s.CredsMount, SecretRotation: s.SecretRotation, SecretGrace: s.SecretGrace,
		LinkLocalEndpoints: s.LinkLocal, InjectLinkLocalURL: s.InjectLinkLocal, NoTokenCache: s.NoTokenCache,
		Pprof: s.Pprof,
	})
}

type probeCmd struct {
	Netns   string         `help:"Network namespace (path) to connect from."`
	Bind    netip.Addr     `required:""`
	Connect netip.AddrPort `required:""`
}

func (p *probeCmd) Run() error {
	return daemon.ProbeClient(p.Netns, p.Bind, p.Connect, os.Stdin, os.Stdout)
}

type versionCmd struct{}

func (versionCmd) Run() error {
	fmt.Println("identityd", version)
	return nil
}

type uninstallCmd struct {
	BPFDir string `name:"bpf-dir" default:"/sys/fs/bpf/identityd" env:"IDENTITYD_BPF_DIR" help:"bpffs directory of the pinned programs."`
}

func (u *uninstallCmd) Run(ctx context.Context) error {
	return bpf.Uninstall(ctx, bpf.Options{PinDir: u.BPFDir})
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	var c cli
	k := kong.Parse(&c,
		kong.Name("identityd"),
		kong.Description("Workload-identity token server: kernel-attested callers, secrets that survive restarts."),
		kong.BindTo(ctx, (*context.Context)(nil)),
		kong.UsageOnError(),
		kong.Vars{"default_netns_prefix": controllers.DefaultNetnsPrefix, "default_etcd_prefix": fleetstore.DefaultPrefix,
			"default_credentials_mount": controllers.DefaultCredentialsMount},
	)
	if err := k.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "identityd: %v\n", err)
		os.Exit(1)
	}
}
