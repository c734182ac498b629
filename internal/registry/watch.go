package registry

// Watcher hears of every sandbox the index registers or retires, while the
// index is locked: Add and Remove return only after it did, so a copy it
// keeps (the kernel's, for link-local redirects) is never behind a sandbox
// that Add already let in.
type Watcher interface {
	// SandboxAdded is called before s is registered; an error refuses
	// the registration, and Add returns it.
	SandboxAdded(s Sandbox) error
	// SandboxRemoved is called once s is retired.
	SandboxRemoved(s Sandbox)
}

// Watch makes w the index's watcher, replacing any earlier one (nil: none),
// and returns the sandboxes registered at that moment: w hears of every
// later change and of none of those.
func (x *Index) Watch(w Watcher) []Sandbox {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.watcher = w
	out := make([]Sandbox, 0, len(x.byID))
	for _, sb := range x.byID {
		out = append(out, *sb)
	}
	return out
}
