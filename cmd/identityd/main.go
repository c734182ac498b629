// Command identityd is the workload-identity token server daemon.
package main

import (
	"fmt"
	"os"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	if len(os.Args) == 2 && os.Args[1] == "version" {
		fmt.Println("identityd", version)
		return
	}
	fmt.Fprintln(os.Stderr, "identityd: the daemon is not assembled yet; see README.md")
	os.Exit(2)
}
