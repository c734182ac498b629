package main

import (
	"bytes"
	"context"
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
	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// ctlRun prepares `identityctl run args...` against ow's daemon; stdout and
// stderr both go to the returned buffer.
func ctlRun(ow *world, args ...string) (*exec.Cmd, *sandboxtest.LogBuffer) {
	cmd := exec.Command(filepath.Join(ow.bin, "identityctl"), append([]string{"--admin-socket", ow.admin, "run"}, args...)...)
	out := &sandboxtest.LogBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	return cmd, out
}

// sandboxes lists ow's sandboxes by id.
func sandboxes(t *testing.T, ow *world) map[string]controllers.Record {
	t.Helper()
	var recs []controllers.Record
	require.NoError(t, controllers.NewAdminClient(ow.admin).Do(context.Background(), "GET", "/v1/sandboxes", nil, &recs))
	m := map[string]controllers.Record{}
	for _, r := range recs {
		m[r.ID] = r
	}
	return m
}

// pidRunning returns the host pid of a process named comm in the sandbox's
// cgroup, or 0.
func pidRunning(t *testing.T, ow *world, id, comm string) int {
	t.Helper()
	rec, ok := sandboxes(t, ow)[id]
	if !ok {
		return 0
	}
	procs, _ := os.ReadFile(filepath.Join(rec.CgroupPath, "cgroup.procs"))
	for _, f := range strings.Fields(string(procs)) {
		if c, _ := os.ReadFile("/proc/" + f + "/comm"); strings.TrimSpace(string(c)) == comm {
			return must(strconv.Atoi(f))
		}
	}
	return 0
}

// probeScript is a sandbox B workload attacking sandbox A ($1: the host pid
// of A's workload, $2: A's cgroup, $3: A's netns) and the daemon's admin
// socket ($5) and reporting key=value lines; then it fetches its own token
// with identityctl ($4).
const probeScript = `apid=$1 acg=$2 ans=$3 ctl=$4 admin=$5
echo "uid=$(id -u)"
echo "gid=$(id -g)"
echo "groups=$(id -G)"
while IFS=: read -r k v; do
	case $k in Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs) echo "$k=$v";; esac
done </proc/self/status
echo "pids=$(ls /proc | grep -E '^[0-9]+$' | tr '\n' ' ')"
echo "pid1=$(cat /proc/1/comm)"
if e=$(cat "/proc/$apid/environ" 2>&1 >/dev/null); then echo environ=READ; else echo "environ=$e"; fi
if e=$(kill -0 "$apid" 2>&1); then echo kill=SIGNALLED; else echo "kill=$e"; fi
if e=$(sh -c 'echo $$ >"$1/cgroup.procs"' - "$acg" 2>&1); then echo cgroup=JOINED; else echo "cgroup=$e"; fi
if e=$(nsenter --net="$ans" true 2>&1); then echo setns=JOINED; else echo "setns=$e"; fi
if e=$("$ctl" --admin-socket "$admin" ls 2>&1); then echo admin=LISTED; else echo "admin=$e"; fi
"$ctl" token --decode --max-attempts 3
`

// report parses the probe's key=value lines.
func report(out string) map[string]string {
	r := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && !strings.ContainsAny(k, " \t\"{}") {
			r[k] = strings.TrimSpace(v)
		}
	}
	return r
}

// procMounts counts the mounts on /proc in the test's mount namespace.
func procMounts(t *testing.T) int {
	t.Helper()
	n := 0
	for _, line := range strings.Split(string(must(os.ReadFile("/proc/self/mountinfo"))), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == "/proc" {
			n++
		}
	}
	return n
}

