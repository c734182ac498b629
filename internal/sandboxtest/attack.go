package sandboxtest

import (
	"encoding/json"
	"fmt"

	"github.com/identityd/identityd/internal/attacktest"
)

// attack sends one attacktest command with spec and decodes the reply into
// out. The reply may take the spec's own timeout on top of the usual one.
func (c *Client) attack(cmd string, spec any, out any) error {
	b, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	wait := replyTimeout
	if h, ok := spec.(attacktest.HijackSpec); ok {
		wait += h.Timeout
	}
	rest, err := c.doRawWithin(wait, "%s %s", cmd, b)
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	if err := json.Unmarshal([]byte(rest), out); err != nil {
		return fmt.Errorf("decode %s reply: %w", cmd, err)
	}
	return nil
}

// Poison starts ARP poisoning from the sandbox, running until StopAttack or
// the spec's duration, and returns its id.
func (c *Client) Poison(spec attacktest.PoisonSpec) (int, error) {
	var s attacktest.Started
	err := c.attack("poison", spec, &s)
	return s.ID, err
}

// Hijack makes one request over a raw-packet TCP connection under another
// sandbox's 4-tuple, from inside this sandbox.
func (c *Client) Hijack(spec attacktest.HijackSpec) (attacktest.HijackResult, error) {
	var r attacktest.HijackResult
	err := c.attack("hijack", spec, &r)
	return r, err
}

// Flood opens and holds sockets bound to another address, until StopAttack
// or the spec's duration, and returns its id and what it opened.
func (c *Client) Flood(spec attacktest.FloodSpec) (int, attacktest.FloodReport, error) {
	var s struct {
		ID     int                    `json:"id"`
		Report attacktest.FloodReport `json:"report"`
	}
	err := c.attack("flood", spec, &s)
	return s.ID, s.Report, err
}

// FakeEndpoint sets up a fake token endpoint inside the sandbox's netns,
// until StopAttack or the spec's duration, and returns its id.
func (c *Client) FakeEndpoint(spec attacktest.FakeEndpointSpec) (int, error) {
	var s attacktest.Started
	err := c.attack("fakeendpoint", spec, &s)
	return s.ID, err
}

// StopAttack ends the attack with id and decodes its report into report (a
// PoisonReport, FloodReport or FakeEndpointReport).
func (c *Client) StopAttack(id int, report any) error {
	rest, err := c.doRaw("stop %d", id)
	if err != nil {
		return fmt.Errorf("stop %d: %w", id, err)
	}
	return json.Unmarshal([]byte(rest), report)
}
