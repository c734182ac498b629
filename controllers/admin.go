package controllers

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/identityd/identityd/internal/atomicfile"
)

// DefaultAdminSocket is where the admin API listens.
const DefaultAdminSocket = "/run/identityd/admin.sock"

// AdminHandler is the root-only admin API, JSON over HTTP:
//
//	POST   /v1/sandboxes            CreateRequest -> 201 Created
//	POST   /v1/sandboxes/adopt      AdoptRequest  -> 201 Created
//	GET    /v1/sandboxes                          -> 200 [Record]
//	GET    /v1/sandboxes/{id}                     -> 200 Record
//	DELETE /v1/sandboxes/{id}[?kill=true]         -> 204
//	POST   /v1/sandboxes/{id}/rotate  RotateRequest -> 200 secretstore.Status
//
// Errors are {"error": "..."} with 400 (bad input), 404 (no such sandbox),
// 409 (exists, held by another node of the fleet, or still has tasks
// without kill), 503 (the fleet's store is unreachable) or 500.
func AdminHandler(c *Controller) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/sandboxes", func(w http.ResponseWriter, r *http.Request) {
		var req CreateRequest
		if !decode(w, r, &req) {
			return
		}
		out, err := c.Create(r.Context(), req)
		reply(w, http.StatusCreated, out, err)
	})
	mux.HandleFunc("POST /v1/sandboxes/adopt", func(w http.ResponseWriter, r *http.Request) {
		var req AdoptRequest
		if !decode(w, r, &req) {
			return
		}
		out, err := c.Adopt(r.Context(), req)
		reply(w, http.StatusCreated, out, err)
	})
	mux.HandleFunc("GET /v1/sandboxes", func(w http.ResponseWriter, r *http.Request) {
		reply(w, http.StatusOK, c.List(), nil)
	})
	mux.HandleFunc("GET /v1/sandboxes/{id}", func(w http.ResponseWriter, r *http.Request) {
		rec, err := c.Get(r.PathValue("id"))
		reply(w, http.StatusOK, rec, err)
	})
	mux.HandleFunc("DELETE /v1/sandboxes/{id}", func(w http.ResponseWriter, r *http.Request) {
		kill, _ := strconv.ParseBool(r.URL.Query().Get("kill"))
		err := c.Delete(r.Context(), r.PathValue("id"), kill)
		reply(w, http.StatusNoContent, nil, err)
	})
	mux.HandleFunc("POST /v1/sandboxes/{id}/rotate", func(w http.ResponseWriter, r *http.Request) {
		var req RotateRequest
		if r.ContentLength != 0 && !decode(w, r, &req) {
			return
		}
		st, err := c.RotateSecret(r.Context(), r.PathValue("id"), req.RevokePrevious)
		reply(w, http.StatusOK, st, err)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "not found")
	})
	return mux
}

// RotateRequest asks for a sandbox's secret to be replaced now.
type RotateRequest struct {
	// RevokePrevious stops accepting the replaced secret at once, instead
	// of after the grace window: for a secret believed leaked.
	RevokePrevious bool `json:"revoke_previous,omitempty"`
}

// decode reads a JSON body of at most 64 KiB with no unknown fields.
func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(io.LimitReader(r.Body, 64<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeError(w, http.StatusBadRequest, "invalid JSON body: "+err.Error())
		return false
	}
	return true
}

func reply(w http.ResponseWriter, status int, v any, err error) {
	switch {
	case err == nil:
	case errors.Is(err, ErrInvalid):
		status = http.StatusBadRequest
	case errors.Is(err, ErrNotFound):
		status = http.StatusNotFound
	case errors.Is(err, ErrExists), errors.Is(err, ErrBusy), errors.Is(err, ErrHeld):
		status = http.StatusConflict
	case errors.Is(err, ErrIDsUnavailable):
		status = http.StatusServiceUnavailable
	default:
		status = http.StatusInternalServerError
	}
	if err != nil {
		writeError(w, status, err.Error())
		return
	}
	if v == nil {
		w.WriteHeader(status)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]string{"error": msg})
}

// ListenAdmin opens the admin socket at path: its directory 0700, the
// socket 0600, a stale socket from a previous run replaced.
func ListenAdmin(path string) (net.Listener, error) {
	if err := atomicfile.MkdirPrivate(filepath.Dir(path)); err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale admin socket: %w", err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on admin socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("restrict admin socket: %w", err)
	}
	return ln, nil
}

// AdminClient calls the admin API over its Unix socket.
type AdminClient struct {
	http *http.Client
}

// NewAdminClient returns a client for the admin socket at path.
func NewAdminClient(path string) *AdminClient {
	return &AdminClient{http: &http.Client{
		Timeout: 60 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		}},
	}}
}

// Do sends a request to the admin API and decodes a success into out (if
// not nil); an error response becomes an error carrying its message.
func (a *AdminClient) Do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://identityd"+path, body)
	if err != nil {
		return err
	}
	resp, err := a.http.Do(req)
	if err != nil {
		return fmt.Errorf("identityd admin API: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		var e struct{ Error string }
		json.NewDecoder(resp.Body).Decode(&e)
		return &APIError{Status: resp.StatusCode, Message: e.Error}
	}
	if out != nil {
		return json.NewDecoder(resp.Body).Decode(out)
	}
	return nil
}

// APIError is an error answer of the admin API.
type APIError struct {
	Status  int
	Message string
}

func (e *APIError) Error() string { return fmt.Sprintf("identityd: %s (HTTP %d)", e.Message, e.Status) }