// TestIdentityctlRunConfined: a workload started by `identityctl run` is by
// default an unprivileged user without capabilities, with no_new_privs, in
// a pid namespace of its own: from sandbox B it cannot see, signal or read
// the environment (the secret) of sandbox A's workload, which runs as the
// same user; it cannot move into A's cgroup nor enter A's netns; it still
// gets its own token. --privileged is host root as before, and can do all
// of that, which is why it is not the default.
func TestIdentityctlRunConfined(t *testing.T) {
	ow := newWorld(t)
	ow.start()
	ctl := filepath.Join(ow.bin, "identityctl")
	mountsBefore := procMounts(t)

	// Sandbox A: a confined workload holding its secret in its environment.
	idA := "e2e-run-a-" + suffix()
	a, aOut := ctlRun(ow, "--app", "a", "--id", idA, "--", "sleep", "300")
	require.NoError(t, a.Start())
	t.Cleanup(func() {
		a.Process.Signal(syscall.SIGTERM)
		a.Wait()
	})
	var apid int
	require.Eventually(t, func() bool { apid = pidRunning(t, ow, idA, "sleep"); return apid != 0 },
		10*time.Second, 20*time.Millisecond, "A's workload did not start: %s", aOut)
	recA := sandboxes(t, ow)[idA]
	environ := string(must(os.ReadFile(fmt.Sprintf("/proc/%d/environ", apid))))
	require.Contains(t, environ, "MIREN_IDENTITY_TOKEN_SECRET=", "A's workload holds its secret")
	assert.Equal(t, mountsBefore, procMounts(t), "the workload's /proc stays in its own mount namespace")

	probe := func(t *testing.T, id string, mode ...string) map[string]string {
		args := append(append([]string{"--app", "b", "--id", id}, mode...),
			"--", "sh", "-c", probeScript, "probe", strconv.Itoa(apid), recA.CgroupPath, recA.NetnsPath, ctl, ow.admin)
		cmd, out := ctlRun(ow, args...)
		// A caller with a supplementary group and an inheritable and
		// ambient capability, none of which a confined workload may keep.
		cmd.SysProcAttr = &syscall.SysProcAttr{
			Credential:  &syscall.Credential{Uid: 0, Gid: 0, Groups: []uint32{4242}},
			AmbientCaps: []uintptr{unix.CAP_NET_RAW},
		}
		require.NoError(t, cmd.Run(), out.String())
		t.Logf("probe output:\n%s", out)
		assert.Contains(t, out.String(), `"sandbox_id": "`+id+`"`, "B still gets a token naming B")
		return report(out.String())
	}

	t.Run("default", func(t *testing.T) {
		r := probe(t, "e2e-run-b-"+suffix())
		assert.Equal(t, "65534", r["uid"], "nobody")
		assert.Equal(t, "65534", r["gid"])
		assert.Equal(t, "65534", r["groups"], "no supplementary groups")
		assert.Equal(t, "", r["Groups"])
		for _, set := range []string{"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"} {
			assert.Equal(t, "0000000000000000", r[set], set)
		}
		assert.Equal(t, "1", r["NoNewPrivs"])
		pids := strings.Fields(r["pids"])
		assert.Contains(t, pids, "1")
		assert.NotContains(t, pids, strconv.Itoa(apid), "A's workload is out of sight")
		for _, p := range pids {
			assert.Less(t, must(strconv.Atoi(p)), 50, "only the workload's own pid namespace is visible: %v", pids)
		}
		assert.Equal(t, "identityctl", r["pid1"], "the shim is the pid namespace's init")
		assert.Contains(t, r["environ"], "No such file or directory", "A's secret is out of reach")
		assert.Contains(t, r["kill"], "No such process")
		assert.Contains(t, r["cgroup"], "Permission denied", "B cannot move into A's cgroup")
		assert.Contains(t, r["setns"], "Operation not permitted", "B cannot enter A's netns")
		assert.Contains(t, r["admin"], "permission denied", "B cannot reach the admin API")
	})

	t.Run("privileged", func(t *testing.T) {
		r := probe(t, "e2e-run-p-"+suffix(), "--privileged")
		assert.Equal(t, "0", r["uid"])
		assert.Equal(t, "4242", r["Groups"], "the caller's supplementary groups")
		assert.NotEqual(t, "0000000000000000", r["CapInh"])
		assert.Equal(t, "0", r["NoNewPrivs"])
		assert.NotEqual(t, "0000000000000000", r["CapEff"])
		assert.Contains(t, strings.Fields(r["pids"]), strconv.Itoa(apid), "host root sees the host's processes")
		assert.NotEqual(t, "identityctl", r["pid1"])
		assert.Equal(t, "READ", r["environ"], "host root can read A's secret: why --privileged is not the default")
		assert.Equal(t, "SIGNALLED", r["kill"])
		assert.Equal(t, "JOINED", r["cgroup"])
		assert.Equal(t, "JOINED", r["setns"])
		assert.Equal(t, "LISTED", r["admin"])
	})

	assert.NotZero(t, pidRunning(t, ow, idA, "sleep"), "A's workload survived its neighbours")
}

