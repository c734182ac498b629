package vmtest

import (
	"fmt"
	"strconv"
	"strings"
)

// PackageResult is what one guest test binary reported.
type PackageResult struct {
	Name string
	// Exit is the binary's exit code, or -1 when its end marker is missing.
	Exit   int
	Tests  []TestResult
	Output string
}

// Failed reports whether the binary failed or did not finish.
func (p PackageResult) Failed() bool { return p.Exit != 0 }

// TestResult is one top-level test of a guest binary.
type TestResult struct {
	Name string
	// Outcome is "pass", "fail" or "skip"; "" when the test started but no
	// result line followed (the binary died or hung inside it).
	Outcome string
	Output  string
}

// parseConsole splits the console into per-binary results using the guest
// init's markers and go test -v's result lines, and notices kernel panics
// and init errors.
func parseConsole(console string) *Result {
	res := &Result{Console: console}
	var cur *PackageResult
	var out strings.Builder
	idx := map[string]int{} // test name -> index in cur.Tests
	var running []string    // tests that printed "=== RUN" and no result yet
	for _, line := range strings.Split(console, "\n") {
		// Firmware escape sequences or kernel messages can precede a marker
		// on its line.
		for _, m := range []string{MarkerBegin, MarkerEnd, MarkerDone, MarkerError} {
			if i := strings.Index(line, m); i > 0 {
				line = line[i:]
			}
		}
		switch {
		case strings.HasPrefix(line, MarkerBegin):
			name := strings.TrimPrefix(line, MarkerBegin)
			res.Packages = append(res.Packages, PackageResult{Name: name, Exit: -1})
			cur = &res.Packages[len(res.Packages)-1]
			out.Reset()
			idx = map[string]int{}
			running = nil
			continue
		case strings.HasPrefix(line, MarkerEnd) && cur != nil:
			rest := strings.TrimPrefix(line, MarkerEnd)
			if name, code, ok := strings.Cut(rest, " exit="); ok && name == cur.Name {
				if n, err := strconv.Atoi(code); err == nil {
					cur.Exit = n
				}
			}
			cur.Output = out.String()
			cur = nil
			continue
		case line == MarkerDone:
			res.Done = true
			continue
		case strings.HasPrefix(line, MarkerError):
			res.Problem = "guest init failed: " + strings.TrimPrefix(line, MarkerError)
		case strings.Contains(line, "Kernel panic - not syncing"):
			res.Problem = "guest kernel panicked: " + strings.TrimSpace(line)
		}
		if cur == nil {
			continue
		}
		out.WriteString(line)
		out.WriteByte('\n')
		for _, r := range running {
			cur.Tests[idx[r]].Output += line + "\n"
		}
		if name, ok := strings.CutPrefix(line, "=== RUN   "); ok && !strings.Contains(name, "/") {
			idx[name] = len(cur.Tests)
			cur.Tests = append(cur.Tests, TestResult{Name: name, Output: line + "\n"})
			running = append(running, name)
			continue
		}
		for _, outcome := range []string{"PASS", "FAIL", "SKIP"} {
			rest, ok := strings.CutPrefix(line, "--- "+outcome+": ")
			if !ok {
				continue
			}
			name, _, _ := strings.Cut(rest, " ")
			if i, ok := idx[name]; ok {
				cur.Tests[i].Outcome = strings.ToLower(outcome)
				running = remove(running, name)
			}
		}
	}
	if cur != nil {
		cur.Output = out.String()
	}
	return res
}

func remove(s []string, v string) []string {
	out := s[:0]
	for _, x := range s {
		if x != v {
			out = append(out, x)
		}
	}
	return out
}

// progress says how far the guest got, for timeout and crash messages.
func (r *Result) progress() string {
	if len(r.Packages) == 0 {
		return "no test binary started (last console lines: " + tail(r.Console, 5) + ")"
	}
	p := r.Packages[len(r.Packages)-1]
	if p.Exit >= 0 {
		return fmt.Sprintf("last binary %s exited %d", p.Name, p.Exit)
	}
	for i := len(p.Tests) - 1; i >= 0; i-- {
		if p.Tests[i].Outcome == "" {
			return fmt.Sprintf("%s was inside %s", p.Name, p.Tests[i].Name)
		}
	}
	return fmt.Sprintf("%s had not finished (last console lines: %s)", p.Name, tail(r.Console, 5))
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}
