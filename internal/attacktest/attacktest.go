// Package attacktest is what a hostile sandbox does to its neighbours, for
// tests that attack identityd: ARP poisoning, a TCP client made of raw
// packets that completes a handshake under another sandbox's 4-tuple, and
// floods of sockets bound to another sandbox's address, connecting to the
// token endpoint through the real path or to a fake endpoint inside the
// attacker's own netns.
//
// A [Session] runs inside a sandboxtest child, on the thread that joined the
// sandbox's netns: every socket is made there, so it belongs to that netns
// for good, whichever thread later uses it. Everything is bounded in time
// and count, and the traffic stays inside the test's own namespaces.
package attacktest

import (
	"encoding/json"
	"fmt"
	"strconv"
	"sync"
)

// Session holds the attacks running in one child process: each command
// takes and returns one JSON document.
type Session struct {
	mu      sync.Mutex
	nextID  int
	running map[int]stopper
}

type stopper interface{ Stop() any }

// Started is the reply to a command that starts something that runs on:
// its id for Stop, and what it found at start.
type Started struct {
	ID     int `json:"id"`
	Report any `json:"report,omitempty"`
}

// NewSession returns a session with nothing running.
func NewSession() *Session { return &Session{running: make(map[int]stopper)} }

// Poison starts ARP poisoning (a PoisonSpec); Stop reports a PoisonReport.
func (s *Session) Poison(arg string) (string, error) {
	var spec PoisonSpec
	if err := json.Unmarshal([]byte(arg), &spec); err != nil {
		return "", err
	}
	p, err := startPoison(spec)
	if err != nil {
		return "", err
	}
	return s.track(p, nil)
}

// Hijack runs one raw-packet exchange (a HijackSpec) and returns its
// HijackResult.
func (s *Session) Hijack(arg string) (string, error) {
	var spec HijackSpec
	if err := json.Unmarshal([]byte(arg), &spec); err != nil {
		return "", err
	}
	return marshal(hijack(spec))
}

// Flood opens and holds sockets (a FloodSpec); it answers with the
// FloodReport at start, and Stop closes them.
func (s *Session) Flood(arg string) (string, error) {
	var spec FloodSpec
	if err := json.Unmarshal([]byte(arg), &spec); err != nil {
		return "", err
	}
	f, err := startFlood(spec)
	if err != nil {
		return "", err
	}
	return s.track(f, f.report)
}

// FakeEndpoint sets up a FakeEndpointSpec; Stop removes it and reports a
// FakeEndpointReport.
func (s *Session) FakeEndpoint(arg string) (string, error) {
	var spec FakeEndpointSpec
	if err := json.Unmarshal([]byte(arg), &spec); err != nil {
		return "", err
	}
	e, err := startFakeEndpoint(spec)
	if err != nil {
		return "", err
	}
	return s.track(e, nil)
}

// Stop ends the attack with the given id and returns its report.
func (s *Session) Stop(arg string) (string, error) {
	id, err := strconv.Atoi(arg)
	if err != nil {
		return "", err
	}
	s.mu.Lock()
	r, ok := s.running[id]
	delete(s.running, id)
	s.mu.Unlock()
	if !ok {
		return "", fmt.Errorf("nothing running with id %d", id)
	}
	return marshal(r.Stop())
}

func (s *Session) track(r stopper, report any) (string, error) {
	s.mu.Lock()
	s.nextID++
	id := s.nextID
	s.running[id] = r
	s.mu.Unlock()
	return marshal(Started{ID: id, Report: report})
}

func marshal(v any) (string, error) {
	b, err := json.Marshal(v)
	return string(b), err
}