// TestIdentityctlRunEnvironment: the confined workload receives exactly the
// environment a privileged one does (and did before confinement): the
// caller's environment plus the identity variables.
func TestIdentityctlRunEnvironment(t *testing.T) {
	ow := newWorld(t)
	ow.start()
	env := func(mode ...string) map[string]string {
		cmd, _ := ctlRun(ow, append(append([]string{"--app", "env"}, mode...), "--", "env", "-0")...)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		require.NoError(t, cmd.Run(), stderr.String())
		m := map[string]string{}
		for _, kv := range strings.Split(strings.TrimSuffix(stdout.String(), "\x00"), "\x00") {
			k, v, _ := strings.Cut(kv, "=")
			m[k] = v
		}
		return m
	}
	confined, privileged := env(), env("--privileged")
	for _, m := range []map[string]string{confined, privileged} {
		assert.NotEmpty(t, m["MIREN_IDENTITY_TOKEN_SECRET"])
		assert.NotEmpty(t, m["MIREN_IDENTITY_TOKEN_URL"])
		assert.Contains(t, m, "MIREN_OIDC_ISSUER_URL")
	}
	assert.NotEqual(t, confined["MIREN_IDENTITY_TOKEN_SECRET"], privileged["MIREN_IDENTITY_TOKEN_SECRET"], "two sandboxes, two secrets")
	// The credentials files: at the mount for a confined workload, where
	// they are on the host for a privileged one (which gets no mount).
	assert.Equal(t, ow.credsMount+"/secret", confined["MIREN_IDENTITY_TOKEN_SECRET_FILE"])
	assert.Equal(t, ow.credsMount+"/token", confined["MIREN_IDENTITY_TOKEN_PATH"])
	assert.True(t, strings.HasPrefix(privileged["MIREN_IDENTITY_TOKEN_SECRET_FILE"], ow.state+"/"), privileged["MIREN_IDENTITY_TOKEN_SECRET_FILE"])
	assert.True(t, strings.HasPrefix(privileged["MIREN_IDENTITY_TOKEN_PATH"], ow.state+"/"), privileged["MIREN_IDENTITY_TOKEN_PATH"])
	for _, k := range []string{"MIREN_IDENTITY_TOKEN_SECRET", "MIREN_IDENTITY_TOKEN_SECRET_FILE", "MIREN_IDENTITY_TOKEN_PATH"} {
		delete(confined, k)
		delete(privileged, k)
	}
	assert.Equal(t, privileged, confined)

	want := map[string]string{}
	for _, kv := range os.Environ() {
		k, v, _ := strings.Cut(kv, "=")
		want[k] = v
	}
	for k := range confined {
		if !strings.HasPrefix(k, "MIREN_") {
			assert.Equal(t, want[k], confined[k], k)
		}
	}
	for k, v := range want {
		if !strings.HasPrefix(k, "MIREN_") {
			assert.Equal(t, v, confined[k], k)
		}
	}
}

