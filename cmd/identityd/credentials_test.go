package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/internal/credsdir"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// loopScript runs in a sandbox for $1 seconds: it asks for a token with
// identityctl ($2) through package client, one attempt each (any refusal is
// a failure), and reads the secret and token files each round, counting
// reads that are not whole (a secret of 64 characters, a token of three
// parts). It prints key=value lines and the secrets it saw, one per line.
const loopScript = `
end=$(( $(date +%s) + $1 )); ok=0; fail=0; torn=0; seen=""
while [ "$(date +%s)" -lt "$end" ]; do
	if "$2" token --audience loop --max-attempts 1 >/dev/null 2>/tmp/err.$$; then ok=$((ok+1)); else fail=$((fail+1)); cat /tmp/err.$$ >&2; fi
	s=$(cat "$MIREN_IDENTITY_TOKEN_SECRET_FILE")
	[ ${#s} -eq 64 ] || torn=$((torn+1))
	case "$seen" in *"$s"*) ;; *) seen="$seen $s";; esac
	if [ -n "$MIREN_IDENTITY_TOKEN_PATH" ]; then
		t=$(cat "$MIREN_IDENTITY_TOKEN_PATH")
		[ "$(echo "$t" | tr -cd . | wc -c)" -eq 2 ] || torn=$((torn+1))
	fi
done
rm -f /tmp/err.$$
echo "ok=$ok"; echo "fail=$fail"; echo "torn=$torn"
for s in $seen; do echo "seen=$s"; done
`

// loopResult is what loopScript printed.
type loopResult struct {
	ok, fail, torn int
	seen           []string
}

func parseLoop(t *testing.T, out string) loopResult {
	t.Helper()
	var r loopResult
	for _, line := range strings.Split(out, "\n") {
		k, v, _ := strings.Cut(strings.TrimSpace(line), "=")
		switch k {
		case "ok":
			r.ok = must(strconv.Atoi(v))
		case "fail":
			r.fail = must(strconv.Atoi(v))
		case "torn":
			r.torn = must(strconv.Atoi(v))
		case "seen":
			r.seen = append(r.seen, v)
		}
	}
	return r
}

// TestCredentialFilesUnderRotation: while the daemon rotates every
// sandbox's secret every two seconds, a workload started by identityctl
// run (confined, the directory mounted by run) and a workload of an
// adopted sandbox (the directory mounted by "another runtime": the test,
// in a mount namespace of its own) each ask for tokens in a loop and read
// both files: no request fails, no read is torn, and both see the
// rotations through their mounts. The environment's secret, the first one,
// is refused once the first rotation's grace window has ended. Then the
// daemon is killed and kept down past the token file's half-life: the next
// start replaces the token file at once.
func TestCredentialFilesUnderRotation(t *testing.T) {
	ow := newWorld(t)
	// The shortest token lifetime the contract allows, so that the token
	// file reaches half its lifetime within the test.
	ow.args = append(ow.args, "--secret-rotation-period", "2s", "--secret-grace", "1s", "--max-ttl", "60s")
	ow.start()
	ctl := filepath.Join(ow.bin, "identityctl")
	const seconds = 9

	// The adopted sandbox and where its runtime mounts the directory.
	other := ow.w.AddSandbox("adopted")
	mount := filepath.Join(filepath.Dir(ow.credsMount), "adopted-mount")
	out, err := ow.identityctl("adopt", "--app", "adopted", "--id", "adopted-"+suffix(), "--cgroup", other.CgroupDir,
		"--netns", other.Netns, "--credentials-mount", mount, "-o", "json")
	require.NoError(t, err, out)
	var adopted controllers.Created
	require.NoError(t, json.Unmarshal([]byte(out), &adopted), out)
	require.NotNil(t, adopted.Credentials)
	assert.Equal(t, mount+"/secret", adopted.Env["MIREN_IDENTITY_TOKEN_SECRET_FILE"])

	// The adopted workload: its runtime's mount namespace, cgroup and
	// netns, the environment adopt printed, the directory bind-mounted.
	cg, err := os.Open(other.CgroupDir)
	require.NoError(t, err)
	defer cg.Close()
	require.NoError(t, os.MkdirAll(mount, 0o755))
	script := fmt.Sprintf("mount --bind %s %s && mount -o remount,bind,ro %s && exec sh -c '%s' loop %d %s",
		adopted.Credentials.Dir, mount, mount, strings.ReplaceAll(loopScript, "'", `'\''`), seconds, ctl)
	adoptedCmd := exec.Command(ctl, "__exec", "--netns", other.Netns, "--", "unshare", "--mount", "--propagation", "private", "sh", "-c", script)
	adoptedCmd.Env = os.Environ()
	for k, v := range adopted.Env {
		adoptedCmd.Env = append(adoptedCmd.Env, k+"="+v)
	}
	adoptedCmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	adoptedOut := &sandboxtest.LogBuffer{}
	adoptedCmd.Stdout, adoptedCmd.Stderr = adoptedOut, adoptedOut
	require.NoError(t, adoptedCmd.Start())

	// The run workload, confined as nobody, prints its first secret (the
	// environment's) for the check below.
	runCmd, runOut := ctlRun(ow, "--app", "looper", "--keep", "--id", "looper-"+suffix(), "--", "sh", "-c",
		`echo "env=$MIREN_IDENTITY_TOKEN_SECRET"; `+loopScript, "loop", strconv.Itoa(seconds), ctl)
	require.NoError(t, runCmd.Run(), runOut.String())
	require.NoError(t, adoptedCmd.Wait(), adoptedOut.String())

	for name, out := range map[string]string{"run": runOut.String(), "adopted": adoptedOut.String()} {
		r := parseLoop(t, out)
		t.Logf("%s workload: %d tokens, %d failed, %d torn reads, %d secrets seen", name, r.ok, r.fail, r.torn, len(r.seen))
		assert.Zero(t, r.fail, "%s: no request fails while secrets rotate\n%s", name, out)
		assert.Zero(t, r.torn, "%s: no read of either file is torn or empty", name)
		assert.Positive(t, r.ok, name)
		assert.GreaterOrEqual(t, len(r.seen), 3, "%s: rotations reach the workload through its mount", name)
	}
	assert.Empty(t, ow.refusals(), "the daemon refused nothing")

	// The first secret, from the environment, is refused now.
	var env string
	for _, line := range strings.Split(runOut.String(), "\n") {
		if v, ok := strings.CutPrefix(line, "env="); ok {
			env = v
		}
	}
	require.Len(t, env, 64)
	looper := ""
	for id, r := range sandboxes(t, ow) {
		if r.App == "looper" {
			looper = id
		}
	}
	require.NotEmpty(t, looper)
	rec := sandboxes(t, ow)[looper]
	c := sandboxtest.StartClient(t, rec.CgroupPath, rec.NetnsPath)
	url := adopted.Env["MIREN_IDENTITY_TOKEN_URL"]
	status, body := get(t, c, map[string]string{"MIREN_IDENTITY_TOKEN_URL": url}, env, "")
	assert.Equal(t, 403, status, body)
	assert.Contains(t, body, "invalid token")

	// Down past the token file's half-life, then back: the token file is
	// replaced promptly, before it could expire.
	dir := filepath.Join(ow.state, "credentials", looper)
	before, times := tokenFile(t, dir)
	ow.kill(syscall.SIGKILL)
	wait := time.Until(times.RefreshAt()) + 500*time.Millisecond
	t.Logf("daemon killed; down for %v, past the token file's half-life", wait.Round(time.Second))
	time.Sleep(wait)
	ow.start()
	start := time.Now()
	require.Eventually(t, func() bool {
		tok, _ := tokenFile(t, dir)
		return tok != before
	}, 10*time.Second, 20*time.Millisecond, "the token file is replaced after the restart")
	_, after := tokenFile(t, dir)
	t.Logf("token file replaced %v after the admin API answered; it now expires at %s", time.Since(start).Round(time.Millisecond), after.Expires.Format(time.RFC3339))
	assert.True(t, after.Expires.After(time.Now().Add(50*time.Second)))
}

