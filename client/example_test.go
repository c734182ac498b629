package client_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"time"

	"github.com/identityd/identityd/client"
)

// A workload fetches a token for its audience. Inside a sandbox it would
// call client.FromEnv(); here an httptest server stands in for identityd.
func Example() {
	daemon := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if r.Header.Get("Authorization") != "Bearer s3cret" {
			w.WriteHeader(http.StatusForbidden)
			fmt.Fprint(w, `{"error":"invalid token"}`)
			return
		}
		claims, _ := json.Marshal(map[string]any{
			"sub": "app:web:sandbox:sb-1", "aud": r.URL.Query()["audience"],
			"exp": time.Now().Add(time.Hour).Unix(),
		})
		json.NewEncoder(w).Encode(map[string]string{
			"value": "e30." + base64.RawURLEncoding.EncodeToString(claims) + ".sig",
		})
	}))
	defer daemon.Close()

	ctx := context.Background()
	c := client.New(client.WithURL(daemon.URL+"/v1/token"), client.WithSecret("s3cret"))
	tok, err := c.Token(ctx, "https://vault.example")
	if err != nil {
		fmt.Println(err)
		return
	}
	claims, _ := client.Claims(tok)
	fmt.Println(claims["sub"], claims["aud"])

	// Until half its lifetime has passed, the same token comes from the cache.
	again, _ := c.Token(ctx, "https://vault.example")
	fmt.Println(again == tok)

	// A refusal says why.
	bad := client.New(client.WithURL(daemon.URL+"/v1/token"), client.WithSecret("wrong"), client.WithMaxAttempts(1))
	_, err = bad.Token(ctx)
	fmt.Println(err)
	// Output:
	// app:web:sandbox:sb-1 [https://vault.example]
	// true
	// token server refused: 403 Forbidden: invalid token
}
