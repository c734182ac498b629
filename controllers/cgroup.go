package controllers

import (
	"bufio"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// populated reports whether any task runs in the cgroup or below it.
func populated(dir string) bool {
	f, err := os.Open(filepath.Join(dir, "cgroup.events"))
	if err != nil {
		return false
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "populated "); ok {
			return v == "1"
		}
	}
	return false
}

// killCgroup kills every task in the cgroup and below it (cgroup.kill,
// Linux 5.14) and waits, briefly, for them to be gone.
func killCgroup(dir string) {
	if !populated(dir) {
		return
	}
	os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0)
	for deadline := time.Now().Add(5 * time.Second); populated(dir) && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
}
