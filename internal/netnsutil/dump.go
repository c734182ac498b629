package netnsutil

import (
	"errors"

	"github.com/vishvananda/netlink"
)

// dumpAttempts bounds how often a netlink dump that the kernel interrupted
// (the table changed while it was read) is read again.
const dumpAttempts = 5

// Dump runs a netlink dump (a list of links, addresses, neighbours...) and
// reads it again while the kernel reports it was interrupted by a change,
// whose results may be incomplete: callers decide on whole answers only.
func Dump[T any](list func() (T, error)) (T, error) {
	var out T
	var err error
	for range dumpAttempts {
		out, err = list()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return out, err
		}
	}
	return out, err
}
