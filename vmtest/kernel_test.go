package vmtest

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseDebianKernel(t *testing.T) {
	k := ParseDebianKernel("linux-image-5.10.0-46-cloud-amd64@bullseye-security")
	assert.Equal(t, DebianKernel{Package: "linux-image-5.10.0-46-cloud-amd64", Suite: "bullseye-security"}, k)
	assert.Equal(t, "linux-image-5.10.0-46-cloud-amd64@bullseye-security", k.String())
	k = ParseDebianKernel("linux-image-6.1.0-56-cloud-amd64")
	assert.Equal(t, DebianKernel{Package: "linux-image-6.1.0-56-cloud-amd64"}, k)
	assert.Equal(t, "linux-image-6.1.0-56-cloud-amd64", k.String())
}

func TestModName(t *testing.T) {
	for _, s := range []string{"kernel/net/802/stp.ko", "stp.ko.xz", "stp.ko.zst", "stp"} {
		assert.Equal(t, "stp", modName(s), s)
	}
	assert.Equal(t, "nf_nat", modName("nf-nat"))
}

// TestDecompressModule decompresses an .xz module into the work directory and
// leaves a plain one where it is.
func TestDecompressModule(t *testing.T) {
	if _, err := exec.LookPath("xz"); err != nil {
		t.Skip("xz not installed (scripts/install-deps.sh installs xz-utils)")
	}
	dir := t.TempDir()
	plain := filepath.Join(dir, "dummy.ko")
	content := []byte("\x7fELF not really a module")
	require.NoError(t, os.WriteFile(plain, content, 0o644))
	got, err := decompressModule(plain, t.TempDir())
	require.NoError(t, err)
	assert.Equal(t, plain, got)

	require.NoError(t, exec.Command("xz", "-k", plain).Run())
	out := t.TempDir()
	got, err = decompressModule(plain+".xz", out)
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(out, "dummy.ko"), got)
	b, err := os.ReadFile(got)
	require.NoError(t, err)
	assert.Equal(t, content, b)
}
