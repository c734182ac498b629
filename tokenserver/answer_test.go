package tokenserver

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestWriteToken: the answer written without encoding/json is byte for
// byte what encoding/json writes, and a token that JSON would have to
// escape (never one the server signs) still makes valid JSON.
func TestWriteToken(t *testing.T) {
	for _, token := range []string{
		"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln-_",
		`not"a\jws` + "\n<>&\u2028",
		"",
	} {
		w := httptest.NewRecorder()
		writeToken(w, token)
		assert.Equal(t, http.StatusOK, w.Code)
		assert.Equal(t, "application/json", w.Header().Get("Content-Type"))
		assert.Equal(t, strconv.Itoa(w.Body.Len()), w.Header().Get("Content-Length"))

		want, err := json.Marshal(map[string]string{"value": token})
		require.NoError(t, err)
		assert.Equal(t, string(want)+"\n", w.Body.String(), "token %q", token)
		var got struct{ Value string }
		require.NoError(t, json.Unmarshal(w.Body.Bytes(), &got))
		assert.Equal(t, token, got.Value)
	}
}
