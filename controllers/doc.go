// Package controllers owns the sandboxes' lifecycle: creating and adopting
// them, persisting their records and secrets crash-safely, and rebuilding
// cgroup id -> sandbox from the live cgroups and network namespaces at start.
package controllers