// TestIdentityctlRunExitAndSignals: confined or not, run exits as its
// command did (128+n when signal n ended it) and forwards SIGTERM and
// SIGINT to it.
func TestIdentityctlRunExitAndSignals(t *testing.T) {
	ow := newWorld(t)
	ow.start()
	for _, mode := range [][]string{nil, {"--privileged"}} {
		t.Run(map[bool]string{false: "confined", true: "privileged"}[mode != nil], func(t *testing.T) {
			exit := func(cmdline ...string) (int, string) {
				cmd, out := ctlRun(ow, append(append([]string{"--app", "exit"}, mode...), cmdline...)...)
				cmd.Run()
				return cmd.ProcessState.ExitCode(), out.String()
			}
			code, out := exit("--", "sh", "-c", "exit 3")
			assert.Equal(t, 3, code, out)
			code, out = exit("--", "sh", "-c", "kill -TERM $$")
			assert.Equal(t, 128+int(syscall.SIGTERM), code, out)
			code, out = exit("--", "sh", "-c", "exit 0")
			assert.Equal(t, 0, code, out)
			code, out = exit("--", "/nonexistent/command")
			assert.Equal(t, 1, code, out)
			assert.Contains(t, out, "no such file or directory")

			for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
				id := "e2e-sig-" + suffix()
				cmd, out := ctlRun(ow, append(append([]string{"--app", "sig", "--id", id}, mode...), "--", "sleep", "300")...)
				require.NoError(t, cmd.Start())
				require.Eventually(t, func() bool { return pidRunning(t, ow, id, "sleep") != 0 },
					10*time.Second, 20*time.Millisecond, "sleep did not start: %s", out)
				cmd.Process.Signal(sig)
				cmd.Wait()
				assert.Equal(t, 128+int(sig), cmd.ProcessState.ExitCode(), "%v reached the command: %s", sig, out)
				assert.NotContains(t, sandboxes(t, ow), id, "deleted after the command exits")
			}
		})
	}

	// The confined command's pid namespace ends with it: what it left
	// running is killed, even with --keep. Privileged, it survives.
	for _, tc := range []struct {
		mode     []string
		survives bool
	}{{nil, false}, {[]string{"--privileged"}, true}} {
		id := "e2e-keep-" + suffix()
		cmd, out := ctlRun(ow, append(append([]string{"--app", "keep", "--id", id, "--keep"}, tc.mode...),
			"--", "sh", "-c", "sleep 300 >/dev/null 2>&1 & exit 0")...)
		require.NoError(t, cmd.Run(), out.String())
		require.Contains(t, sandboxes(t, ow), id, "--keep keeps the sandbox")
		assert.Equal(t, tc.survives, pidRunning(t, ow, id, "sleep") != 0, "mode %v: %s", tc.mode, out)
		require.NoError(t, controllers.NewAdminClient(ow.admin).Do(context.Background(), "DELETE", "/v1/sandboxes/"+id+"?kill=true", nil, nil))
	}
}

// TestIdentityctlRunUser: --user takes names or numbers, with or without a
// group; root and --user with --privileged are refused before any sandbox
// exists.
func TestIdentityctlRunUser(t *testing.T) {
	ow := newWorld(t)
	ow.start()
	for _, tc := range []struct{ user, want string }{
		{"nobody", "65534 65534 65534"},
		{"1234", "1234 1234 1234"},
		{"1234:2345", "1234 2345 2345"},
		{"nobody:2345", "65534 2345 2345"},
	} {
		cmd, out := ctlRun(ow, "--app", "user", "--user", tc.user, "--", "sh", "-c", `echo "ids=$(id -u) $(id -g) $(id -G)"`)
		require.NoError(t, cmd.Run(), out.String())
		assert.Equal(t, tc.want, report(out.String())["ids"], "--user %s", tc.user)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--user", "root"}, "use --privileged to run as host root"},
		{[]string{"--user", "0:0"}, "use --privileged to run as host root"},
		{[]string{"--user", "1234:0"}, "use --privileged to run as host root"},
		{[]string{"--user", "no-such-user-" + suffix()}, "unknown user"},
		{[]string{"--user", "nobody", "--privileged"}, "--user and --privileged exclude each other"},
	} {
		cmd, out := ctlRun(ow, append(append([]string{"--app", "user"}, tc.args...), "--", "true")...)
		require.Error(t, cmd.Run())
		assert.Equal(t, 1, cmd.ProcessState.ExitCode())
		assert.Contains(t, out.String(), tc.want, "%v", tc.args)
		assert.NotContains(t, out.String(), "identityctl: sandbox ", "refused before a sandbox is made")
	}
	assert.Empty(t, sandboxes(t, ow))
}
