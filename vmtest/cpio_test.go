package vmtest

import (
	"bytes"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestInitramfsUnpacks checks the writer against the system's cpio, when
// there is one, and the format's basic invariants either way.
func TestInitramfsUnpacks(t *testing.T) {
	var buf bytes.Buffer
	require.NoError(t, WriteInitramfs(&buf, []File{
		{Name: "init", Mode: modeReg | 0o755, Data: []byte("#!hello")},
		{Name: "tests/a/b.txt", Mode: modeReg | 0o644, Data: []byte("odd")},
		{Name: "dev/console", Mode: modeChar | 0o600, Major: 5, Minor: 1},
		{Name: "proc", Mode: modeDir | 0o755},
	}))
	b := buf.Bytes()
	assert.Zero(t, len(b)%4, "entries are 4-byte aligned")
	assert.True(t, bytes.HasPrefix(b, []byte("070701")))
	assert.Contains(t, string(b), "TRAILER!!!")

	cpio, err := exec.LookPath("cpio")
	if err != nil {
		t.Skip("no cpio binary to cross-check with")
	}
	dir := t.TempDir()
	cmd := exec.Command(cpio, "-id", "--no-absolute-filenames")
	cmd.Dir = dir
	cmd.Stdin = bytes.NewReader(b)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.FileExists(t, filepath.Join(dir, "init"))
	assert.FileExists(t, filepath.Join(dir, "tests/a/b.txt"))
}

func TestParseConsole(t *testing.T) {
	console := "SeaBIOS\n\x1b[2J" + MarkerBegin + "bpf\n" +
		"=== RUN   TestA\n--- PASS: TestA (0.00s)\n" +
		"=== RUN   TestB\n=== RUN   TestB/sub\n    x_test.go:1: boom\n    --- FAIL: TestB/sub (0.00s)\n--- FAIL: TestB (0.01s)\n" +
		"=== RUN   TestC\n    x_test.go:2: no kernel support\n--- SKIP: TestC (0.00s)\n" +
		"=== RUN   TestD\n" +
		"FAIL\n" + MarkerEnd + "bpf exit=1\n" +
		MarkerBegin + "cgroup2\n=== RUN   TestE\n[   12.3] Kernel panic - not syncing: oops\n"
	res := parseConsole(console)
	require.Len(t, res.Packages, 2)
	bpf := res.Packages[0]
	assert.Equal(t, 1, bpf.Exit)
	outcomes := map[string]string{}
	for _, tr := range bpf.Tests {
		outcomes[tr.Name] = tr.Outcome
	}
	assert.Equal(t, map[string]string{"TestA": "pass", "TestB": "fail", "TestC": "skip", "TestD": ""}, outcomes)
	assert.Contains(t, bpf.Tests[1].Output, "boom")
	assert.Equal(t, -1, res.Packages[1].Exit)
	assert.False(t, res.Done)
	assert.Contains(t, res.Problem, "guest kernel panicked")

	fs := findingsByName(res.Findings([]string{"bpf", "cgroup2", "controllers"}))
	assert.Equal(t, "fail", fs["bpf/TestD"].Outcome, "a test that never finished fails")
	assert.Equal(t, "fail", fs["cgroup2"].Outcome)
	assert.Equal(t, "fail", fs["controllers"].Outcome, "a binary that never started fails")
	assert.Equal(t, "fail", fs[""].Outcome)
}
