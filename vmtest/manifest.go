package vmtest

// ManifestPath is where the guest init finds its instructions.
const ManifestPath = "/vmtest.json"

// Markers the guest prints on the console around each test binary, and
// once when every binary has run. The host parses these; everything else on
// the console is test or kernel output.
const (
	MarkerBegin = "=== VMTEST BEGIN "
	MarkerEnd   = "=== VMTEST END "
	MarkerDone  = "=== VMTEST DONE"
	MarkerError = "=== VMTEST INIT ERROR: "
)

// Manifest tells the guest init what to do.
type Manifest struct {
	// Modules are paths of kernel modules to load, dependencies first.
	Modules []string `json:"modules"`
	// Tests run one after the other.
	Tests []GuestTest `json:"tests"`
	// Env is added to each test's environment.
	Env []string `json:"env,omitempty"`
	// Panic makes init exit at once, which panics the kernel: the harness's
	// own test of panic detection.
	Panic bool `json:"panic,omitempty"`
}

// GuestTest is one test binary to run in the guest.
type GuestTest struct {
	Name string   `json:"name"` // reported as TestKernel/<kernel>/<Name>/...
	Path string   `json:"path"`
	Args []string `json:"args,omitempty"`
	// Env is added to this binary's environment, after Manifest.Env.
	Env []string `json:"env,omitempty"`
}