func tokenFile(t *testing.T, dir string) (string, credsdir.Times) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, credsdir.TokenFile))
	require.NoError(t, err)
	tok := strings.TrimSpace(string(b))
	times, err := credsdir.TimesOf(tok)
	require.NoError(t, err)
	return tok, times
}

// TestSecretGraceWindow: with rotation on demand only, identityctl rotate
// replaces the secret in the file at once; the replaced secret works until
// the grace window ends and is refused after it; --revoke-previous refuses
// it at once.
func TestSecretGraceWindow(t *testing.T) {
	ow := newWorld(t)
	ow.args = append(ow.args, "--secret-rotation-period", "0", "--secret-grace", "3s")
	ow.start()
	cr := ow.create("grace-"+suffix(), "web")
	c := sandboxtest.StartClient(t, cr.Sandbox.CgroupPath, cr.Sandbox.NetnsPath)
	first := cr.Env["MIREN_IDENTITY_TOKEN_SECRET"]
	file := func() string {
		b, err := os.ReadFile(filepath.Join(cr.Credentials.Dir, credsdir.SecretFile))
		require.NoError(t, err)
		return strings.TrimSpace(string(b))
	}
	require.Equal(t, first, file())
	status, body := get(t, c, cr.Env, first, "")
	require.Equal(t, 200, status, body)

	out, err := ow.identityctl("rotate", cr.Sandbox.ID)
	require.NoError(t, err, out)
	rotated := time.Now()
	assert.Contains(t, out, "accepted until")
	second := file()
	require.NotEqual(t, first, second)
	for _, s := range []string{first, second} {
		status, body := get(t, c, cr.Env, s, "")
		assert.Equal(t, 200, status, "within the grace window both work: %s", body)
	}
	time.Sleep(time.Until(rotated.Add(3*time.Second + 500*time.Millisecond)))
	status, body = get(t, c, cr.Env, first, "")
	assert.Equal(t, 403, status, "after the grace window the replaced secret is refused: %s", body)
	status, body = get(t, c, cr.Env, second, "")
	assert.Equal(t, 200, status, body)

	out, err = ow.identityctl("rotate", "--revoke-previous", cr.Sandbox.ID)
	require.NoError(t, err, out)
	assert.Contains(t, out, "no longer accepted")
	status, body = get(t, c, cr.Env, second, "")
	assert.Equal(t, 403, status, "revoked at once: %s", body)
	status, body = get(t, c, cr.Env, file(), "")
	assert.Equal(t, 200, status, body)

	out, err = ow.identityctl("rotate", "no-such-sandbox")
	assert.Error(t, err)
	assert.Contains(t, out, "no such sandbox")
}

// TestSecretTimingRefused: a grace window as long as the period is refused
// at start, with why.
func TestSecretTimingRefused(t *testing.T) {
	ow := newWorld(t)
	ow.args = append(ow.args, "--secret-rotation-period", "1h", "--secret-grace", "1h")
	assert.Contains(t, ow.refused(), "grace shorter than the period")
}
