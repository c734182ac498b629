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

// Watch calls start with the sandboxes registered now and, if it returns
// nil, makes w the index's watcher (replacing any earlier one; nil: none).
// Both happen under the index's lock, so w hears of every change after the
// ones start saw, and of none twice.
func (x *Index) Watch(start func([]Sandbox) error, w Watcher) error {
	x.mu.Lock()
	defer x.mu.Unlock()
	if start != nil {
		now := make([]Sandbox, 0, len(x.byID))
		for _, sb := range x.byID {
			now = append(now, *sb)
		}
		if err := start(now); err != nil {
			return err
		}
	}
	x.watcher = w
	return nil
}
