package daemon

import (
	"log/slog"
	"net/http"

	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/tokenserver"
)

// adminHandler is the admin socket's API: the controller's sandbox
// lifecycle, and the rotation of the signing key, which belongs to the
// daemon that holds both the keys and the token server using them.
func adminHandler(ctrl *controllers.Controller, keys *tokenserver.Keys, log *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/", controllers.AdminHandler(ctrl))
	mux.HandleFunc("POST /v1/keys/rotate", func(w http.ResponseWriter, r *http.Request) {
		if err := keys.Rotate(); err != nil {
			log.Error("rotate signing key", "error", err)
			writeJSON(w, http.StatusInternalServerError, map[string]string{"error": "rotate signing key failed"})
			return
		}
		log.Info("signing key rotated; the previous key stays published until its tokens expire")
		writeJSON(w, http.StatusOK, keys.JWKS())
	})
	return mux
}
