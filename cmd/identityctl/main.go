// Command identityctl is identityd's CLI: operators create, adopt, list and
// delete sandboxes through the admin socket, and processes inside a sandbox
// fetch their identity token.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/alecthomas/kong"

	"github.com/identityd/identityd/controllers"
)

type cli struct {
	AdminSocket string `default:"/run/identityd/admin.sock" env:"IDENTITYD_ADMIN_SOCKET" help:"identityd's admin socket."`

	Run   runCmd   `cmd:"" help:"Create a sandbox, run a command in it with the identity environment, delete it afterwards."`
	Ls    lsCmd    `cmd:"" help:"List sandboxes."`
	Rm    rmCmd    `cmd:"" help:"Delete a sandbox (revokes its secret first)."`
	Adopt adoptCmd `cmd:"" help:"Register a sandbox another runtime made; prints the environment to inject."`
	Token tokenCmd `cmd:"" help:"Fetch an identity token from inside a sandbox (reads MIREN_IDENTITY_TOKEN_*)."`

	Fsck        fsckCmd        `cmd:"" help:"Check that records, secrets, cgroups and netns agree (run while identityd is stopped or idle)."`
	Nodes       nodesCmd       `cmd:"" help:"List the fleet's nodes (identityd with --etcd-endpoints): their published keys, when last seen, eviction."`
	EvictNode   evictNodeCmd   `cmd:"" name:"evict-node" help:"Remove a node's keys from the fleet's JWKS at once and bar it from publishing until readmitted: the response to a compromised host."`
	ReadmitNode readmitNodeCmd `cmd:"" name:"readmit-node" help:"Lift a node's eviction; it publishes again once restarted."`
	Rotate      rotateCmd      `cmd:"" help:"Replace a sandbox's secret now; the sandbox reads the new one from its secret file, and the replaced one is accepted for identityd's --secret-grace (--revoke-previous: not at all)."`
	RotateKey   rotateKeyCmd   `cmd:"" name:"rotate-key" help:"Make a new signing key: published at once, signing after identityd's --key-publish-delay (--now: at once); the keys it replaces stay published until their tokens expire."`
	Exec        execCmd        `cmd:"" name:"__exec" hidden:"" help:"Enter a netns and exec a command (used by run --privileged)."`
	Init        initCmd        `cmd:"" name:"__init" hidden:"" help:"Confine and start a command as its pid namespace's init (used by run)."`
}

func (c *cli) admin() *controllers.AdminClient { return controllers.NewAdminClient(c.AdminSocket) }

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var c cli
	k := kong.Parse(&c,
		kong.Name("identityctl"),
		kong.Description("Manage identityd sandboxes, and fetch identity tokens from inside them."),
		kong.BindTo(ctx, (*context.Context)(nil)),
		kong.Bind(&c),
		kong.UsageOnError(),
		kong.Vars{"default_netns_prefix": controllers.DefaultNetnsPrefix},
	)
	err := k.Run()
	var exit exitCode
	switch {
	case err == nil:
	case asExit(err, &exit):
		os.Exit(int(exit))
	default:
		fmt.Fprintf(os.Stderr, "identityctl: %v\n", err)
		os.Exit(1)
	}
}
