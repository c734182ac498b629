package daemon

import (
	"cmp"
	"errors"
	"log/slog"
	"net/http"
	"strconv"

	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/fleet"
	"github.com/identityd/identityd/tokenserver"
)

// adminHandler is the admin socket's API: the controller's sandbox
// lifecycle; the rotation of the signing key, which belongs to the daemon
// that holds both the keys and the token server using them; and, in a
// fleet (st not nil), the fleet's nodes:
//
//	GET  /v1/nodes                 -> 200 [fleet.NodeInfo]
//	POST /v1/nodes/{node}/evict    -> 200 {"node", "kids": removed}
//	POST /v1/nodes/{node}/readmit  -> 200 {"node"}
//
// which answer 400 on a single host and 503 when etcd is unreachable.
func adminHandler(ctrl *controllers.Controller, keys *tokenserver.Keys, st *fleet.Store, log *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/", controllers.AdminHandler(ctrl))
	// ?now=1 is the emergency rotation: the new key signs at once, without
	// being published first (see tokenserver.Keys.RotateNow).
	mux.HandleFunc("POST /v1/keys/rotate", func(w http.ResponseWriter, r *http.Request) {
		now, err := strconv.ParseBool(cmp.Or(r.URL.Query().Get("now"), "false"))
		if err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": "now must be true or false"})
			return
		}
		rotate := keys.Rotate
		if now {
			rotate = keys.RotateNow
		}
		if err := rotate(r.Context()); err != nil {
			log.Error("rotate signing key", "now", now, "error", err)
			if st != nil && (errors.Is(err, fleet.ErrUnavailable) || errors.Is(err, fleet.ErrEvicted)) {
				// The current key goes on signing: say why nothing changed.
				writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": "fleet store unreachable: rotation refused, the current key keeps signing: " + err.Error()})
				return
			}
			writeJSON(w, http.StatusInternalServerError, map[string]string{"error": "rotate signing key failed"})
			return
		}
		st := keys.Status()
		log.Info("signing key rotated; the keys it replaces stay published until their tokens expire", "now", now, "keys", st)
		writeJSON(w, http.StatusOK, map[string]any{"keys": st})
	})
	mux.HandleFunc("GET /v1/nodes", func(w http.ResponseWriter, r *http.Request) {
		if st == nil {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": errNoFleet.Error()})
			return
		}
		nodes, err := st.Nodes(r.Context())
		if err != nil {
			writeFleetError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, nodes)
	})
	mux.HandleFunc("POST /v1/nodes/{node}/evict", func(w http.ResponseWriter, r *http.Request) {
		if st == nil {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": errNoFleet.Error()})
			return
		}
		node := r.PathValue("node")
		if err := fleet.ValidName(node); err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": "evict node: " + err.Error()})
			return
		}
		kids, err := st.Evict(r.Context(), node)
		if err != nil {
			log.Error("evict node", "evicted", node, "error", err)
			writeFleetError(w, err)
			return
		}
		log.Warn("node evicted by the operator: its keys left the fleet's JWKS", "evicted", node, "kids", kids)
		if kids == nil {
			kids = []string{}
		}
		writeJSON(w, http.StatusOK, map[string]any{"node": node, "kids": kids})
	})
	mux.HandleFunc("POST /v1/nodes/{node}/readmit", func(w http.ResponseWriter, r *http.Request) {
		if st == nil {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": errNoFleet.Error()})
			return
		}
		node := r.PathValue("node")
		if err := fleet.ValidName(node); err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": "readmit node: " + err.Error()})
			return
		}
		if err := st.Readmit(r.Context(), node); err != nil {
			log.Error("readmit node", "readmitted", node, "error", err)
			writeFleetError(w, err)
			return
		}
		log.Warn("node readmitted by the operator: it publishes again once restarted", "readmitted", node)
		writeJSON(w, http.StatusOK, map[string]string{"node": node})
	})
	return mux
}

// writeFleetError answers a failed fleet operation: 503 if etcd could not
// be reached.
func writeFleetError(w http.ResponseWriter, err error) {
	status := http.StatusInternalServerError
	if errors.Is(err, fleet.ErrUnavailable) {
		status = http.StatusServiceUnavailable
	}
	writeJSON(w, status, map[string]string{"error": err.Error()})
}
