package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"
)

type tokenCmd struct {
	Audience    []string      `help:"Audience (repeatable)."`
	TTL         int           `name:"ttl" help:"Lifetime in seconds (the server clamps it into [60, 86400])."`
	Decode      bool          `help:"Print the token's claims instead of the token."`
	Every       time.Duration `help:"Fetch again at this interval, for ever, printing one line per attempt."`
	MaxAttempts int           `default:"0" help:"Give up after this many failed attempts (0: retry for ever)."`
	MaxBackoff  time.Duration `default:"30s" help:"Longest wait between retries (the wait starts at 1s and doubles)."`
}

// Run fetches a token the way sandboxed clients do: GET the token URL with
// the bearer secret, retrying with backoff from 1 s doubling to 30 s.
func (t *tokenCmd) Run(ctx context.Context) error {
	tokenURL, secret := os.Getenv("MIREN_IDENTITY_TOKEN_URL"), os.Getenv("MIREN_IDENTITY_TOKEN_SECRET")
	if tokenURL == "" || secret == "" {
		return errors.New("MIREN_IDENTITY_TOKEN_URL and MIREN_IDENTITY_TOKEN_SECRET must be set (run inside a sandbox, e.g. with identityctl run)")
	}
	u, err := url.Parse(tokenURL)
	if err != nil {
		return fmt.Errorf("MIREN_IDENTITY_TOKEN_URL: %w", err)
	}
	q := u.Query()
	for _, a := range t.Audience {
		q.Add("audience", a)
	}
	if t.TTL != 0 {
		q.Set("ttl", fmt.Sprint(t.TTL))
	}
	u.RawQuery = q.Encode()
	// A fresh connection per attempt: the kernel attributes connections.
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

	backoff := min(time.Second, t.MaxBackoff)
	failures := 0
	for {
		token, err := fetch(ctx, client, u.String(), secret)
		if err == nil {
			failures, backoff = 0, min(time.Second, t.MaxBackoff)
			if err := t.print(token); err != nil {
				return err
			}
			if t.Every == 0 {
				return nil
			}
			if !sleep(ctx, t.Every) {
				return ctx.Err()
			}
			continue
		}
		failures++
		if t.MaxAttempts > 0 && failures >= t.MaxAttempts {
			return err
		}
		fmt.Fprintf(os.Stderr, "%s identityctl: %v; retrying in %s\n", time.Now().Format("15:04:05.000"), err, backoff)
		if !sleep(ctx, backoff) {
			return ctx.Err()
		}
		backoff = min(2*backoff, t.MaxBackoff)
	}
}

func sleep(ctx context.Context, d time.Duration) bool {
	select {
	case <-ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}

func fetch(ctx context.Context, client *http.Client, u, secret string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, "GET", u, nil)
	if err != nil {
		return "", err
	}
	req.Header.Set("Authorization", "Bearer "+secret)
	resp, err := client.Do(req)
	if err != nil {
		return "", fmt.Errorf("token server unreachable: %w", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	var out struct {
		Value string `json:"value"`
		Error string `json:"error"`
	}
	json.Unmarshal(body, &out)
	if resp.StatusCode != http.StatusOK {
		why := out.Error
		if why == "" {
			why = strings.TrimSpace(string(body))
		}
		return "", fmt.Errorf("token server refused: %s: %s", resp.Status, why)
	}
	if out.Value == "" {
		return "", errors.New("token server answered 200 without a token")
	}
	return out.Value, nil
}

func (t *tokenCmd) print(token string) error {
	if !t.Decode {
		fmt.Println(token)
		return nil
	}
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return errors.New("malformed token")
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return fmt.Errorf("decode token: %w", err)
	}
	var claims map[string]any
	if err := json.Unmarshal(payload, &claims); err != nil {
		return fmt.Errorf("decode token: %w", err)
	}
	b, _ := json.Marshal(claims)
	if t.Every != 0 {
		fmt.Printf("%s %s\n", time.Now().Format("15:04:05.000"), b)
		return nil
	}
	b, _ = json.MarshalIndent(claims, "", "  ")
	fmt.Println(string(b))
	return nil
}
