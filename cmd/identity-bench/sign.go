package main

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"

	"github.com/identityd/identityd/tokenserver"
)

// signFloor is what a signature costs on this machine: the token server's
// own signing call (claims encoded, signed, serialized), with nothing else.
type signFloor struct {
	Alg   string `json:"alg"`
	Round int    `json:"round"`
	// PerSignUS is one goroutine's cost per signature, in microseconds.
	PerSignUS float64 `json:"per_sign_us"`
	// Rate is signatures per second with one goroutine per core.
	Rate  float64 `json:"rate"`
	Cores int     `json:"cores"`
}

var signAlgs = []string{tokenserver.RS256, tokenserver.ES256, tokenserver.EdDSA}

// measureSign runs a sign-only loop for alg: d/2 on one goroutine, then d/2
// on one per core.
func measureSign(dir, alg string, d time.Duration) (signFloor, error) {
	keys, err := tokenserver.OpenKeys(filepath.Join(dir, "sign-keys-"+alg), alg, nil)
	if err != nil {
		return signFloor{}, fmt.Errorf("sign-only keys: %w", err)
	}
	claims := func() tokenserver.Claims {
		now := time.Now().Unix()
		return tokenserver.Claims{Issuer: "http://10.200.0.1:7123", Subject: "org:bench:app:bench:sandbox:b00000",
			Audience: []string{audience}, IssuedAt: now, NotBefore: now, Expiry: now + 3600, ID: uuid.NewString(),
			App: "bench", SandboxID: "b00000", OrganizationID: "bench", IdentityType: "sandbox"}
	}
	loop := func(until time.Time) (int64, error) {
		var n int64
		for time.Now().Before(until) {
			if _, err := keys.Sign(claims()); err != nil {
				return n, err
			}
			n++
		}
		return n, nil
	}
	start := time.Now()
	n, err := loop(start.Add(d / 2))
	if err != nil {
		return signFloor{}, err
	}
	f := signFloor{Alg: alg, Cores: runtime.GOMAXPROCS(0)}
	f.PerSignUS = float64(time.Since(start).Microseconds()) / float64(max(n, 1))

	var total atomic.Int64
	var wg sync.WaitGroup
	var firstErr error
	var once sync.Once
	start = time.Now()
	until := start.Add(d / 2)
	for range f.Cores {
		wg.Go(func() {
			n, err := loop(until)
			total.Add(n)
			if err != nil {
				once.Do(func() { firstErr = err })
			}
		})
	}
	wg.Wait()
	f.Rate = float64(total.Load()) / time.Since(start).Seconds()
	return f, firstErr
}

// procCPU is the CPU time (user + system) of process pid so far.
func procCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name may hold spaces; the fields after it are fixed.
	s := string(b)
	i := len(s) - 1
	for i >= 0 && s[i] != ')' {
		i--
	}
	var state string
	var f [13]int64
	if _, err := fmt.Sscan(s[i+1:], &state, &f[0], &f[1], &f[2], &f[3], &f[4], &f[5], &f[6], &f[7], &f[8], &f[9], &f[10], &f[11], &f[12]); err != nil {
		return 0, fmt.Errorf("parse /proc/%d/stat: %w", pid, err)
	}
	// utime and stime are fields 14 and 15: f[10] and f[11] here. Clock
	// ticks are 100 per second on Linux.
	return time.Duration(f[10]+f[11]) * (time.Second / 100), nil
}

// peakRSS is VmHWM of process pid, in bytes.
func peakRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	var kb int64
	for _, line := range strings.Split(string(b), "\n") {
		if _, err := fmt.Sscanf(line, "VmHWM: %d kB", &kb); err == nil {
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("no VmHWM in /proc/%d/status", pid)
}
