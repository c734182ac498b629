package main

import (
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// TestRestartUnderLoad: 50 sandboxes fetch a token every 100 ms each while
// the daemon is killed (SIGKILL and SIGTERM alternately) and restarted at
// random moments. Every failure must fall inside a window when the daemon
// was down or not yet ready, and no sandbox may be left failing.
//
// IDENTITYD_SOAK_RESTARTS (default 20) makes it a longer soak, e.g.
//
//	IDENTITYD_SOAK_RESTARTS=200 go test -run TestRestartUnderLoad -v -timeout 30m ./cmd/identityd/
func TestRestartUnderLoad(t *testing.T) {
	restarts := 20
	if v, err := strconv.Atoi(os.Getenv("IDENTITYD_SOAK_RESTARTS")); err == nil && v > 0 {
		restarts = v
	}
	const sandboxes = 50
	const interval = 100 * time.Millisecond
	ow := newWorld(t)
	ow.start()

	type sb struct {
		created controllers.Created
		client  *sandboxtest.Client
	}
	var sbs []sb
	tag := suffix()
	for i := range sandboxes {
		c := ow.create(fmt.Sprintf("e2e-load%02d-%s", i, tag), "load")
		sbs = append(sbs, sb{c, sandboxtest.StartClient(t, c.Sandbox.CgroupPath, c.Sandbox.NetnsPath)})
	}

	// Each restart cycle is at most a second; leave 3 s after the last.
	duration := time.Duration(restarts)*time.Second + 3*time.Second
	results := make([][]sandboxtest.Attempt, sandboxes)
	var wg sync.WaitGroup
	for i, s := range sbs {
		wg.Go(func() {
			var err error
			results[i], err = s.client.Poll(sandboxtest.HTTPRequest{Method: "GET", URL: s.created.Env["MIREN_IDENTITY_TOKEN_URL"],
				Timeout: 2 * time.Second,
				Header:  map[string]string{"Authorization": "Bearer " + s.created.Env["MIREN_IDENTITY_TOKEN_SECRET"]}},
				interval, duration)
			if err != nil {
				t.Error(err)
			}
		})
	}

	type window struct{ down, ready int64 }
	var windows []window
	begin := time.Now()
	for i := range restarts {
		time.Sleep(time.Duration(300+rand.IntN(400)) * time.Millisecond)
		sig := []syscall.Signal{syscall.SIGKILL, syscall.SIGTERM}[i%2]
		down := time.Now().UnixNano()
		ow.kill(sig)
		time.Sleep(time.Duration(50+rand.IntN(200)) * time.Millisecond)
		ow.start()
		windows = append(windows, window{down, time.Now().UnixNano()})
	}
	t.Logf("%d restarts in %s", restarts, time.Since(begin).Round(time.Millisecond))
	wg.Wait()
	require.False(t, t.Failed())

	total, failures, outside := 0, 0, 0
	var worst time.Duration
	for i, attempts := range results {
		require.NotEmpty(t, attempts)
		for _, a := range attempts {
			total++
			if a.Status == 200 {
				continue
			}
			failures++
			inside := slices.ContainsFunc(windows, func(w window) bool { return a.End >= w.down && a.Start <= w.ready })
			if !inside {
				outside++
				t.Errorf("sandbox %d: status %d at %s..%s, outside every down window", i, a.Status,
					time.Unix(0, a.Start).Format("15:04:05.000"), time.Unix(0, a.End).Format("15:04:05.000"))
			}
		}
		for _, w := range windows {
			for _, a := range attempts {
				if a.Start >= w.ready && a.Status == 200 {
					worst = max(worst, time.Duration(a.End-w.ready))
					break
				}
			}
		}
		assert.Equal(t, 200, attempts[len(attempts)-1].Status, "sandbox %d is left failing", i)
	}
	t.Logf("RESULT sandboxes=%d restarts=%d requests=%d failures=%d failures-outside-down-windows=%d worst-time-to-token-after-ready=%s",
		sandboxes, restarts, total, failures, outside, worst.Round(time.Millisecond))
	assert.Zero(t, outside)
}
