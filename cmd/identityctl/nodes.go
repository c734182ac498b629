package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"strings"
	"text/tabwriter"
	"time"
)

// nodeInfo is the part of the daemon's GET /v1/nodes answer (fleet.NodeInfo)
// the table shows; -o json prints the answer as it came.
type nodeInfo struct {
	Node      string    `json:"node"`
	Kids      []string  `json:"kids"`
	LastSeen  time.Time `json:"last_seen"`
	Evicted   bool      `json:"evicted"`
	EvictedBy string    `json:"evicted_by"`
}

type nodesCmd struct {
	Output string `short:"o" default:"table" enum:"table,json" help:"table or json."`
}

func (n *nodesCmd) Run(ctx context.Context, c *cli) error {
	var raw json.RawMessage
	if err := c.admin().Do(ctx, "GET", "/v1/nodes", nil, &raw); err != nil {
		return err
	}
	if n.Output == "json" {
		var b bytes.Buffer
		if err := json.Indent(&b, raw, "", "  "); err != nil {
			return fmt.Errorf("decode the node list: %w", err)
		}
		b.WriteByte('\n')
		_, err := os.Stdout.Write(b.Bytes())
		return err
	}
	var nodes []nodeInfo
	if err := json.Unmarshal(raw, &nodes); err != nil {
		return fmt.Errorf("decode the node list: %w", err)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tKEYS\tLAST SEEN\tEVICTED")
	for _, i := range nodes {
		seen := "-"
		if !i.LastSeen.IsZero() {
			seen = fmt.Sprintf("%s (%s ago)", i.LastSeen.Local().Format(time.RFC3339), time.Since(i.LastSeen).Round(time.Second))
		}
		evicted := "no"
		if i.Evicted {
			evicted = "yes, by " + dash(i.EvictedBy)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", i.Node, dash(strings.Join(i.Kids, ",")), seen, evicted)
	}
	return tw.Flush()
}

type evictNodeCmd struct {
	Node string `arg:"" help:"Node name (its --node-name)."`
}

// Run removes the node's keys from the fleet's JWKS at once and bars it
// from publishing again until readmitted.
func (e *evictNodeCmd) Run(ctx context.Context, c *cli) error {
	var out struct {
		Kids []string `json:"kids"`
	}
	if err := c.admin().Do(ctx, "POST", "/v1/nodes/"+url.PathEscape(e.Node)+"/evict", nil, &out); err != nil {
		return err
	}
	fmt.Printf("evicted %s: removed %d key(s) from the fleet's JWKS: %s\n", e.Node, len(out.Kids), dash(strings.Join(out.Kids, ", ")))
	return nil
}

type readmitNodeCmd struct {
	Node string `arg:"" help:"Node name (its --node-name)."`
}

func (r *readmitNodeCmd) Run(ctx context.Context, c *cli) error {
	if err := c.admin().Do(ctx, "POST", "/v1/nodes/"+url.PathEscape(r.Node)+"/readmit", nil, nil); err != nil {
		return err
	}
	fmt.Printf("readmitted %s: it publishes its keys again once restarted\n", r.Node)
	return nil
}
