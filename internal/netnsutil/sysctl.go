package netnsutil

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Sysctl reads a sysctl of the netns at netnsPath ("" for the calling
// process's own). key is the path below /proc/sys, "net/ipv4/conf/all/rp_filter":
// slashes, because interface names may hold dots.
func Sysctl(netnsPath, key string) (string, error) {
	var v string
	err := inNetns(netnsPath, func() error {
		b, err := os.ReadFile(filepath.Join("/proc/sys", key))
		v = strings.TrimSpace(string(b))
		return err
	})
	if err != nil {
		return "", fmt.Errorf("read sysctl %s%s: %w", sysctlName(key), where(netnsPath), err)
	}
	return v, nil
}

// SetSysctl writes a sysctl of the netns at netnsPath ("" for the calling
// process's own).
func SetSysctl(netnsPath, key, value string) error {
	err := inNetns(netnsPath, func() error {
		return os.WriteFile(filepath.Join("/proc/sys", key), []byte(value), 0o644)
	})
	if err != nil {
		return fmt.Errorf("set sysctl %s=%s%s: %w", sysctlName(key), value, where(netnsPath), err)
	}
	return nil
}

// inNetns runs f in the netns at path. /proc/sys/net shows the netns of
// the thread that opens it, so joining the netns is all that is needed.
func inNetns(path string, f func() error) error {
	if path == "" {
		return f()
	}
	return Do(path, f)
}

// sysctlName is key as sysctl(8) spells it.
func sysctlName(key string) string { return strings.ReplaceAll(key, "/", ".") }

func where(netnsPath string) string {
	if netnsPath == "" {
		return ""
	}
	return " in netns " + netnsPath
}
