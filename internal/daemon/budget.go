package daemon

import (
	"fmt"
	"log/slog"

	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/tokenserver"
)

// Descriptors kept out of the token endpoint's reach: the admin socket's and
// the operator endpoint's connections (each capped at serviceConns), the
// listeners, the resync's netns and cgroup opens, key and secret files, the
// BPF maps and the runtime's own.
const (
	serviceConns      = 64
	descriptorReserve = 4*serviceConns + 256
)

// connLimits fits the token endpoint's connection limits under the
// daemon's descriptor limit, leaving descriptorReserve for everything else,
// so that no number of token connections can starve the daemon of the
// descriptors it needs to keep its sandboxes (Go raises the soft limit to the
// hard one at start).
func connLimits(want tokenserver.ConnLimits, log *slog.Logger) (tokenserver.ConnLimits, error) {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		return want, fmt.Errorf("read the descriptor limit: %w", err)
	}
	return fitLimits(want, lim.Cur, log)
}

func fitLimits(want tokenserver.ConnLimits, nofile uint64, log *slog.Logger) (tokenserver.ConnLimits, error) {
	if want.Total <= 0 {
		want.Total = tokenserver.DefaultMaxConns
	}
	if nofile == unix.RLIM_INFINITY {
		return want, nil
	}
	room := int64(nofile) - descriptorReserve
	if room < 16 {
		return want, fmt.Errorf("descriptor limit %d is too low: identityd needs at least %d (raise LimitNOFILE or ulimit -n)", nofile, descriptorReserve+16)
	}
	if int64(want.Total) > room {
		log.Warn("token endpoint connection limit lowered to fit the descriptor limit",
			"wanted", want.Total, "limit", room, "nofile", nofile, "reserve", descriptorReserve)
		want.Total = int(room)
	}
	return want, nil
}
