package daemon

import (
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/tokenserver"
)

func TestOperatorHandler(t *testing.T) {
	reg := prometheus.NewRegistry()
	_, err := tokenserver.NewMetrics(reg, func() float64 { return 3 })
	require.NoError(t, err)
	_, err = tokenserver.NewMetrics(reg, nil)
	assert.Error(t, err, "registering twice is an error, not a panic")

	var readyErr error = errors.New("rebuilding sandboxes")
	srv := httptest.NewServer(operatorHandler(reg, func() error { return readyErr }, func() error { return nil }, false))
	defer srv.Close()
	get := func(path string) (int, string) {
		resp, err := http.Get(srv.URL + path)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	code, body := get("/metrics")
	assert.Equal(t, 200, code)
	assert.Contains(t, body, "identityd_live_sandboxes 3")
	code, _ = get("/healthz")
	assert.Equal(t, 200, code)
	code, body = get("/readyz")
	assert.Equal(t, 503, code)
	assert.Contains(t, body, "rebuilding sandboxes")
	readyErr = nil
	code, _ = get("/readyz")
	assert.Equal(t, 200, code)
}

// TestOperatorPprof: Go's profiles are served only when asked for.
func TestOperatorPprof(t *testing.T) {
	reg := prometheus.NewRegistry()
	for _, on := range []bool{false, true} {
		srv := httptest.NewServer(operatorHandler(reg, func() error { return nil }, func() error { return nil }, on))
		resp, err := http.Get(srv.URL + "/debug/pprof/goroutine?debug=1")
		require.NoError(t, err)
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		srv.Close()
		if on {
			assert.Equal(t, http.StatusOK, resp.StatusCode)
			assert.Contains(t, string(body), "goroutine profile")
		} else {
			assert.Equal(t, http.StatusNotFound, resp.StatusCode, "no profiles unless --pprof")
		}
	}
}
