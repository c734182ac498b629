package daemon

import (
	"cmp"
	"log/slog"
	"net/http"
	"strconv"

	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/tokenserver"
)

// adminHandler is the admin socket's API: the controller's sandbox
// lifecycle, and the rotation of the signing key, which belongs to the
// daemon that holds both the keys and the token server using them.
func adminHandler(ctrl *controllers.Controller, keys *tokenserver.Keys, log *slog.Logger) http.Handler {
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
			writeJSON(w, http.StatusInternalServerError, map[string]string{"error": "rotate signing key failed"})
			return
		}
		st := keys.Status()
		log.Info("signing key rotated; the keys it replaces stay published until their tokens expire", "now", now, "keys", st)
		writeJSON(w, http.StatusOK, map[string]any{"keys": st})
	})
	return mux
}
