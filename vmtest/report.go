package vmtest

import (
	"fmt"
	"strings"
)

// Finding is one line of a boot's verdict, named relative to the kernel:
// "bpf/TestX" for a guest test, "bpf" for a binary, "" for the boot.
type Finding struct {
	Name    string
	Outcome string // "pass", "fail" or "skip"
	Message string // why it failed or skipped, with the guest's output
}

// Findings turns a boot's result into per-test verdicts. want lists the
// guest binaries that must have run.
func (r *Result) Findings(want []string) []Finding {
	var out []Finding
	seen := map[string]bool{}
	for _, p := range r.Packages {
		seen[p.Name] = true
		for _, t := range p.Tests {
			f := Finding{Name: p.Name + "/" + t.Name, Outcome: t.Outcome}
			switch t.Outcome {
			case "fail":
				f.Message = "guest test failed:\n" + t.Output
			case "skip":
				f.Message = strings.TrimSpace(t.Output)
			case "":
				f.Outcome = "fail"
				f.Message = "guest test started but never finished:\n" + t.Output
			}
			out = append(out, f)
		}
		if p.Exit != 0 {
			msg := fmt.Sprintf("guest binary exited %d", p.Exit)
			if p.Exit < 0 {
				msg = "guest binary has no exit marker (it hung, or the guest died)"
			}
			out = append(out, Finding{Name: p.Name, Outcome: "fail", Message: msg + ":\n" + lastLines(p.Output, 80)})
		}
	}
	for _, w := range want {
		if !seen[w] {
			out = append(out, Finding{Name: w, Outcome: "fail", Message: "guest binary never started"})
		}
	}
	if r.Problem != "" {
		out = append(out, Finding{Outcome: "fail", Message: r.Problem + "\nconsole tail:\n" + lastLines(r.Console, 60)})
	}
	return out
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{"..."}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}
