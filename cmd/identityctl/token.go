package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/identityd/identityd/client"
)

type tokenCmd struct {
	Audience    []string      `help:"Audience (repeatable)."`
	TTL         int           `name:"ttl" help:"Lifetime in seconds (the server clamps it into [60, 86400])."`
	Decode      bool          `help:"Print the token's claims instead of the token."`
	Every       time.Duration `help:"Fetch again at this interval, for ever, printing one line per attempt."`
	MaxAttempts int           `default:"0" help:"Give up after this many failed attempts (0: retry for ever)."`
	MaxBackoff  time.Duration `default:"30s" help:"Longest wait between retries (the wait starts at 1s and doubles)."`
	File        bool          `help:"Read the token file (MIREN_IDENTITY_TOKEN_PATH) instead of asking the server; default audience only."`
}

// Run fetches a token the way sandboxed clients do, through package client:
// GET the token URL with the bearer secret (the secret file's when there is
// one), retrying with backoff from 1 s doubling to --max-backoff.
func (t *tokenCmd) Run(ctx context.Context) error {
	c, err := t.client()
	if err != nil {
		return err
	}
	for {
		var token string
		if t.File {
			token, err = c.Token(ctx)
		} else {
			// Always ask the server: the command shows what it answers now.
			token, err = c.Fetch(ctx, t.Audience...)
		}
		if err != nil {
			return err
		}
		if err := t.print(token); err != nil {
			return err
		}
		if t.Every == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(t.Every):
		}
	}
}

func (t *tokenCmd) client() (*client.Client, error) {
	opts := []client.Option{
		client.WithTTL(time.Duration(t.TTL) * time.Second),
		client.WithMaxAttempts(t.MaxAttempts),
		client.WithMaxBackoff(t.MaxBackoff),
		client.WithRetryHook(func(err error, wait time.Duration) {
			fmt.Fprintf(os.Stderr, "%s identityctl: %v; retrying in %s\n", time.Now().Format("15:04:05.000"), err, wait)
		}),
	}
	if !t.File {
		return client.FromEnv(opts...)
	}
	if len(t.Audience) > 0 || t.TTL != 0 {
		return nil, errors.New("--file reads the default audience's token: no --audience or --ttl")
	}
	path := os.Getenv(client.EnvTokenPath)
	if path == "" {
		return nil, fmt.Errorf("--file: %s is not set", client.EnvTokenPath)
	}
	return client.FromFile(path, opts...), nil
}

func (t *tokenCmd) print(token string) error {
	if !t.Decode {
		fmt.Println(token)
		return nil
	}
	claims, err := client.Claims(token)
	if err != nil {
		return err
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
